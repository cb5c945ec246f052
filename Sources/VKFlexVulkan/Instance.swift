import CVulkan
import Foundation

/// The messages the Khronos validation layer reported, process-wide.
///
/// Tests read ``count`` before and after a piece of work: any new message is a failure.
public final class ValidationLog: @unchecked Sendable {
    /// The log every validating instance writes to.
    public static let shared = ValidationLog()
    private let lock = NSLock()
    private var storage: [String] = []
    /// Print each message to standard output as it arrives (set by `VKFLEX_VALIDATE=1`).
    public var echo: Bool {
        get { lock.withLock { _echo } }
        set { lock.withLock { _echo = newValue } }
    }
    private var _echo = false

    /// Every message so far, oldest first.
    public var messages: [String] { lock.withLock { storage } }
    /// The number of messages so far.
    public var count: Int { lock.withLock { storage.count } }

    func append(_ message: String) {
        let echoIt: Bool = lock.withLock {
            storage.append(message)
            return _echo
        }
        if echoIt { print("[validation] \(message)") }
    }
}

private let debugCallback: PFN_vkDebugUtilsMessengerCallbackEXT = { severity, types, data, _ in
    // The validation layer reports through VALIDATION messages; GENERAL warnings are the loader's
    // notes (e.g. that VK_INSTANCE_LAYERS added a layer) and are not problems with our usage.
    let isValidation = types & VkDebugUtilsMessageTypeFlagsEXT(VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT.rawValue) != 0
    let isError = severity.rawValue >= VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT.rawValue
    guard isValidation || isError else { return VkBool32(VK_FALSE) }
    let text = data.flatMap { $0.pointee.pMessage.map { String(cString: $0) } } ?? "(no message)"
    let level = severity.rawValue >= VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT.rawValue ? "error" : "warning"
    ValidationLog.shared.append("\(level): \(text)")
    return VkBool32(VK_FALSE)
}

/// A `VkInstance`, owned or borrowed, with the validation messenger when validation is on.
final class Instance: @unchecked Sendable {
    let handle: VkInstance
    let owned: Bool
    let validation: Bool
    private var messenger: VkDebugUtilsMessengerEXT?

    private static let lock = NSLock()
    nonisolated(unsafe) private static var shared: [Bool: Instance] = [:]

    /// The process-wide instance for this validation setting (instances are expensive with validation on).
    static func shared(validation: Bool) throws -> Instance {
        try lock.withLock {
            if let existing = shared[validation] { return existing }
            let made = try Instance(validation: validation)
            shared[validation] = made
            return made
        }
    }

    init(borrowing handle: VkInstance) {
        self.handle = handle
        self.owned = false
        self.validation = false
    }

    private init(validation: Bool) throws {
        if validation {
            guard Instance.availableLayers().contains("VK_LAYER_KHRONOS_validation") else {
                throw FlexError.unsupported(
                    "the Khronos validation layer is not installed (apt-get install vulkan-validationlayers)")
            }
        }
        let extensions = Instance.availableExtensions()
        var enable: [String] = []
        if validation && extensions.contains("VK_EXT_debug_utils") { enable.append("VK_EXT_debug_utils") }
        if extensions.contains("VK_KHR_portability_enumeration") { enable.append("VK_KHR_portability_enumeration") }
        // A layer already named in VK_INSTANCE_LAYERS is loaded by the loader; naming it again
        // only earns a loader warning.
        let preloaded = ProcessInfo.processInfo.environment["VK_INSTANCE_LAYERS"]?.contains("VK_LAYER_KHRONOS_validation") ?? false
        let layers = validation && !preloaded ? ["VK_LAYER_KHRONOS_validation"] : []
        let useMessenger = enable.contains("VK_EXT_debug_utils")

        var instance: VkInstance?
        let result: VkResult = withCStrings(enable) { extPtrs in
            withCStrings(layers) { layerPtrs in
                "vkflex".withCString { appName in
                    var app = VkApplicationInfo()
                    app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO
                    app.pApplicationName = appName
                    app.pEngineName = appName
                    app.apiVersion = vkMakeAPIVersion(1, 2, 0)
                    return withUnsafePointer(to: &app) { appPtr in
                        var messengerInfo = Instance.messengerInfo()
                        return withUnsafePointer(to: &messengerInfo) { mPtr in
                            var info = VkInstanceCreateInfo()
                            info.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO
                            info.pApplicationInfo = appPtr
                            if enable.contains("VK_KHR_portability_enumeration") {
                                info.flags = VkInstanceCreateFlags(VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR.rawValue)
                            }
                            info.enabledExtensionCount = UInt32(extPtrs.count)
                            info.ppEnabledExtensionNames = extPtrs.baseAddress
                            info.enabledLayerCount = UInt32(layerPtrs.count)
                            info.ppEnabledLayerNames = layerPtrs.baseAddress
                            if useMessenger { info.pNext = UnsafeRawPointer(mPtr) }
                            return vkCreateInstance(&info, nil, &instance)
                        }
                    }
                }
            }
        }
        try check(result, "vkCreateInstance")
        guard let instance else { throw FlexError.vulkan(call: "vkCreateInstance", result: VK_ERROR_INITIALIZATION_FAILED.rawValue) }
        self.handle = instance
        self.owned = true
        self.validation = validation
        if useMessenger {
            if let raw = vkGetInstanceProcAddr(instance, "vkCreateDebugUtilsMessengerEXT") {
                let create = unsafeBitCast(raw, to: PFN_vkCreateDebugUtilsMessengerEXT.self)
                var info = Instance.messengerInfo()
                var m: VkDebugUtilsMessengerEXT?
                try check(create(instance, &info, nil, &m), "vkCreateDebugUtilsMessengerEXT")
                messenger = m
            }
        }
    }

