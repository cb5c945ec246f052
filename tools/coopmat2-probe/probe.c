// Device facts and peak throughput of KHR cooperative matrices at subgroup and workgroup scope
// (VK_NV_cooperative_matrix2) on the first NVIDIA device. The headers on the build machine
// predate both extensions, so their structures are declared here.
//   probe info                      -- features, properties, the shapes the driver offers
//   probe run FILE.spv INVOCATIONS FLOPS_PER_WORKGROUP GROUPS   -- median of 10 timed dispatches
// PROBE_TRACE=1 prints each Vulkan call before it is made.
#include <vulkan/vulkan.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(x) do { if (getenv("PROBE_TRACE")) { fprintf(stderr, "-> %s\n", #x); } VkResult r_ = (x); if (r_ != VK_SUCCESS) { printf("FAIL %s = %d\n", #x, r_); exit(1); } } while (0)

typedef struct { VkStructureType sType; void* pNext; VkBool32 cooperativeMatrix, robust; } CMFeaturesKHR;
typedef struct { VkStructureType sType; void* pNext; uint32_t M, N, K, A, B, C, R; VkBool32 sat; uint32_t scope; } CMPropsKHR;
typedef struct { VkStructureType sType; void* pNext; VkBool32 wgScope, flexDims, reductions, conversions, perElement, tensorAddr, blockLoads; } CM2Features;
typedef struct { VkStructureType sType; void* pNext; uint32_t maxWG, maxDim, reservedShared; } CM2Props;
typedef struct { VkStructureType sType; void* pNext; uint32_t Mg, Ng, Kg, A, B, C, R; VkBool32 sat; uint32_t scope, invocations; } CM2Flex;
typedef VkResult (*PFN_cmprops)(VkPhysicalDevice, uint32_t*, CMPropsKHR*);
typedef VkResult (*PFN_flex)(VkPhysicalDevice, uint32_t*, CM2Flex*);

static VkInstance inst; static VkPhysicalDevice pd; static VkDevice dev; static VkQueue q; static uint32_t qf;

static void init(int print) {
  VkApplicationInfo app = {VK_STRUCTURE_TYPE_APPLICATION_INFO, 0, "probe", 1, 0, 0, VK_API_VERSION_1_3};
  VkInstanceCreateInfo ici = {VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, 0, 0, &app};
  CHECK(vkCreateInstance(&ici, 0, &inst));
  uint32_t n = 8; VkPhysicalDevice pds[8]; CHECK(vkEnumeratePhysicalDevices(inst, &n, pds));
  pd = pds[0];
  for (uint32_t i = 0; i < n; i++) { VkPhysicalDeviceProperties p; vkGetPhysicalDeviceProperties(pds[i], &p); if (p.vendorID == 0x10de) pd = pds[i]; }
  VkPhysicalDeviceProperties p; vkGetPhysicalDeviceProperties(pd, &p);
  CMFeaturesKHR fnv = {1000249000}; CM2Features f2 = {1000593000, &fnv}; CMFeaturesKHR fk = {1000506000, &f2};
  VkPhysicalDeviceVulkan12Features v12 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES, &fk};
  VkPhysicalDeviceVulkan11Features v11 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES, &v12};
  VkPhysicalDeviceFeatures2 feats = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, &v11};
  vkGetPhysicalDeviceFeatures2(pd, &feats);
  if (print) {
    printf("device %s, driver %u.%u\n", p.deviceName, p.driverVersion >> 22, (p.driverVersion >> 14) & 0xff);
    printf("KHR coopmat %u; coopmat2: workgroupScope %u flexibleDimensions %u reductions %u conversions %u perElement %u tensorAddressing %u blockLoads %u\n",
           fk.cooperativeMatrix, f2.wgScope, f2.flexDims, f2.reductions, f2.conversions, f2.perElement, f2.tensorAddr, f2.blockLoads);
    CM2Props p2 = {1000593002}; VkPhysicalDeviceProperties2 pp = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, &p2};
    vkGetPhysicalDeviceProperties2(pd, &pp);
    printf("coopmat2: maxWorkgroupSize %u maxFlexibleDimension %u reservedSharedMemory %u; maxComputeSharedMemorySize %u\n",
           p2.maxWG, p2.maxDim, p2.reservedShared, p.limits.maxComputeSharedMemorySize);
    PFN_cmprops cp = (PFN_cmprops)vkGetInstanceProcAddr(inst, "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR");
    if (cp) { uint32_t c = 0; cp(pd, &c, 0); CMPropsKHR* a = calloc(c, sizeof *a);
      for (uint32_t i = 0; i < c; i++) a[i].sType = 1000506001;
      cp(pd, &c, a);
      for (uint32_t i = 0; i < c; i++) printf("  KHR shape %ux%ux%u A%u B%u C%u R%u sat%u scope%u\n", a[i].M, a[i].N, a[i].K, a[i].A, a[i].B, a[i].C, a[i].R, a[i].sat, a[i].scope); }
    PFN_flex fp = (PFN_flex)vkGetInstanceProcAddr(inst, "vkGetPhysicalDeviceCooperativeMatrixFlexibleDimensionsPropertiesNV");
    if (fp) { uint32_t c = 0; fp(pd, &c, 0); CM2Flex* a = calloc(c, sizeof *a);
      for (uint32_t i = 0; i < c; i++) a[i].sType = 1000593001;
      fp(pd, &c, a);
      for (uint32_t i = 0; i < c; i++) printf("  flexible granularity M%u N%u K%u A%u B%u C%u R%u sat%u scope%u invocations %u\n", a[i].Mg, a[i].Ng, a[i].Kg, a[i].A, a[i].B, a[i].C, a[i].R, a[i].sat, a[i].scope, a[i].invocations); }
  }
  uint32_t nq = 8; VkQueueFamilyProperties qp[8]; vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, qp);
  for (qf = 0; qf < nq && !(qp[qf].queueFlags & VK_QUEUE_COMPUTE_BIT); qf++) {}
  float prio = 1; VkDeviceQueueCreateInfo qci = {VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO, 0, 0, qf, 1, &prio};
  const char* exts[] = {"VK_KHR_cooperative_matrix", "VK_NV_cooperative_matrix2", "VK_NV_cooperative_matrix"};
  f2.reductions = f2.conversions = f2.perElement = f2.tensorAddr = f2.blockLoads = 0;
  fk.robust = 0; fnv.robust = 0;
  VkDeviceCreateInfo dci = {VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, &feats, 0, 1, &qci, 0, 0, 3, exts, 0};
  CHECK(vkCreateDevice(pd, &dci, 0, &dev));
  vkGetDeviceQueue(dev, qf, 0, &q);
}

