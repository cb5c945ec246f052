import CVulkan
import Foundation

/// The kind of a Vulkan physical device, in the order vkflex prefers them.
public enum DeviceType: String, Sendable, Codable, Comparable {
    case discrete, integrated, virtual, cpu, other

    var rank: Int {
        switch self {
        case .discrete: 0
        case .integrated: 1
        case .virtual: 2
        case .cpu: 3
        case .other: 4
        }
    }

    public static func < (a: DeviceType, b: DeviceType) -> Bool { a.rank < b.rank }

    init(_ t: VkPhysicalDeviceType) {
        switch t {
        case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: self = .discrete
        case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: self = .integrated
        case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: self = .virtual
        case VK_PHYSICAL_DEVICE_TYPE_CPU: self = .cpu
        default: self = .other
        }
    }
}

/// One cooperative-matrix shape a device offers (`vkGetPhysicalDeviceCooperativeMatrixPropertiesNV`).
public struct CooperativeMatrixShape: Sendable, Hashable, Codable, CustomStringConvertible {
    public var m: Int, n: Int, k: Int
    /// Component types of A, B, C and the result, e.g. `float16`.
    public var a: String, b: String, c: String, result: String

    public var description: String { "\(m)x\(n)x\(k) \(a)*\(b)+\(c)->\(result)" }

    /// A shape from its sizes and component types, e.g. a vendor's listed shape to plan for:
    ///
    /// ```swift
    /// let wmma = CooperativeMatrixShape(m: 16, n: 16, k: 16, a: "float16", b: "float16", c: "float32", result: "float32")
    /// ```
    public init(m: Int, n: Int, k: Int, a: String, b: String, c: String, result: String) {
        self.m = m; self.n = n; self.k = k; self.a = a; self.b = b; self.c = c; self.result = result
    }
}

/// What vkflex knows about a physical device: identity, limits and the features its kernels use.
///
/// ```swift
/// for caps in try Device.availableDevices() { print(caps.index, caps.name, caps.subgroupSize) }
/// ```
public struct DeviceCapabilities: Sendable, Codable {
    public var index: Int
    public var name: String
    public var type: DeviceType
    public var vendorID: UInt32
    public var deviceID: UInt32
    public var apiVersion: String
    public var driverName: String
    public var driverInfo: String
    public var driverVersion: UInt32
    /// The default subgroup size (`gl_SubgroupSize` without size control).
    public var subgroupSize: Int
    public var minSubgroupSize: Int
    public var maxSubgroupSize: Int
    /// Supported subgroup operation classes in compute shaders: `basic`, `vote`, `arithmetic`, `ballot`, `shuffle`, ...
    public var subgroupOperations: [String]
    public var maxSharedMemory: Int
    public var maxStorageBufferRange: Int
    public var maxMemoryAllocation: Int
    public var maxWorkgroupInvocations: Int
    public var maxWorkgroupSize: [Int]
    public var maxWorkgroupCount: [Int]
    public var maxPushConstantsSize: Int
    public var minStorageBufferOffsetAlignment: Int
    /// Size of the largest device-local memory heap.
    public var deviceLocalMemory: Int
    /// Whether device-local memory is also host-visible and coherent in bulk (CPU and integrated devices).
    public var unifiedMemory: Bool
    public var shaderFloat16: Bool
    public var storageBuffer16Bit: Bool
    public var shaderInt64: Bool
    public var bufferDeviceAddress: Bool
    public var floatAtomicAdd: Bool
    public var subgroupSizeControl: Bool
    /// Whether `VK_NV_cooperative_matrix` is available with its feature enabled.
    public var cooperativeMatrixNV: Bool
    /// Whether `VK_KHR_cooperative_matrix` is available with its feature enabled.
    public var cooperativeMatrixKHR: Bool = false
    /// Whether `VK_KHR_shader_bfloat16` is available with its `shaderBFloat16Type` and
    /// `shaderBFloat16CooperativeMatrix` features (bfloat16 operands of KHR cooperative matrices).
    public var bfloat16CooperativeMatrix: Bool = false
    /// The Vulkan memory model with device scope (what GL_KHR_memory_scope_semantics, used with
    /// cooperative matrices, needs once enabled: the kernels' atomics use device scope).
    public var vulkanMemoryModel: Bool
    /// The shapes `VK_NV_cooperative_matrix` offers.
    public var cooperativeMatrixShapes: [CooperativeMatrixShape]
    /// The subgroup-scope shapes `VK_KHR_cooperative_matrix` offers.
    public var cooperativeMatrixKHRShapes: [CooperativeMatrixShape] = []
    /// Streaming multiprocessors or compute units, where the driver says (NVIDIA's
    /// `VK_NV_shader_sm_builtins`, AMD's `VK_AMD_shader_core_properties`; a CPU device: its cores):
    /// what split-KV decoding sizes its splits by.
    public var computeUnits: Int? = nil
    public var timestampPeriodNs: Double
    public var timestamps: Bool
    public var extensions: [String]

