import CVulkan
import Foundation

/// A Vulkan device with one compute queue: it owns buffers, the pipeline cache and the command
/// batches that carry work to the GPU.
///
/// ```swift
/// let device = try Device.default()          // discrete > integrated > virtual > CPU; VKFLEX_DEVICE overrides
/// print(device.capabilities.name, device.capabilities.subgroupSize)
/// let buffer = try device.makeBuffer(bytes: 1024)
/// try buffer.upload([Float](repeating: 1, count: 256))
/// ```
///
/// The device is safe to use from several threads: its queue, command pool, batches and caches
/// sit behind locks. Vulkan handles are C pointers and are not `Sendable`; they never leave it
/// except through the interop accessors.
public final class Device: @unchecked Sendable {
    /// Options for opening a device.
    public struct Options: Sendable {
        /// Enable the Khronos validation layer; `nil` reads `VKFLEX_VALIDATE` (`1` enables).
        public var validation: Bool?
        /// Where the persistent `VkPipelineCache` lives; `nil` means `$VKFLEX_CACHE_DIR`, else
        /// `$XDG_CACHE_HOME/vkflex`, else `~/.cache/vkflex`. `VKFLEX_PIPELINE_CACHE=0` disables it.
        public var pipelineCacheDirectory: URL?
        /// Submit the current batch once it holds this many commands.
        public var maxCommandsPerBatch: Int
        /// Turn on float atomic adds where the device has them (`VK_EXT_shader_atomic_float`);
        /// false, or `VKFLEX_FLOAT_ATOMICS=0`, makes the kernels take their path without them (the
        /// captures' gradients then go through per-workgroup partial sums), as on devices that lack them.
        public var floatAtomics: Bool
        /// Shaders whose pipelines record how their workgroups sat on the compute units
        /// (``Device/takeResidency()``): comma-separated names, or `all`; `nil` reads
        /// `VKFLEX_RESIDENCY`. A tuning tool: probed pipelines do extra work.
        public var residency: String?
        /// The most bytes of freed large buffers (over ``Device/maxPooledBufferBytes``) the device
        /// keeps for reuse, as PyTorch's caching allocator does (``Device/cachedBytes``); `nil`
        /// reads `VKFLEX_BUFFER_CACHE_MB`, else a quarter of the device-local memory, at most 8 GiB
        /// (256 MiB on a CPU device, whose allocations cost little); 0 frees every large buffer at once.
        public var bufferCacheBytes: Int?

        public init(validation: Bool? = nil, pipelineCacheDirectory: URL? = nil, maxCommandsPerBatch: Int = 256,
                    floatAtomics: Bool = true, residency: String? = nil, bufferCacheBytes: Int? = nil) {
            self.validation = validation
            self.pipelineCacheDirectory = pipelineCacheDirectory
            self.maxCommandsPerBatch = maxCommandsPerBatch
            self.floatAtomics = floatAtomics
            self.residency = residency
            self.bufferCacheBytes = bufferCacheBytes
        }

        /// The large-buffer cache's limit on a device with `deviceLocalMemory` bytes.
        func bufferCacheLimit(deviceLocalMemory: Int, cpu: Bool) throws -> Int {
            if let bufferCacheBytes {
                guard bufferCacheBytes >= 0 else { throw FlexError.invalidArgument("bufferCacheBytes is \(bufferCacheBytes); it must be 0 or more") }
                return bufferCacheBytes
            }
            if let text = ProcessInfo.processInfo.environment["VKFLEX_BUFFER_CACHE_MB"], !text.isEmpty {
                guard let mb = Int(text), mb >= 0, mb <= 1 << 40 else {
                    throw FlexError.invalidArgument("VKFLEX_BUFFER_CACHE_MB=\(text): use a whole number of MiB, 0 or more (0 turns the cache off)")
                }
                return mb << 20
            }
            return cpu ? 256 << 20 : min(deviceLocalMemory / 4, 8 << 30)
        }

