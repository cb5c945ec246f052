import CVulkan
@_exported import VKFlexCore

/// Throws a `FlexError.vulkan` naming `name` when `result` is not `VK_SUCCESS`.
@inline(__always)
func check(_ result: VkResult, _ name: @autoclosure () -> String) throws {
    if result != VK_SUCCESS { throw FlexError.vulkan(call: name(), result: result.rawValue) }
}