static VkBuffer mkbuf(VkDeviceSize size, VkDeviceMemory* mem) {
  VkBufferCreateInfo bi = {VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, 0, 0, size, VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT};
  VkBuffer b; CHECK(vkCreateBuffer(dev, &bi, 0, &b));
  VkMemoryRequirements r; vkGetBufferMemoryRequirements(dev, b, &r);
  VkPhysicalDeviceMemoryProperties mp; vkGetPhysicalDeviceMemoryProperties(pd, &mp);
  uint32_t t = 0; for (; t < mp.memoryTypeCount; t++) if ((r.memoryTypeBits >> t & 1) && (mp.memoryTypes[t].propertyFlags & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT)) break;
  VkMemoryAllocateInfo ai = {VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, 0, r.size, t};
  CHECK(vkAllocateMemory(dev, &ai, 0, mem)); CHECK(vkBindBufferMemory(dev, b, *mem, 0));
  return b;
}

static int cmpd(const void* a, const void* b) { double x = *(double*)a, y = *(double*)b; return x < y ? -1 : x > y; }

int main(int argc, char** argv) {
  if (argc < 2) { fprintf(stderr, "usage: probe info | run FILE INV FLOPS GROUPS\n"); return 2; }
  if (!strcmp(argv[1], "info")) { init(1); return 0; }
  if (strcmp(argv[1], "run") || argc < 6) { fprintf(stderr, "usage: probe run FILE.spv INVOCATIONS FLOPS_PER_WORKGROUP GROUPS\n"); return 2; }
  init(0);
  FILE* f = fopen(argv[2], "rb");
  if (!f) { perror(argv[2]); return 1; }
  fseek(f, 0, SEEK_END); long sz = ftell(f); fseek(f, 0, SEEK_SET);
  uint32_t* code = malloc(sz); fread(code, 1, sz, f); fclose(f);
  double flopsPerWG = atof(argv[4]); uint32_t groups = atoi(argv[5]);
  VkDeviceMemory m0, m1;
  VkBuffer b0 = mkbuf(1 << 20, &m0), b1 = mkbuf((VkDeviceSize)1 << 30, &m1);
  VkDescriptorSetLayoutBinding bs[2] = {{0, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1, VK_SHADER_STAGE_COMPUTE_BIT}, {1, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1, VK_SHADER_STAGE_COMPUTE_BIT}};
  VkDescriptorSetLayoutCreateInfo dli = {VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO, 0, 0, 2, bs};
  VkDescriptorSetLayout dl; CHECK(vkCreateDescriptorSetLayout(dev, &dli, 0, &dl));
  VkPipelineLayoutCreateInfo pli = {VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, 0, 0, 1, &dl};
  VkPipelineLayout pl; CHECK(vkCreatePipelineLayout(dev, &pli, 0, &pl));
  VkShaderModuleCreateInfo smi = {VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO, 0, 0, (size_t)sz, code};
  VkShaderModule sm; CHECK(vkCreateShaderModule(dev, &smi, 0, &sm));
  VkComputePipelineCreateInfo cpi = {VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO, 0, 0,
    {VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO, 0, 0, VK_SHADER_STAGE_COMPUTE_BIT, sm, "main"}, pl};
  VkPipeline pipe; CHECK(vkCreateComputePipelines(dev, 0, 1, &cpi, 0, &pipe));
  VkDescriptorPoolSize ps = {VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 2};
  VkDescriptorPoolCreateInfo dpi = {VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO, 0, 0, 1, 1, &ps};
  VkDescriptorPool dp; CHECK(vkCreateDescriptorPool(dev, &dpi, 0, &dp));
  VkDescriptorSetAllocateInfo dai = {VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, 0, dp, 1, &dl};
  VkDescriptorSet ds; CHECK(vkAllocateDescriptorSets(dev, &dai, &ds));
  VkDescriptorBufferInfo dbi[2] = {{b0, 0, VK_WHOLE_SIZE}, {b1, 0, VK_WHOLE_SIZE}};
  VkWriteDescriptorSet w[2] = {{VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, 0, ds, 0, 0, 1, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 0, &dbi[0]},
                               {VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, 0, ds, 1, 0, 1, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 0, &dbi[1]}};
  vkUpdateDescriptorSets(dev, 2, w, 0, 0);
  VkQueryPoolCreateInfo qpi = {VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO, 0, 0, VK_QUERY_TYPE_TIMESTAMP, 2};
  VkQueryPool qpool; CHECK(vkCreateQueryPool(dev, &qpi, 0, &qpool));
  VkCommandPoolCreateInfo cpci = {VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO, 0, VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, qf};
  VkCommandPool cp; CHECK(vkCreateCommandPool(dev, &cpci, 0, &cp));
  VkCommandBufferAllocateInfo cai = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, 0, cp, 0, 1};
  VkCommandBuffer cb; CHECK(vkAllocateCommandBuffers(dev, &cai, &cb));
  VkPhysicalDeviceProperties p; vkGetPhysicalDeviceProperties(pd, &p);
  double times[12];
  for (int rep = 0; rep < 12; rep++) {
    VkCommandBufferBeginInfo bbi = {VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
    CHECK(vkBeginCommandBuffer(cb, &bbi));
    if (rep == 0) vkCmdFillBuffer(cb, b0, 0, VK_WHOLE_SIZE, 0x3c003c00u);
    vkCmdResetQueryPool(cb, qpool, 0, 2);
    vkCmdBindPipeline(cb, VK_PIPELINE_BIND_POINT_COMPUTE, pipe);
    vkCmdBindDescriptorSets(cb, VK_PIPELINE_BIND_POINT_COMPUTE, pl, 0, 1, &ds, 0, 0);
    vkCmdWriteTimestamp(cb, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, qpool, 0);
    vkCmdDispatch(cb, groups, 1, 1);
    vkCmdWriteTimestamp(cb, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, qpool, 1);
    CHECK(vkEndCommandBuffer(cb));
    VkSubmitInfo si = {VK_STRUCTURE_TYPE_SUBMIT_INFO, 0, 0, 0, 0, 1, &cb};
    CHECK(vkQueueSubmit(q, 1, &si, 0)); CHECK(vkQueueWaitIdle(q));
    uint64_t ts[2]; CHECK(vkGetQueryPoolResults(dev, qpool, 0, 2, sizeof ts, ts, 8, VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT));
    times[rep] = (ts[1] - ts[0]) * p.limits.timestampPeriod * 1e-9;
  }
  qsort(times + 2, 10, sizeof(double), cmpd);
  double t = times[2 + 5];
  printf("%s: %.3f ms, %.1f TFLOP/s\n", argv[2], t * 1e3, flopsPerWG * groups / t * 1e-12);
  return 0;
}
