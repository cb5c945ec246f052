@_exported import VKFlexExpr
@_exported import VKFlexVulkan
