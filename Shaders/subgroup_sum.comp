#version 450
// Device check: each workgroup sums its slice of `data` with subgroup reductions and shared
// memory, for any subgroup size. Used by `vkflex selftest` and the tests.
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require

layout(local_size_x_id = 0) in;
layout(std430, set = 0, binding = 0) readonly buffer Data { float data[]; };
layout(std430, set = 0, binding = 1) writeonly buffer Sums { float sums[]; };
layout(push_constant) uniform Push { uint count; uint perGroup; } pc;

shared float partial[64];

void main() {
    uint base = gl_WorkGroupID.x * pc.perGroup;
    float acc = 0.0;
    for (uint i = gl_LocalInvocationID.x; i < pc.perGroup; i += gl_WorkGroupSize.x) {
        uint j = base + i;
        if (j < pc.count) acc += data[j];
    }
    float s = subgroupAdd(acc);
    if (subgroupElect()) partial[gl_SubgroupID] = s;
    barrier();
    if (gl_LocalInvocationID.x == 0) {
        float total = 0.0;
        for (uint g = 0; g < gl_NumSubgroups; ++g) total += partial[g];
        sums[gl_WorkGroupID.x] = total;
    }
}
