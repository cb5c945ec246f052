#ifndef VKFLEX_CVULKAN_SHIM_H
#define VKFLEX_CVULKAN_SHIM_H
#include <vulkan/vulkan.h>
#endif
