@_exported import VKFlexVulkan