        var validationEnabled: Bool {
            validation ?? (ProcessInfo.processInfo.environment["VKFLEX_VALIDATE"] == "1")
        }
    }

    /// What the device is and can do.
    public let capabilities: DeviceCapabilities
    let instance: Instance
    /// The `VkPhysicalDevice` (interop).
    public let physicalDevice: VkPhysicalDevice
    /// The `VkDevice` (interop).
    public let handle: VkDevice
    /// The compute queue; submissions to it must go through ``withQueue(_:)`` (interop).
    let queue: VkQueue
    /// The queue family of ``queue``.
    public let queueFamilyIndex: UInt32
    let ownsDevice: Bool
    let options: Options
    /// Features enabled on the logical device.
    public let enabledFeatures: EnabledFeatures

    let memoryProperties: VkPhysicalDeviceMemoryProperties
    let lock = NSLock()
    var commandPool: VkCommandPool?
    var recording: Batch?
    var inFlight: [Batch] = []
    var spareBatches: [RecycledBatch] = []
    var nextBatchID: UInt64 = 1
    let pipelines: PipelineCache
    let bufferPool: BufferPool
    var measuredLayout: CooperativeMatrixLayout??
    /// The `VKFLEX_*` environment variables as they were when the device opened: tuning is read
    /// from here, once, never from the environment on a call's path.
    public let environment: [String: String] = ProcessInfo.processInfo.environment.filter { $0.key.hasPrefix("VKFLEX_") }
    private var memos: [String: any Sendable] = [:]
    /// A value computed once per device for `key` (the layers above keep their parsed settings,
    /// measurements and shared scratch buffers here). `make` runs outside the device's lock (it
    /// may use the device); when two threads race, the first value stored wins.
    ///
    /// - Throws: what `make` throws (nothing is remembered then).
    public func memoized<T: Sendable>(_ key: String, _ make: () throws -> T) throws -> T {
        if let known = lock.withLock({ memos[key] as? T }) { return known }
        let value = try make()
        return lock.withLock {
            if let first = memos[key] as? T { return first }
            memos[key] = value
            return value
        }
    }

    /// Whether pipelines are built with statistics, printed as they are built (`VKFLEX_PIPELINE_STATS=1`).
    let reportsPipelineStatistics: Bool
    /// `VKFLEX_PROFILE=1`: every dispatch is bracketed by GPU timestamps, collected by
    /// ``takeDispatchProfile()`` — where a call's device time goes, pass by pass. They are kept
    /// until taken: a tool, not for a long-running process.
    public let profilesDispatches = ProcessInfo.processInfo.environment["VKFLEX_PROFILE"] == "1"
    /// The bracketed dispatches since the last ``takeDispatchProfile()`` (under `lock`).
    var dispatchProfile: [(name: String, start: GPUTimestamp, end: GPUTimestamp)] = []
    /// Where the driver's internal representations of every pipeline built are written
    /// (`VKFLEX_PIPELINE_IR=dir`; only drivers that offer them through
    /// `VK_KHR_pipeline_executable_properties` write anything).
    let pipelineIRDirectory: String?
    /// `VKFLEX_RESIDENCY`'s probe (``takeResidency()``), nil when unset or the device lacks its clocks.
    let residency: ResidencyProbe?

