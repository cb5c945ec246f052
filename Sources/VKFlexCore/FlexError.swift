import Foundation

/// The one error type vkflex's public API throws. Switch on it to tell a caller's mistake from a
/// driver failure:
///
/// ```swift
/// do {
///     let result = try flexAttention(q, k, v, blockMask: mask)
///     let out = try result.output.toArray()
/// } catch FlexError.invalidArgument(let message) {
///     print("fix the call:", message)           // shapes, dtypes, lengths, options
/// } catch FlexError.expression(let e) {
///     print(e)                                    // the mod's text with a caret under the problem
/// } catch FlexError.vulkan(let call, let result) {
///     print("\(call) returned \(vkResultName(result))")
/// } catch let error as FlexError {
///     print(error.localizedDescription)           // every case has a message worded for the caller
/// }
/// ```
public enum FlexError: Error, Sendable, Equatable, CustomStringConvertible, LocalizedError {
    /// A caller's argument is wrong: a shape, a dtype, a length, a BlockMask built for other
    /// inputs, a tuning variable's value.
    case invalidArgument(String)
    /// A mod does not parse or type-check (with its text and a caret where the text form was used).
    case expression(ExpressionError)
    /// A Vulkan call returned an error: the call and its `VkResult`.
    case vulkan(call: String, result: Int32)
    /// No Vulkan device, or none that matches the selection.
    case noDevice(String)
    /// The device lacks a capability the call needs (an extension, a feature, a subgroup size).
    case unsupported(String)
    /// A request exceeds the device's memory or a limit (allocation size, storage-buffer range,
    /// dispatch size, shared memory).
    case limitExceeded(String)
    /// A generated shader failed to compile: shaderc's message and the numbered source.
    case shaderCompile(ShaderCompileError)
    /// A mod failed while it ran, on the GPU or in the CPU evaluator: a captured index out of
    /// range, an integer division by zero. Reported when the output is read.
    case modFailed(String)
    /// A file could not be read or written, or is not what it should be (`.npy` inputs).
    case file(String)

    /// A caller's mistake (``invalidArgument(_:)``), for the many checks worded as one sentence.
    public init(_ message: String) { self = .invalidArgument(message) }

    /// The message alone, without the case.
    public var message: String {
        switch self {
        case .invalidArgument(let m), .noDevice(let m), .unsupported(let m), .limitExceeded(let m), .modFailed(let m), .file(let m):
            return m
        case .expression(let e): return e.description
        case .vulkan(let call, let result): return "\(call) failed: \(vkResultName(result)) (\(result))"
        case .shaderCompile(let e): return e.description
        }
    }

    public var description: String { message }
    public var errorDescription: String? { message }

    /// An integer division or modulo by zero in a mod.
    public static let divisionByZero = FlexError.modFailed("integer division or modulo by zero in a mod")
    /// An int raised to a negative int power in a mod.
    public static let negativePower = FlexError.modFailed("an integer raised to a negative integer power in a mod")
    /// A captured index outside its tensor, even after wrapping a negative one once.
    public static func indexOutOfRange(name: String, shape: [Int], index: Int32, dim: Int) -> FlexError {
        let size = shape.indices.contains(dim) ? shape[dim] : 0
        let place = shape.count > 1 ? "dimension \(dim) of " : ""
        return .modFailed("index \(index) is out of range for \(place)\(name) (size \(size)), even after wrapping negative indices once")
    }
}

/// A mod that does not parse or type-check: the message, and where the text form was used, the
/// text and the position of the problem.
///
/// ```
/// mask_mod: 0 <= q_idx - kv_idx <= 4
///                                ^ chained comparisons are not supported: write (0 <= d) & (d <= 4)
/// ```
public struct ExpressionError: Sendable, Equatable, CustomStringConvertible {
    /// What is wrong, in the mod's terms.
    public var message: String
    /// `score_mod` or `mask_mod`, when known.
    public var role: String?
    /// The text form, when the mod was parsed from text.
    public var text: String?
    /// Character offset into `text`.
    public var position: Int?

    public init(_ message: String, role: String? = nil, text: String? = nil, position: Int? = nil) {
        self.message = message; self.role = role; self.text = text; self.position = position
    }

    public var description: String {
        guard let text else { return role.map { "\($0): \(message)" } ?? message }
        let head = "\(role ?? "expression"): "
        let caretLine = String(repeating: " ", count: head.count + (position ?? 0)) + "^ " + message
        return "\(head)\(text)\n\(caretLine)"
    }
}

/// A shader that failed to compile: shaderc's message and the numbered source around the line.
///
/// ```swift
/// do { _ = try ShaderCompiler.shared.compile(ShaderSource(name: "broken", text: glsl)) }
/// catch FlexError.shaderCompile(let e) { print(e) }
/// // flex_attention_fwd.comp:42: error: 'scroe' : undeclared identifier
/// //    41 |   float s = score_mod(...);
/// // >  42 |   s = scroe * 2.0;
/// ```
public struct ShaderCompileError: Sendable, Equatable, CustomStringConvertible {
    /// The shader's name (``ShaderSource``'s `name` in VKFlexVulkan).
    public var shaderName: String
    /// shaderc's message, as it printed it.
    public var message: String
    /// The file (shader or include) and line of the first error, when shaderc named one.
    public var file: String?
    /// The 1-based line in `file`.
    public var line: Int?
    /// Numbered source lines around `line` (the failing one marked with `>`).
    public var excerpt: String

    public init(shaderName: String, message: String, file: String?, line: Int?, excerpt: String) {
        self.shaderName = shaderName; self.message = message; self.file = file; self.line = line; self.excerpt = excerpt
    }

    public var description: String {
        var text = "shader \(shaderName) failed to compile:\n\(message.trimmingCharacters(in: .whitespacesAndNewlines))"
        if !excerpt.isEmpty { text += "\n\(excerpt)" }
        return text
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