    /// Whether a shader may use subgroup arithmetic reductions (`subgroupAdd`, `subgroupMax`) and shuffles.
    public var subgroupArithmetic: Bool { subgroupOperations.contains("arithmetic") }
}

extension DeviceCapabilities {
    static func query(_ pd: VkPhysicalDevice, index: Int, instance: VkInstance) -> DeviceCapabilities {
        let extensions = deviceExtensions(pd)

        var props = VkPhysicalDeviceProperties()
        vkGetPhysicalDeviceProperties(pd, &props)
        var v11 = VkPhysicalDeviceVulkan11Properties()
        v11.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_PROPERTIES
        var v12 = VkPhysicalDeviceVulkan12Properties()
        v12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_PROPERTIES
        var sizeControl = VkPhysicalDeviceSubgroupSizeControlProperties()
        sizeControl.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_PROPERTIES
        var sm = VkPhysicalDeviceShaderSMBuiltinsPropertiesNV()
        sm.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_SM_BUILTINS_PROPERTIES_NV
        var amd = VkPhysicalDeviceShaderCorePropertiesAMD()
        amd.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_CORE_PROPERTIES_AMD
        let apiMinor = (props.apiVersion >> 12) & 0x3ff
        withUnsafeMutablePointer(to: &v12) { v12p in
            withUnsafeMutablePointer(to: &sizeControl) { scp in
            withUnsafeMutablePointer(to: &sm) { smp in
            withUnsafeMutablePointer(to: &amd) { amdp in
                v11.pNext = UnsafeMutableRawPointer(v12p)
                var tail = UnsafeMutableRawPointer(v12p)
                func link(_ next: UnsafeMutableRawPointer) {
                    tail.assumingMemoryBound(to: VkBaseOutStructure.self).pointee.pNext = next.assumingMemoryBound(to: VkBaseOutStructure.self)
                    tail = next
                }
                if apiMinor >= 3 || extensions.contains("VK_EXT_subgroup_size_control") { link(UnsafeMutableRawPointer(scp)) }
                if extensions.contains("VK_NV_shader_sm_builtins") { link(UnsafeMutableRawPointer(smp)) }
                if extensions.contains("VK_AMD_shader_core_properties") { link(UnsafeMutableRawPointer(amdp)) }
                withUnsafeMutablePointer(to: &v11) { v11p in
                    var p2 = VkPhysicalDeviceProperties2()
                    p2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2
                    p2.pNext = UnsafeMutableRawPointer(v11p)
                    vkGetPhysicalDeviceProperties2(pd, &p2)
                }
            }}
            }
        }
        var computeUnits: Int?
        if extensions.contains("VK_NV_shader_sm_builtins"), sm.shaderSMCount > 0 { computeUnits = Int(sm.shaderSMCount) }
        if extensions.contains("VK_AMD_shader_core_properties"), amd.computeUnitsPerShaderArray > 0 {
            computeUnits = Int(amd.shaderEngineCount * amd.shaderArraysPerEngineCount * amd.computeUnitsPerShaderArray)
        }
        if DeviceType(props.deviceType) == .cpu { computeUnits = ProcessInfo.processInfo.activeProcessorCount }

        let features = DeviceFeatures.query(pd, extensions: extensions)

        var mem = VkPhysicalDeviceMemoryProperties()
        vkGetPhysicalDeviceMemoryProperties(pd, &mem)
        var deviceLocal = 0
        withUnsafeBytes(of: mem.memoryHeaps) { raw in
            let heaps = raw.bindMemory(to: VkMemoryHeap.self)
            for i in 0..<Int(mem.memoryHeapCount) where heaps[i].flags & VkMemoryHeapFlags(VK_MEMORY_HEAP_DEVICE_LOCAL_BIT.rawValue) != 0 {
                deviceLocal = max(deviceLocal, Int(heaps[i].size))
            }
        }
        let type = DeviceType(props.deviceType)

        var ops: [String] = []
        let names: [(VkSubgroupFeatureFlagBits, String)] = [
            (VK_SUBGROUP_FEATURE_BASIC_BIT, "basic"), (VK_SUBGROUP_FEATURE_VOTE_BIT, "vote"),
            (VK_SUBGROUP_FEATURE_ARITHMETIC_BIT, "arithmetic"), (VK_SUBGROUP_FEATURE_BALLOT_BIT, "ballot"),
            (VK_SUBGROUP_FEATURE_SHUFFLE_BIT, "shuffle"), (VK_SUBGROUP_FEATURE_SHUFFLE_RELATIVE_BIT, "shuffle_relative"),
            (VK_SUBGROUP_FEATURE_CLUSTERED_BIT, "clustered"), (VK_SUBGROUP_FEATURE_QUAD_BIT, "quad"),
        ]
        let computeStage = v11.subgroupSupportedStages & VkShaderStageFlags(VK_SHADER_STAGE_COMPUTE_BIT.rawValue) != 0
        if computeStage {
            for (bit, name) in names where v11.subgroupSupportedOperations & VkSubgroupFeatureFlags(bit.rawValue) != 0 {
                ops.append(name)
            }
        }

        func shape(_ m: UInt32, _ n: UInt32, _ k: UInt32, _ a: UInt32, _ b: UInt32, _ c: UInt32, _ r: UInt32) -> CooperativeMatrixShape {
            CooperativeMatrixShape(m: Int(m), n: Int(n), k: Int(k), a: componentName(a), b: componentName(b), c: componentName(c), result: componentName(r))
        }
        var shapes: [CooperativeMatrixShape] = []
        if features.cooperativeMatrixNV,
           let raw = vkGetInstanceProcAddr(instance, "vkGetPhysicalDeviceCooperativeMatrixPropertiesNV") {
            let fn = unsafeBitCast(raw, to: PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesNV.self)
            var template = VkCooperativeMatrixPropertiesNV()
            template.sType = VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_NV
            shapes = enumerated(template) { fn(pd, $0, $1) }.map {
                shape($0.MSize, $0.NSize, $0.KSize, $0.AType.rawValue, $0.BType.rawValue, $0.CType.rawValue, $0.DType.rawValue)
            }
        }
        var khrShapes: [CooperativeMatrixShape] = []
        if features.cooperativeMatrixKHR,
           let raw = vkGetInstanceProcAddr(instance, "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR") {
            let fn = unsafeBitCast(raw, to: PFN_vkflexGetPhysicalDeviceCooperativeMatrixPropertiesKHR.self)
            var template = VkflexCooperativeMatrixPropertiesKHR()
            template.sType = VkStructureType(rawValue: 1000506001)
            khrShapes = enumerated(template) { fn(pd, $0, $1) }.filter { $0.scope == 3 /* VK_SCOPE_SUBGROUP_KHR */ }.map {
                shape($0.MSize, $0.NSize, $0.KSize, $0.AType, $0.BType, $0.CType, $0.ResultType)
            }
        }

        let limits = props.limits
        let maxAlloc = Int(v11.maxMemoryAllocationSize)
        var caps = DeviceCapabilities(
            index: index,
            name: fixedString(props.deviceName),
            type: type,
            vendorID: props.vendorID, deviceID: props.deviceID,
            apiVersion: "\(props.apiVersion >> 22).\((props.apiVersion >> 12) & 0x3ff).\(props.apiVersion & 0xfff)",
            driverName: fixedString(v12.driverName),
            driverInfo: fixedString(v12.driverInfo),
            driverVersion: props.driverVersion,
            subgroupSize: Int(v11.subgroupSize),
            minSubgroupSize: Int(sizeControl.minSubgroupSize == 0 ? v11.subgroupSize : sizeControl.minSubgroupSize),
            maxSubgroupSize: Int(sizeControl.maxSubgroupSize == 0 ? v11.subgroupSize : sizeControl.maxSubgroupSize),
            subgroupOperations: ops,
            maxSharedMemory: Int(limits.maxComputeSharedMemorySize),
            maxStorageBufferRange: Int(limits.maxStorageBufferRange),
            maxMemoryAllocation: maxAlloc,
            maxWorkgroupInvocations: Int(limits.maxComputeWorkGroupInvocations),
            maxWorkgroupSize: [Int(limits.maxComputeWorkGroupSize.0), Int(limits.maxComputeWorkGroupSize.1), Int(limits.maxComputeWorkGroupSize.2)],
            maxWorkgroupCount: [Int(limits.maxComputeWorkGroupCount.0), Int(limits.maxComputeWorkGroupCount.1), Int(limits.maxComputeWorkGroupCount.2)],
            maxPushConstantsSize: Int(limits.maxPushConstantsSize),
            minStorageBufferOffsetAlignment: Int(limits.minStorageBufferOffsetAlignment),
            deviceLocalMemory: deviceLocal,
            unifiedMemory: type == .cpu || type == .integrated,
            shaderFloat16: features.shaderFloat16,
            storageBuffer16Bit: features.storageBuffer16Bit,
            shaderInt64: features.shaderInt64,
            bufferDeviceAddress: features.bufferDeviceAddress,
            floatAtomicAdd: features.floatAtomicAdd,
            subgroupSizeControl: features.subgroupSizeControl,
            cooperativeMatrixNV: features.cooperativeMatrixNV,
            cooperativeMatrixKHR: features.cooperativeMatrixKHR,
            vulkanMemoryModel: features.vulkanMemoryModel && features.vulkanMemoryModelDeviceScope,
            cooperativeMatrixShapes: shapes,
            cooperativeMatrixKHRShapes: khrShapes,
            timestampPeriodNs: Double(limits.timestampPeriod),
            timestamps: limits.timestampComputeAndGraphics != 0,
            extensions: extensions.sorted())
        caps.computeUnits = computeUnits
        caps.bfloat16CooperativeMatrix = features.bfloat16CooperativeMatrix && features.cooperativeMatrixKHR
        return caps
    }
}