    /// The features vkflex turned on when it created the logical device.
    public struct EnabledFeatures: Sendable {
        public var shaderFloat16 = false
        public var storageBuffer16Bit = false
        public var bufferDeviceAddress = false
        public var cooperativeMatrixNV = false
        /// `VK_KHR_cooperative_matrix`: vkflex's cooperative-matrix shaders (written against the NV
        /// extension) are rewritten to it when they are built (``CooperativeMatrixKHRRewriter``).
        public var cooperativeMatrixKHR = false
        public var subgroupSizeControl = false
        public var vulkanMemoryModel = false
        /// `VK_EXT_shader_atomic_float`'s `shaderBufferFloat32AtomicAdd`: the backward scatters the
        /// gradients of captured tensors with float atomic adds where it is enabled.
        public var floatAtomicAdd = false
        /// `VK_KHR_shader_bfloat16` with bfloat16 cooperative matrices: bfloat16 inputs go through
        /// the cooperative-matrix kernels with bfloat16 operands (``BFloat16Retyper``).
        public var bfloat16CooperativeMatrix = false
        public init(shaderFloat16: Bool = false, storageBuffer16Bit: Bool = false, bufferDeviceAddress: Bool = false,
                    cooperativeMatrixNV: Bool = false, cooperativeMatrixKHR: Bool = false, subgroupSizeControl: Bool = false,
                    vulkanMemoryModel: Bool = false, floatAtomicAdd: Bool = false, bfloat16CooperativeMatrix: Bool = false) {
            self.shaderFloat16 = shaderFloat16
            self.storageBuffer16Bit = storageBuffer16Bit
            self.bufferDeviceAddress = bufferDeviceAddress
            self.cooperativeMatrixNV = cooperativeMatrixNV
            self.cooperativeMatrixKHR = cooperativeMatrixKHR
            self.subgroupSizeControl = subgroupSizeControl
            self.vulkanMemoryModel = vulkanMemoryModel
            self.floatAtomicAdd = floatAtomicAdd
            self.bfloat16CooperativeMatrix = bfloat16CooperativeMatrix
        }
    }

    // MARK: - Choosing a device

    /// The capabilities of every Vulkan device present, in enumeration order (their `index`).
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public static func availableDevices(validation: Bool? = nil) throws -> [DeviceCapabilities] {
        let instance = try Instance.shared(validation: Options(validation: validation).validationEnabled)
        return try instance.physicalDevices().enumerated().map {
            DeviceCapabilities.query($0.element, index: $0.offset, instance: instance.handle)
        }
    }

    /// Opens the preferred device: `VKFLEX_DEVICE` (an index or a case-insensitive name substring)
    /// when set, else the first discrete GPU, then integrated, virtual, CPU (lavapipe).
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public static func `default`(options: Options = Options()) throws -> Device {
        try Device(selector: ProcessInfo.processInfo.environment["VKFLEX_DEVICE"], options: options)
    }

