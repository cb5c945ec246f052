import CVulkan

/// An error from the Vulkan layer: the call that failed and the `VkResult` it returned, or a
/// problem vkflex found before calling the driver (a limit, a missing capability).
///
/// ```swift
/// do { _ = try Device.default() }
/// catch let error as VulkanError { print(error) }   // "vkCreateInstance failed: VK_ERROR_INCOMPATIBLE_DRIVER (-9)"
/// ```
public enum VulkanError: Error, CustomStringConvertible, Equatable {
    /// A Vulkan call returned an error code.
    case call(String, result: Int32)
    /// No Vulkan device is present, or none matches the selection.
    case noDevice(String)
    /// A request exceeds a limit of the device (allocation size, storage-buffer range, shared memory...).
    case limitExceeded(String)
    /// The device lacks a capability the operation needs.
    case unsupported(String)
    /// A misuse of the API by the caller (wrong sizes, released objects...).
    case invalidArgument(String)

    public var description: String {
        switch self {
        case .call(let name, let result):
            return "\(name) failed: \(vkResultName(result)) (\(result))"
        case .noDevice(let message), .limitExceeded(let message), .unsupported(let message),
             .invalidArgument(let message):
            return message
        }
    }
}

/// The name of a `VkResult` value, e.g. `VK_ERROR_OUT_OF_DEVICE_MEMORY`.
public func vkResultName(_ value: Int32) -> String {
    switch value {
    case 0: return "VK_SUCCESS"
    case 1: return "VK_NOT_READY"
    case 2: return "VK_TIMEOUT"
    case 3: return "VK_EVENT_SET"
    case 4: return "VK_EVENT_RESET"
    case 5: return "VK_INCOMPLETE"
    case -1: return "VK_ERROR_OUT_OF_HOST_MEMORY"
    case -2: return "VK_ERROR_OUT_OF_DEVICE_MEMORY"
    case -3: return "VK_ERROR_INITIALIZATION_FAILED"
    case -4: return "VK_ERROR_DEVICE_LOST"
    case -5: return "VK_ERROR_MEMORY_MAP_FAILED"
    case -6: return "VK_ERROR_LAYER_NOT_PRESENT"
    case -7: return "VK_ERROR_EXTENSION_NOT_PRESENT"
    case -8: return "VK_ERROR_FEATURE_NOT_PRESENT"
    case -9: return "VK_ERROR_INCOMPATIBLE_DRIVER"
    case -10: return "VK_ERROR_TOO_MANY_OBJECTS"
    case -11: return "VK_ERROR_FORMAT_NOT_SUPPORTED"
    case -12: return "VK_ERROR_FRAGMENTED_POOL"
    case -13: return "VK_ERROR_UNKNOWN"
    case -1000069000: return "VK_ERROR_OUT_OF_POOL_MEMORY"
    case -1000072003: return "VK_ERROR_INVALID_EXTERNAL_HANDLE"
    case -1000161000: return "VK_ERROR_FRAGMENTATION"
    case -1000257000: return "VK_ERROR_INVALID_OPAQUE_CAPTURE_ADDRESS"
    case 1000297000: return "VK_PIPELINE_COMPILE_REQUIRED"
    case -1000012000: return "VK_ERROR_INVALID_SHADER_NV"
    default: return "VkResult(\(value))"
    }
}

/// Throws a `VulkanError.call` naming `name` when `result` is not `VK_SUCCESS`.
@inline(__always)
func check(_ result: VkResult, _ name: @autoclosure () -> String) throws {
    if result != VK_SUCCESS { throw VulkanError.call(name(), result: result.rawValue) }
}