    deinit {
        guard owned else { return }
        if let messenger, let raw = vkGetInstanceProcAddr(handle, "vkDestroyDebugUtilsMessengerEXT") {
            unsafeBitCast(raw, to: PFN_vkDestroyDebugUtilsMessengerEXT.self)(handle, messenger, nil)
        }
        vkDestroyInstance(handle, nil)
    }

    private static func messengerInfo() -> VkDebugUtilsMessengerCreateInfoEXT {
        var info = VkDebugUtilsMessengerCreateInfoEXT()
        info.sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT
        info.messageSeverity = VkDebugUtilsMessageSeverityFlagsEXT(
            VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT.rawValue | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT.rawValue)
        info.messageType = VkDebugUtilsMessageTypeFlagsEXT(
            VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT.rawValue | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT.rawValue)
        info.pfnUserCallback = debugCallback
        return info
    }

    static func layers() -> [VkLayerProperties] {
        enumerated(VkLayerProperties()) { vkEnumerateInstanceLayerProperties($0, $1) }
    }

    static func availableLayers() -> Set<String> {
        Set(layers().map { fixedString($0.layerName) })
    }

    /// The spec version of the Khronos validation layer, when this process loads it (through
    /// vkflex's validation option or `VK_INSTANCE_LAYERS`); nil otherwise.
    func loadedValidationLayerVersion() -> UInt32? {
        let preloaded = ProcessInfo.processInfo.environment["VK_INSTANCE_LAYERS"]?.contains("VK_LAYER_KHRONOS_validation") ?? false
        guard validation || preloaded else { return nil }
        return Instance.layers().first { fixedString($0.layerName) == "VK_LAYER_KHRONOS_validation" }?.specVersion
    }

    static func availableExtensions() -> Set<String> {
        Set(enumerated(VkExtensionProperties()) { vkEnumerateInstanceExtensionProperties(nil, $0, $1) }.map { fixedString($0.extensionName) })
    }

    func physicalDevices() throws -> [VkPhysicalDevice] {
        var count: UInt32 = 0
        try check(vkEnumeratePhysicalDevices(handle, &count, nil), "vkEnumeratePhysicalDevices")
        var devices = [VkPhysicalDevice?](repeating: nil, count: Int(count))
        try check(vkEnumeratePhysicalDevices(handle, &count, &devices), "vkEnumeratePhysicalDevices")
        return devices.prefix(Int(count)).compactMap { $0 }
    }
}

func vkMakeAPIVersion(_ major: UInt32, _ minor: UInt32, _ patch: UInt32) -> UInt32 {
    (major << 22) | (minor << 12) | patch
}

/// Reads a fixed-size C `char[N]` array imported as a tuple.
func fixedString<T>(_ tuple: T) -> String {
    withUnsafeBytes(of: tuple) { raw in
        let bytes = raw.bindMemory(to: UInt8.self)
        let end = bytes.firstIndex(of: 0) ?? bytes.count
        return String(decoding: bytes[..<end], as: UTF8.self)
    }
}

/// Calls `body` with a C array of C strings that lives for the duration of the call.
func withCStrings<R>(_ strings: [String], _ body: (UnsafeBufferPointer<UnsafePointer<CChar>?>) throws -> R) rethrows -> R {
    let copies = strings.map { strdup($0) }
    defer { copies.forEach { free($0) } }
    let pointers = copies.map { UnsafePointer<CChar>($0) }
    return try pointers.withUnsafeBufferPointer(body)
}