    /// Opens the device that `selector` names: an index into ``availableDevices(validation:)`` or a
    /// case-insensitive substring of its name; `nil` or empty picks by type preference.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public convenience init(selector: String?, options: Options = Options()) throws {
        let instance = try Instance.shared(validation: options.validationEnabled)
        let physical = try instance.physicalDevices()
        guard !physical.isEmpty else {
            throw FlexError.noDevice("no Vulkan device found (install mesa-vulkan-drivers for the lavapipe CPU device)")
        }
        let caps = physical.enumerated().map { DeviceCapabilities.query($0.element, index: $0.offset, instance: instance.handle) }
        let chosen = try Device.choose(caps, selector: selector)
        try self.init(instance: instance, physicalDevice: physical[chosen], capabilities: caps[chosen], options: options)
    }

    /// The index `selector` picks among `caps` (see ``init(selector:options:)``).
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public static func choose(_ caps: [DeviceCapabilities], selector: String?) throws -> Int {
        if let selector = selector?.trimmingCharacters(in: .whitespaces), !selector.isEmpty {
            if let index = Int(selector) {
                guard caps.indices.contains(index) else {
                    throw FlexError.noDevice("device \"\(selector)\": no device with that index; devices: \(Device.listing(caps))")
                }
                return index
            }
            if let match = caps.first(where: { $0.name.lowercased().contains(selector.lowercased()) }) {
                return match.index
            }
            throw FlexError.noDevice("device \"\(selector)\": no device name contains it; devices: \(Device.listing(caps))")
        }
        return caps.min { ($0.type, $0.index) < ($1.type, $1.index) }!.index
    }

    static func listing(_ caps: [DeviceCapabilities]) -> String {
        caps.map { "\($0.index): \($0.name)" }.joined(separator: ", ")
    }

    // MARK: - Creating

    private init(instance: Instance, physicalDevice: VkPhysicalDevice, capabilities caps: DeviceCapabilities, options: Options) throws {
        self.instance = instance
        self.physicalDevice = physicalDevice
        self.capabilities = caps
        self.options = options
        self.bufferPool = BufferPool(largeLimit: try options.bufferCacheLimit(deviceLocalMemory: caps.deviceLocalMemory, cpu: caps.type == .cpu))
        self.ownsDevice = true

        let family = try Device.computeQueueFamily(physicalDevice)
        var enabled = EnabledFeatures()
        enabled.shaderFloat16 = caps.shaderFloat16
        enabled.storageBuffer16Bit = caps.storageBuffer16Bit
        enabled.bufferDeviceAddress = caps.bufferDeviceAddress
        enabled.floatAtomicAdd = caps.floatAtomicAdd && options.floatAtomics && ProcessInfo.processInfo.environment["VKFLEX_FLOAT_ATOMICS"] != "0"
        // Cooperative-matrix shaders declare the Vulkan memory model (GL_KHR_memory_scope_semantics).
        switch try CooperativeMatrixAPI.choice(caps, validationLayer: instance.loadedValidationLayerVersion()) {
        case .khr?: enabled.cooperativeMatrixKHR = true
        case .nv?: enabled.cooperativeMatrixNV = true
        case nil: break
        }
        enabled.vulkanMemoryModel = enabled.cooperativeMatrixNV || enabled.cooperativeMatrixKHR
        enabled.bfloat16CooperativeMatrix = enabled.cooperativeMatrixKHR && caps.bfloat16CooperativeMatrix
            && CooperativeMatrixAPI.layerKnowsBFloat16(instance.loadedValidationLayerVersion())
            && ProcessInfo.processInfo.environment["VKFLEX_BF16_COOPMAT"] != "0"
        var extensions: [String] = []
        if enabled.cooperativeMatrixNV { extensions.append("VK_NV_cooperative_matrix") }
        if enabled.cooperativeMatrixKHR { extensions.append("VK_KHR_cooperative_matrix") }
        if enabled.bfloat16CooperativeMatrix { extensions.append("VK_KHR_shader_bfloat16") }
        if enabled.floatAtomicAdd { extensions.append("VK_EXT_shader_atomic_float") }
        if caps.extensions.contains("VK_KHR_portability_subset") { extensions.append("VK_KHR_portability_subset") }
        // VKFLEX_PIPELINE_STATS=1: the driver's statistics of every pipeline built (registers,
        // spills, ...) go to standard error, for tuning kernels.
        // VKFLEX_PIPELINE_IR=dir: the driver's internal representations (if it offers any) go to
        // files in dir.
        let hasExec = caps.extensions.contains("VK_KHR_pipeline_executable_properties")
        let irDir = hasExec ? ProcessInfo.processInfo.environment["VKFLEX_PIPELINE_IR"].flatMap { $0.isEmpty ? nil : $0 } : nil
        let stats = (ProcessInfo.processInfo.environment["VKFLEX_PIPELINE_STATS"] == "1" && hasExec) || irDir != nil
        if stats { extensions.append("VK_KHR_pipeline_executable_properties") }
        // VKFLEX_RESIDENCY: the shader clocks (and NVIDIA's SM id) that the probe records.
        var clock = VkPhysicalDeviceShaderClockFeaturesKHR()
        clock.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_CLOCK_FEATURES_KHR
        var smb = VkPhysicalDeviceShaderSMBuiltinsFeaturesNV()
        smb.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_SM_BUILTINS_FEATURES_NV
        var probe: ResidencyProbe?
        let residencyRequest = ResidencyProbe.requested(options.residency ?? ProcessInfo.processInfo.environment["VKFLEX_RESIDENCY"])
        if let shaders = residencyRequest, caps.extensions.contains("VK_KHR_shader_clock"), enabled.bufferDeviceAddress {
            let hasSM = caps.extensions.contains("VK_NV_shader_sm_builtins")
            withUnsafeMutablePointer(to: &clock) { pc in
                withUnsafeMutablePointer(to: &smb) { ps in
                    if hasSM { pc.pointee.pNext = UnsafeMutableRawPointer(ps) }
                    var f2 = VkPhysicalDeviceFeatures2()
                    f2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2
                    f2.pNext = UnsafeMutableRawPointer(pc)
                    vkGetPhysicalDeviceFeatures2(physicalDevice, &f2)
                    pc.pointee.pNext = nil
                }
            }
            if clock.shaderSubgroupClock != 0 {
                extensions.append("VK_KHR_shader_clock")
                let sm = hasSM && smb.shaderSMBuiltins != 0
                if sm { extensions.append("VK_NV_shader_sm_builtins") }
                probe = ResidencyProbe(shaders: shaders, smBuiltins: sm, deviceClock: clock.shaderDeviceClock != 0)
            }
        }
        if residencyRequest != nil && probe == nil {
            FileHandle.standardError.write(Data("vkflex: VKFLEX_RESIDENCY ignored: \(caps.name) lacks shader clocks (VK_KHR_shader_clock) or buffer device addresses\n".utf8))
        }
        var exec = VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR()
        exec.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR
        exec.pipelineExecutableInfo = VkBool32(1)

        var v11 = VkPhysicalDeviceVulkan11Features()
        v11.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES
        v11.storageBuffer16BitAccess = VkBool32(enabled.storageBuffer16Bit ? 1 : 0)
        var v12 = VkPhysicalDeviceVulkan12Features()
        v12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES
        v12.shaderFloat16 = VkBool32(enabled.shaderFloat16 ? 1 : 0)
        v12.bufferDeviceAddress = VkBool32(enabled.bufferDeviceAddress ? 1 : 0)
        v12.vulkanMemoryModel = VkBool32(enabled.vulkanMemoryModel ? 1 : 0)
        v12.vulkanMemoryModelDeviceScope = VkBool32(enabled.vulkanMemoryModel ? 1 : 0)
        var coop = VkPhysicalDeviceCooperativeMatrixFeaturesNV()
        coop.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV
        coop.cooperativeMatrix = VkBool32(1)
        var atomics = VkPhysicalDeviceShaderAtomicFloatFeaturesEXT()
        atomics.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_ATOMIC_FLOAT_FEATURES_EXT
        atomics.shaderBufferFloat32AtomicAdd = VkBool32(1)
        var coopKHR = VkflexCooperativeMatrixFeaturesKHR()
        coopKHR.sType = VkStructureType(rawValue: 1000506000)
        coopKHR.cooperativeMatrix = VkBool32(1)
        var bf16 = VkflexShaderBfloat16FeaturesKHR()
        bf16.sType = VkStructureType(rawValue: 1000141000)
        bf16.shaderBFloat16Type = VkBool32(1)
        bf16.shaderBFloat16CooperativeMatrix = VkBool32(1)

        var device: VkDevice?
        var priority: Float = 1
        let result: VkResult = withCStrings(extensions) { extPtrs in
            withUnsafeMutablePointer(to: &v11) { p11 in
            withUnsafeMutablePointer(to: &v12) { p12 in
            withUnsafeMutablePointer(to: &coop) { pc in
            withUnsafeMutablePointer(to: &coopKHR) { pk in
            withUnsafeMutablePointer(to: &exec) { pe in
            withUnsafeMutablePointer(to: &atomics) { pa in
            withUnsafeMutablePointer(to: &bf16) { pb in
            withUnsafeMutablePointer(to: &clock) { pclk in
            withUnsafeMutablePointer(to: &smb) { psm in
            withUnsafePointer(to: &priority) { prio in
                var chain = [UnsafeMutableRawPointer(p11), UnsafeMutableRawPointer(p12)]
                if enabled.cooperativeMatrixNV { chain.append(UnsafeMutableRawPointer(pc)) }
                if enabled.cooperativeMatrixKHR { chain.append(UnsafeMutableRawPointer(pk)) }
                if stats { chain.append(UnsafeMutableRawPointer(pe)) }
                if enabled.floatAtomicAdd { chain.append(UnsafeMutableRawPointer(pa)) }
                if enabled.bfloat16CooperativeMatrix { chain.append(UnsafeMutableRawPointer(pb)) }
                if probe != nil { chain.append(UnsafeMutableRawPointer(pclk)) }
                if probe?.smBuiltins == true { chain.append(UnsafeMutableRawPointer(psm)) }
                linkChain(chain)
                var queueInfo = VkDeviceQueueCreateInfo()
                queueInfo.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO
                queueInfo.queueFamilyIndex = family
                queueInfo.queueCount = 1
                queueInfo.pQueuePriorities = prio
                return withUnsafePointer(to: &queueInfo) { qi in
                    var info = VkDeviceCreateInfo()
                    info.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO
                    info.pNext = UnsafeRawPointer(chain[0])
                    info.queueCreateInfoCount = 1
                    info.pQueueCreateInfos = qi
                    info.enabledExtensionCount = UInt32(extPtrs.count)
                    info.ppEnabledExtensionNames = extPtrs.baseAddress
                    return vkCreateDevice(physicalDevice, &info, nil, &device)
                }
            }}}}}}}}}}
        }
        try check(result, "vkCreateDevice")
        guard let device else { throw FlexError.vulkan(call: "vkCreateDevice", result: VK_ERROR_INITIALIZATION_FAILED.rawValue) }
        var queue: VkQueue?
        vkGetDeviceQueue(device, family, 0, &queue)
        self.handle = device
        self.queue = queue!
        self.queueFamilyIndex = family
        self.enabledFeatures = enabled
        self.reportsPipelineStatistics = stats
        self.pipelineIRDirectory = irDir
        self.residency = probe
        var mem = VkPhysicalDeviceMemoryProperties()
        vkGetPhysicalDeviceMemoryProperties(physicalDevice, &mem)
        self.memoryProperties = mem
        self.pipelines = PipelineCache()
        try finishSetup()
    }

    /// Wraps Vulkan objects that an engine already owns; vkflex destroys none of them.
    ///
    /// The engine must have enabled, on `device`, the features listed in `enabledFeatures`
    /// (vkflex's kernels use 16-bit storage and fp16 arithmetic when they are there), and must not
    /// submit to `queue` concurrently with vkflex.
    ///
    /// ```swift
    /// // snippet: skip (needs an engine's Vulkan handles)
    /// let device = try Device(wrapping: myInstance, physicalDevice: myGPU, device: myDevice,
    ///                         queue: myQueue, queueFamilyIndex: family,
    ///                         enabledFeatures: .init(shaderFloat16: true, storageBuffer16Bit: true))
    /// ```
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public init(wrapping instance: VkInstance, physicalDevice: VkPhysicalDevice, device: VkDevice,
                queue: VkQueue, queueFamilyIndex: UInt32, enabledFeatures: EnabledFeatures,
                options: Options = Options()) throws {
        self.instance = Instance(borrowing: instance)
        self.physicalDevice = physicalDevice
        var caps = DeviceCapabilities.query(physicalDevice, index: 0, instance: instance)
        caps.cooperativeMatrixNV = caps.cooperativeMatrixNV && enabledFeatures.cooperativeMatrixNV
        caps.cooperativeMatrixKHR = caps.cooperativeMatrixKHR && enabledFeatures.cooperativeMatrixKHR
        caps.floatAtomicAdd = caps.floatAtomicAdd && enabledFeatures.floatAtomicAdd
        caps.bfloat16CooperativeMatrix = caps.bfloat16CooperativeMatrix && enabledFeatures.bfloat16CooperativeMatrix
        self.capabilities = caps
        self.handle = device
        self.queue = queue
        self.queueFamilyIndex = queueFamilyIndex
        self.ownsDevice = false
        self.options = options
        self.bufferPool = BufferPool(largeLimit: try options.bufferCacheLimit(deviceLocalMemory: caps.deviceLocalMemory, cpu: caps.type == .cpu))
        self.enabledFeatures = enabledFeatures
        self.reportsPipelineStatistics = false
        self.pipelineIRDirectory = nil
        self.residency = nil
        var mem = VkPhysicalDeviceMemoryProperties()
        vkGetPhysicalDeviceMemoryProperties(physicalDevice, &mem)
        self.memoryProperties = mem
        self.pipelines = PipelineCache()
        try finishSetup()
    }

    private func finishSetup() throws {
        var poolInfo = VkCommandPoolCreateInfo()
        poolInfo.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO
        poolInfo.flags = VkCommandPoolCreateFlags(VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT.rawValue)
        poolInfo.queueFamilyIndex = queueFamilyIndex
        var pool: VkCommandPool?
        try check(vkCreateCommandPool(handle, &poolInfo, nil, &pool), "vkCreateCommandPool")
        commandPool = pool
        pipelines.attach(device: self)
    }

    deinit {
        _ = try? synchronize()
        vkDeviceWaitIdle(handle)
        pipelines.destroyAll(device: handle)
        bufferPool.drain(handle)
        for spare in spareBatches {
            vkDestroyFence(handle, spare.fence, nil)
            for pool in spare.descriptorPools { vkDestroyDescriptorPool(handle, pool, nil) }
        }
        if let commandPool { vkDestroyCommandPool(handle, commandPool, nil) }
        if ownsDevice { vkDestroyDevice(handle, nil) }
    }

    static func computeQueueFamily(_ pd: VkPhysicalDevice) throws -> UInt32 {
        var count: UInt32 = 0
        vkGetPhysicalDeviceQueueFamilyProperties(pd, &count, nil)
        var families = [VkQueueFamilyProperties](repeating: VkQueueFamilyProperties(), count: Int(count))
        vkGetPhysicalDeviceQueueFamilyProperties(pd, &count, &families)
        let compute = VkQueueFlags(VK_QUEUE_COMPUTE_BIT.rawValue)
        let candidates = families.enumerated().filter { $0.element.queueFlags & compute != 0 }
        guard !candidates.isEmpty else { throw FlexError.unsupported("the device has no compute queue") }
        // Prefer a family with timestamps; among those, the first.
        let best = candidates.first { $0.element.timestampValidBits > 0 } ?? candidates[0]
        return UInt32(best.offset)
    }

    // MARK: - Memory types

    func memoryTypeIndex(bits: UInt32, required: VkMemoryPropertyFlags, preferred: VkMemoryPropertyFlags = 0) -> (index: UInt32, flags: VkMemoryPropertyFlags)? {
        let types = withUnsafeBytes(of: memoryProperties.memoryTypes) { Array($0.bindMemory(to: VkMemoryType.self)) }
        var fallback: (UInt32, VkMemoryPropertyFlags)?
        for i in 0..<Int(memoryProperties.memoryTypeCount) where bits & (1 << UInt32(i)) != 0 {
            let flags = types[i].propertyFlags
            guard flags & required == required else { continue }
            if flags & preferred == preferred { return (UInt32(i), flags) }
            if fallback == nil { fallback = (UInt32(i), flags) }
        }
        return fallback
    }

    func heapSize(ofType index: UInt32) -> Int {
        let types = withUnsafeBytes(of: memoryProperties.memoryTypes) { Array($0.bindMemory(to: VkMemoryType.self)) }
        let heaps = withUnsafeBytes(of: memoryProperties.memoryHeaps) { Array($0.bindMemory(to: VkMemoryHeap.self)) }
        return Int(heaps[Int(types[Int(index)].heapIndex)].size)
    }
}

