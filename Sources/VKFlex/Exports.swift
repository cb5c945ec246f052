@_exported import VKFlexExpr
@_exported import VKFlexVulkan
@_exported import VKFlexCore