func deviceExtensions(_ pd: VkPhysicalDevice) -> Set<String> {
    Set(enumerated(VkExtensionProperties()) { vkEnumerateDeviceExtensionProperties(pd, nil, $0, $1) }.map { fixedString($0.extensionName) })
}

/// Vulkan's two-call enumeration: the count, then that many copies of `template` filled in.
func enumerated<T>(_ template: T, _ call: (UnsafeMutablePointer<UInt32>, UnsafeMutablePointer<T>?) -> VkResult) -> [T] {
    var count: UInt32 = 0
    guard call(&count, nil) == VK_SUCCESS, count > 0 else { return [] }
    var list = [T](repeating: template, count: Int(count))
    guard list.withUnsafeMutableBufferPointer({ call(&count, $0.baseAddress) }) == VK_SUCCESS else { return [] }
    return Array(list.prefix(Int(count)))
}

/// `VkComponentTypeNV` / `VkComponentTypeKHR` (the same values) by name.
private func componentName(_ t: UInt32) -> String {
    switch t {
    case 0: "float16"
    case 1: "float32"
    case 2: "float64"
    case 3: "int8"
    case 4: "int16"
    case 5: "int32"
    case 6: "int64"
    case 7: "uint8"
    case 8: "uint16"
    case 9: "uint32"
    case 10: "uint64"
    case 1000141000: "bfloat16"
    default: "type\(t)"
    }
}