/// Which cooperative-matrix extension a device's kernels go through.
///
/// vkflex's cooperative-matrix shaders are written against `GL_NV_cooperative_matrix` (what
/// Debian 12's glslang compiles); on a device with `VK_KHR_cooperative_matrix` they are rewritten
/// to it when built, so that each matrix carries its use (A, B or accumulator) and NVIDIA's
/// compiler loads B operands in their own layout instead of transposing them at every product.
/// `VKFLEX_COOPMAT_API=nv|khr` forces one (for comparisons); the default is `khr` where the
/// device has it.
///
/// ```swift
/// let device = try Device.default()
/// print(device.cooperativeMatrixAPI ?? "none")   // khr on an H200 with driver 580
/// ```
public enum CooperativeMatrixAPI: String, Sendable, CustomStringConvertible {
    case nv, khr
    public var description: String { rawValue }

    /// The extension to enable on a device with `caps`: `VKFLEX_COOPMAT_API` when set, else KHR,
    /// else NV; nil when it has neither (or no Vulkan memory model, which both need).
    ///
    /// Under a Khronos validation layer older than 1.3.255 (Debian 12 ships 1.3.239), which
    /// predates `VK_KHR_cooperative_matrix` and would report its structures and SPIR-V as
    /// errors, the default is NV where the device has it.
    static func choice(_ caps: DeviceCapabilities, validationLayer: UInt32? = nil) throws -> CooperativeMatrixAPI? {
        guard caps.vulkanMemoryModel else { return nil }
        let env = (ProcessInfo.processInfo.environment["VKFLEX_COOPMAT_API"] ?? "").lowercased()
        switch env {
        case "", "auto":
            let layerKnowsKHR = validationLayer.map { $0 >= firstLayerWithKHR } ?? true
            if caps.cooperativeMatrixKHR && (layerKnowsKHR || !caps.cooperativeMatrixNV) { return .khr }
            return caps.cooperativeMatrixNV ? .nv : nil
        case "nv", "khr":
            let api = CooperativeMatrixAPI(rawValue: env)!
            // A device without the forced extension has no cooperative matrices at all.
            return (api == .nv ? caps.cooperativeMatrixNV : caps.cooperativeMatrixKHR) ? api : nil
        default:
            throw FlexError.unsupported("VKFLEX_COOPMAT_API=\(env): use nv, khr or auto")
        }
    }

