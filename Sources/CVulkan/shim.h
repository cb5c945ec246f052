#ifndef VKFLEX_CVULKAN_SHIM_H
#define VKFLEX_CVULKAN_SHIM_H
#include <vulkan/vulkan.h>

// VK_KHR_cooperative_matrix (Vulkan 1.3.255) is newer than Debian 12's headers (1.3.239): its
// structures and entry point as the specification defines them, under vkflex's own names.
// sTypes: VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_KHR = 1000506000,
// VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_KHR = 1000506001; VK_SCOPE_SUBGROUP_KHR = 3.

typedef struct VkflexCooperativeMatrixFeaturesKHR {
    VkStructureType sType;
    void *pNext;
    VkBool32 cooperativeMatrix;
    VkBool32 cooperativeMatrixRobustBufferAccess;
} VkflexCooperativeMatrixFeaturesKHR;

typedef struct VkflexCooperativeMatrixPropertiesKHR {
    VkStructureType sType;
    void *pNext;
    uint32_t MSize, NSize, KSize;
    uint32_t AType, BType, CType, ResultType;   // VkComponentTypeKHR: the values of VkComponentTypeNV
    VkBool32 saturatingAccumulation;
    uint32_t scope;                             // VkScopeKHR
} VkflexCooperativeMatrixPropertiesKHR;

typedef VkResult (*PFN_vkflexGetPhysicalDeviceCooperativeMatrixPropertiesKHR)(
    VkPhysicalDevice physicalDevice, uint32_t *pPropertyCount, VkflexCooperativeMatrixPropertiesKHR *pProperties);

// VK_KHR_shader_bfloat16 (Vulkan 1.4.311) is newer still: its feature structure, sType
// VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_BFLOAT16_FEATURES_KHR = 1000141000; the component type
// VK_COMPONENT_TYPE_BFLOAT16_KHR = 1000141000 in cooperative-matrix shapes.
typedef struct VkflexShaderBfloat16FeaturesKHR {
    VkStructureType sType;
    void *pNext;
    VkBool32 shaderBFloat16Type;
    VkBool32 shaderBFloat16DotProduct;
    VkBool32 shaderBFloat16CooperativeMatrix;
} VkflexShaderBfloat16FeaturesKHR;
#endif