/// The optional features vkflex uses, as supported by a physical device.
struct DeviceFeatures {
    var shaderFloat16 = false
    var storageBuffer16Bit = false
    var shaderInt64 = false
    var bufferDeviceAddress = false
    var floatAtomicAdd = false
    var subgroupSizeControl = false
    var cooperativeMatrixNV = false
    var cooperativeMatrixKHR = false
    var bfloat16CooperativeMatrix = false
    var vulkanMemoryModel = false
    var vulkanMemoryModelDeviceScope = false

    static func query(_ pd: VkPhysicalDevice, extensions: Set<String>) -> DeviceFeatures {
        var v11 = VkPhysicalDeviceVulkan11Features()
        v11.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES
        var v12 = VkPhysicalDeviceVulkan12Features()
        v12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES
        var atomics = VkPhysicalDeviceShaderAtomicFloatFeaturesEXT()
        atomics.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_ATOMIC_FLOAT_FEATURES_EXT
        var coop = VkPhysicalDeviceCooperativeMatrixFeaturesNV()
        coop.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV
        var coopKHR = VkflexCooperativeMatrixFeaturesKHR()
        coopKHR.sType = VkStructureType(rawValue: 1000506000)
        var bf16 = VkflexShaderBfloat16FeaturesKHR()
        bf16.sType = VkStructureType(rawValue: 1000141000)
        var sizeControl = VkPhysicalDeviceSubgroupSizeControlFeatures()
        sizeControl.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_FEATURES
        var base = VkPhysicalDeviceFeatures2()
        base.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2
        withUnsafeMutablePointer(to: &v11) { p11 in
        withUnsafeMutablePointer(to: &v12) { p12 in
        withUnsafeMutablePointer(to: &atomics) { pa in
        withUnsafeMutablePointer(to: &coop) { pc in
        withUnsafeMutablePointer(to: &sizeControl) { ps in
        withUnsafeMutablePointer(to: &coopKHR) { pk in
        withUnsafeMutablePointer(to: &bf16) { pb in
            var chain: [UnsafeMutableRawPointer] = [UnsafeMutableRawPointer(p11), UnsafeMutableRawPointer(p12)]
            if extensions.contains("VK_EXT_shader_atomic_float") { chain.append(UnsafeMutableRawPointer(pa)) }
            if extensions.contains("VK_NV_cooperative_matrix") { chain.append(UnsafeMutableRawPointer(pc)) }
            if extensions.contains("VK_EXT_subgroup_size_control") { chain.append(UnsafeMutableRawPointer(ps)) }
            if extensions.contains("VK_KHR_cooperative_matrix") { chain.append(UnsafeMutableRawPointer(pk)) }
            if extensions.contains("VK_KHR_shader_bfloat16") { chain.append(UnsafeMutableRawPointer(pb)) }
            linkChain(chain)
            base.pNext = chain[0]
            vkGetPhysicalDeviceFeatures2(pd, &base)
        }}}}}}}
        var f = DeviceFeatures()
        f.shaderFloat16 = v12.shaderFloat16 != 0
        f.storageBuffer16Bit = v11.storageBuffer16BitAccess != 0
        f.shaderInt64 = base.features.shaderInt64 != 0
        f.bufferDeviceAddress = v12.bufferDeviceAddress != 0
        f.vulkanMemoryModel = v12.vulkanMemoryModel != 0
        f.vulkanMemoryModelDeviceScope = v12.vulkanMemoryModelDeviceScope != 0
        f.floatAtomicAdd = extensions.contains("VK_EXT_shader_atomic_float") && atomics.shaderBufferFloat32AtomicAdd != 0
        f.subgroupSizeControl = extensions.contains("VK_EXT_subgroup_size_control") && sizeControl.subgroupSizeControl != 0
        f.cooperativeMatrixNV = extensions.contains("VK_NV_cooperative_matrix") && coop.cooperativeMatrix != 0
        f.cooperativeMatrixKHR = extensions.contains("VK_KHR_cooperative_matrix") && coopKHR.cooperativeMatrix != 0
        f.bfloat16CooperativeMatrix = extensions.contains("VK_KHR_shader_bfloat16") && bf16.shaderBFloat16Type != 0
            && bf16.shaderBFloat16CooperativeMatrix != 0
        return f
    }
}

/// Links Vulkan structures through their `pNext` fields (each starts with sType, pNext).
func linkChain(_ chain: [UnsafeMutableRawPointer]) {
    for (i, p) in chain.enumerated() {
        let next: UnsafeMutableRawPointer? = i + 1 < chain.count ? chain[i + 1] : nil
        p.advanced(by: MemoryLayout<VkStructureType>.stride.roundedUp(to: MemoryLayout<UnsafeRawPointer>.alignment))
            .storeBytes(of: next, as: UnsafeMutableRawPointer?.self)
    }
}

extension Int {
    func roundedUp(to multiple: Int) -> Int { (self + multiple - 1) / multiple * multiple }
}