    /// Vulkan 1.3.255, the first version with `VK_KHR_cooperative_matrix`.
    static let firstLayerWithKHR: UInt32 = (1 << 22) | (3 << 12) | 255

    /// Whether a Khronos validation layer of this version (nil: none loaded) checks
    /// `VK_KHR_shader_bfloat16`'s structures and SPIR-V. An older layer (Debian 12's 1.3.239)
    /// would report them as errors, so bfloat16 cooperative matrices stay off under it and bf16
    /// takes the kernels that compute in float32. 1.4.321: the first layer with the extension's
    /// cooperative-matrix component types fixed (Vulkan-ValidationLayers #10308, June 2025).
    static func layerKnowsBFloat16(_ layer: UInt32?) -> Bool { layer.map { $0 >= (1 << 22) | (4 << 12) | 321 } ?? true }
}

extension Device {
    /// The cooperative-matrix extension enabled on this device, or nil.
    public var cooperativeMatrixAPI: CooperativeMatrixAPI? {
        enabledFeatures.cooperativeMatrixKHR ? .khr : enabledFeatures.cooperativeMatrixNV ? .nv : nil
    }

    /// The cooperative-matrix shapes of the extension in use (empty without one).
    public var cooperativeMatrixShapes: [CooperativeMatrixShape] {
        switch cooperativeMatrixAPI {
        case .khr?: capabilities.cooperativeMatrixKHRShapes
        case .nv?: capabilities.cooperativeMatrixShapes
        case nil: []
        }
    }
}
