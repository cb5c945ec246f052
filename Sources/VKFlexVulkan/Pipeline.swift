import VKFlexSPIRV
import CVulkan
import Foundation

/// What a compute pipeline is made of (Kompute's "algorithm"): a shader, the number of storage
/// buffers it binds (set 0, bindings 0..<n), the size of its push constants, and the values of its
/// specialization constants (`constant_id = i` gets `specialization[i]`).
public struct PipelineDescription: Sendable {
    public var source: ShaderSource
    public var bindingCount: Int
    public var pushConstantSize: Int
    public var specialization: [UInt32]
    /// Generated include files (e.g. the spliced mods), added to the shader library for this compile.
    public var includes: [String: String]
    /// The shader's `VK_NV_cooperative_matrix` code goes to the driver rewritten for
    /// `VK_KHR_cooperative_matrix` (`CooperativeMatrixKHRRewriter`): the caller's plan decides,
    /// and the device must have the KHR extension enabled.
    public var cooperativeMatrixKHR: Bool
    /// The shader's 16-bit floats go to the driver as bfloat16 (``BFloat16Retyper``, after the KHR
    /// rewrite): the caller's plan decides, and the device must have bfloat16 cooperative matrices
    /// enabled.
    public var bfloat16Operands: Bool

    public init(source: ShaderSource, bindingCount: Int, pushConstantSize: Int = 0, specialization: [UInt32] = [],
                includes: [String: String] = [:], cooperativeMatrixKHR: Bool = false, bfloat16Operands: Bool = false) {
        self.source = source
        self.bindingCount = bindingCount
        self.pushConstantSize = pushConstantSize
        self.specialization = specialization
        self.includes = includes
        self.cooperativeMatrixKHR = cooperativeMatrixKHR
        self.bfloat16Operands = bfloat16Operands
    }
}

/// A compiled compute pipeline with its layouts.
public final class ComputePipeline: @unchecked Sendable {
    public let name: String
    let pipeline: VkPipeline
    let layout: VkPipelineLayout
    let setLayout: VkDescriptorSetLayout
    public let bindingCount: Int
    public let pushConstantSize: Int
    /// Seconds spent in shaderc and in `vkCreateComputePipelines`.
    public let compileSeconds: Double
    public let createSeconds: Double
    weak var device: Device?
    var destroyed = false

    init(name: String, pipeline: VkPipeline, layout: VkPipelineLayout, setLayout: VkDescriptorSetLayout,
         bindingCount: Int, pushConstantSize: Int, compileSeconds: Double, createSeconds: Double, device: Device) {
        self.name = name
        self.pipeline = pipeline
        self.layout = layout
        self.setLayout = setLayout
        self.bindingCount = bindingCount
        self.pushConstantSize = pushConstantSize
        self.compileSeconds = compileSeconds
        self.createSeconds = createSeconds
        self.device = device
    }

    deinit {
        if let device { destroy(device.handle) }
    }

    func destroy(_ device: VkDevice) {
        guard !destroyed else { return }
        destroyed = true
        vkDestroyPipeline(device, pipeline, nil)
        vkDestroyPipelineLayout(device, layout, nil)
        vkDestroyDescriptorSetLayout(device, setLayout, nil)
    }
}

/// Pipelines by key: each key is compiled once, even when several threads ask for it at once;
/// the others wait for the first. Backed by a `VkPipelineCache` saved on disk.
final class PipelineCache: @unchecked Sendable {
    private enum Entry {
        case building(NSCondition)
        case ready(ComputePipeline)
        case failed(any Error)
    }
    private let lock = NSLock()
    private var entries: [AnyHashable: Entry] = [:]
    private(set) var builds = 0
    var vkCache: VkPipelineCache?
    var cacheFile: URL?
    private var dirty = false
    private var lastBuilt: ComputePipeline?

    func attach(device: Device) {
        let env = ProcessInfo.processInfo.environment
        guard env["VKFLEX_PIPELINE_CACHE"] != "0" else { return }
        let dir = device.options.pipelineCacheDirectory ?? cacheRoot()
        var props = VkPhysicalDeviceProperties()
        vkGetPhysicalDeviceProperties(device.physicalDevice, &props)
        let uuid = withUnsafeBytes(of: props.pipelineCacheUUID) { $0.map { String(format: "%02x", $0) }.joined() }
        let file = dir.appendingPathComponent(String(format: "pipelines-%04x-%04x-", props.vendorID, props.deviceID) + uuid + ".bin")
        cacheFile = file
        let initial = (try? Data(contentsOf: file)) ?? Data()
        vkCache = makeCache(device.handle, initial) ?? makeCache(device.handle, Data())
    }

    private func makeCache(_ device: VkDevice, _ data: Data) -> VkPipelineCache? {
        var cache: VkPipelineCache?
        let r: VkResult = data.withUnsafeBytes { raw in
            var info = VkPipelineCacheCreateInfo()
            info.sType = VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO
            info.initialDataSize = raw.count
            info.pInitialData = raw.baseAddress
            return vkCreatePipelineCache(device, &info, nil, &cache)
        }
        return r == VK_SUCCESS ? cache : nil
    }

    /// Writes the VkPipelineCache to disk (atomically) when new pipelines were added.
    func save(_ device: VkDevice) {
        guard let vkCache, let cacheFile else { return }
        let shouldSave: Bool = lock.withLock { let d = dirty; dirty = false; return d }
        guard shouldSave else { return }
        var size = 0
        guard vkGetPipelineCacheData(device, vkCache, &size, nil) == VK_SUCCESS, size > 0 else { return }
        var data = Data(count: size)
        let r = data.withUnsafeMutableBytes { vkGetPipelineCacheData(device, vkCache, &size, $0.baseAddress) }
        guard r == VK_SUCCESS else { return }
        try? FileManager.default.createDirectory(at: cacheFile.deletingLastPathComponent(), withIntermediateDirectories: true)
        try? data.prefix(size).write(to: cacheFile, options: .atomic)
    }

    func pipeline(key: AnyHashable, device: Device, make: () throws -> PipelineDescription) throws -> ComputePipeline {
        lock.lock()
        while true {
            switch entries[key] {
            case .ready(let p):
                lock.unlock()
                return p
            case .failed(let e):
                lock.unlock()
                throw e
            case .building(let cond):
                lock.unlock()
                cond.lock()
                _ = cond.wait(until: Date().addingTimeInterval(0.01))
                cond.unlock()
                lock.lock()
            case nil:
                let cond = NSCondition()
                entries[key] = .building(cond)
                builds += 1
                lock.unlock()
                let outcome: Result<ComputePipeline, any Error> = Result { try device.buildPipeline(make(), cache: vkCache) }
                lock.lock()
                switch outcome {
                case .success(let p):
                    entries[key] = .ready(p)
                    lastBuilt = p
                    dirty = true
                case .failure(let e):
                    entries[key] = .failed(e)
                }
                lock.unlock()
                cond.lock(); cond.broadcast(); cond.unlock()
                if case .success = outcome { save(device.handle) }
                return try outcome.get()
            }
        }
    }

    var buildCount: Int { lock.withLock { builds } }
    var lastBuiltPipeline: ComputePipeline? { lock.withLock { lastBuilt } }

    func destroyAll(device: VkDevice) {
        save(device)
        lock.withLock {
            for case .ready(let p) in entries.values { p.destroy(device) }
            entries = [:]
        }
        if let vkCache { vkDestroyPipelineCache(device, vkCache, nil) }
        vkCache = nil
    }
}

extension Device {
    /// The pipeline for `key`, built by `make` the first time any thread asks for that key.
    ///
    /// ```swift
    /// struct Key: Hashable, Sendable { var headDim: Int }
    /// let p = try device.pipeline(for: Key(headDim: 64)) {
    ///     PipelineDescription(source: ShaderSource(name: "k", text: glsl), bindingCount: 2)
    /// }
    /// ```
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func pipeline<K: Hashable & Sendable>(for key: K, make: () throws -> PipelineDescription) throws -> ComputePipeline {
        try pipelines.pipeline(key: AnyHashable(key), device: self, make: make)
    }

    /// How many distinct pipelines this device has built (each key once).
    public var pipelineBuilds: Int { pipelines.buildCount }

    /// The pipeline built most recently, with its `compileSeconds` (shaderc, or the SPIR-V disk
    /// cache) and `createSeconds` (`vkCreateComputePipelines`): where a first call's time went.
    public var lastBuiltPipeline: ComputePipeline? { pipelines.lastBuiltPipeline }

    /// Where the persistent pipeline cache lives, when enabled.
    public var pipelineCacheFile: URL? { pipelines.cacheFile }

    /// Compiles and creates a pipeline without caching it by key.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func buildPipeline(_ d: PipelineDescription) throws -> ComputePipeline {
        try buildPipeline(d, cache: pipelines.vkCache)
    }

    func buildPipeline(_ d: PipelineDescription, cache: VkPipelineCache?) throws -> ComputePipeline {
        let t0 = DispatchTime.now().uptimeNanoseconds
        var library = ShaderLibrary.standard
        library.files.merge(d.includes) { _, generated in generated }
        let source = try residency?.instrument(d.source, device: self) ?? d.source
        var spirv = try ShaderCompiler.shared.compile(source, library: library)
        if d.cooperativeMatrixKHR {
            guard cooperativeMatrixAPI == .khr else {
                throw FlexError.unsupported("\(d.source.name) is planned for VK_KHR_cooperative_matrix, which \(capabilities.name) does not have enabled")
            }
            do {
                spirv = try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: capabilities.subgroupSize)
            } catch {
                throw FlexError.unsupported("\(d.source.name): cannot move its cooperative matrices to VK_KHR_cooperative_matrix (\(error)); VKFLEX_COOPMAT_API=nv uses the NV extension")
            }
            if d.bfloat16Operands {
                guard enabledFeatures.bfloat16CooperativeMatrix else {
                    throw FlexError.unsupported("\(d.source.name) is planned with bfloat16 cooperative matrices, which \(capabilities.name) does not have enabled")
                }
                spirv = try BFloat16Retyper.retype(spirv)
            }
            if let dir = ProcessInfo.processInfo.environment["VKFLEX_DUMP_SHADERS"], !dir.isEmpty {
                CooperativeMatrixKHRRewriter.dump(spirv, name: d.source.name, to: dir)
            }
        }
        let t1 = DispatchTime.now().uptimeNanoseconds
        guard d.pushConstantSize <= capabilities.maxPushConstantsSize else {
            throw FlexError.limitExceeded("\(d.source.name) needs \(d.pushConstantSize) bytes of push constants; the device allows \(capabilities.maxPushConstantsSize)")
        }

        var module: VkShaderModule?
        try spirv.withUnsafeBufferPointer { words in
            var info = VkShaderModuleCreateInfo()
            info.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO
            info.codeSize = words.count * 4
            info.pCode = words.baseAddress
            try check(vkCreateShaderModule(handle, &info, nil, &module), "vkCreateShaderModule(\(d.source.name))")
        }
        defer { vkDestroyShaderModule(handle, module, nil) }

        var bindings = (0..<d.bindingCount).map { i -> VkDescriptorSetLayoutBinding in
            var b = VkDescriptorSetLayoutBinding()
            b.binding = UInt32(i)
            b.descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER
            b.descriptorCount = 1
            b.stageFlags = VkShaderStageFlags(VK_SHADER_STAGE_COMPUTE_BIT.rawValue)
            return b
        }
        var setLayout: VkDescriptorSetLayout?
        try bindings.withUnsafeMutableBufferPointer { bp in
            var info = VkDescriptorSetLayoutCreateInfo()
            info.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO
            info.bindingCount = UInt32(bp.count)
            info.pBindings = UnsafePointer(bp.baseAddress)
            try check(vkCreateDescriptorSetLayout(handle, &info, nil, &setLayout), "vkCreateDescriptorSetLayout")
        }
        var layout: VkPipelineLayout?
        var range = VkPushConstantRange(stageFlags: VkShaderStageFlags(VK_SHADER_STAGE_COMPUTE_BIT.rawValue), offset: 0,
                                        size: UInt32(d.pushConstantSize))
        var sl: VkDescriptorSetLayout? = setLayout
        let layoutResult: VkResult = withUnsafePointer(to: &sl) { slp in
            withUnsafePointer(to: &range) { rp in
                var info = VkPipelineLayoutCreateInfo()
                info.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO
                info.setLayoutCount = 1
                info.pSetLayouts = slp
                info.pushConstantRangeCount = d.pushConstantSize > 0 ? 1 : 0
                info.pPushConstantRanges = d.pushConstantSize > 0 ? rp : nil
                return vkCreatePipelineLayout(handle, &info, nil, &layout)
            }
        }
        guard layoutResult == VK_SUCCESS else {
            vkDestroyDescriptorSetLayout(handle, setLayout, nil)
            throw FlexError.vulkan(call: "vkCreatePipelineLayout", result: layoutResult.rawValue)
        }

        var entries = d.specialization.indices.map {
            VkSpecializationMapEntry(constantID: UInt32($0), offset: UInt32($0 * 4), size: 4)
        }
        var values = d.specialization
        var pipeline: VkPipeline?
        let t2 = DispatchTime.now().uptimeNanoseconds
        let result: VkResult = entries.withUnsafeMutableBufferPointer { ep in
            values.withUnsafeMutableBytes { vp in
                var spec = VkSpecializationInfo()
                spec.mapEntryCount = UInt32(ep.count)
                spec.pMapEntries = UnsafePointer(ep.baseAddress)
                spec.dataSize = vp.count
                spec.pData = UnsafeRawPointer(vp.baseAddress)
                return withUnsafePointer(to: &spec) { specPtr in
                    "main".withCString { entry in
                        var stage = VkPipelineShaderStageCreateInfo()
                        stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO
                        stage.stage = VK_SHADER_STAGE_COMPUTE_BIT
                        stage.module = module
                        stage.pName = entry
                        stage.pSpecializationInfo = d.specialization.isEmpty ? nil : specPtr
                        var info = VkComputePipelineCreateInfo()
                        info.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO
                        info.stage = stage
                        info.layout = layout
                        if reportsPipelineStatistics { info.flags = VkPipelineCreateFlags(VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR.rawValue) }
                        if pipelineIRDirectory != nil { info.flags |= VkPipelineCreateFlags(VK_PIPELINE_CREATE_CAPTURE_INTERNAL_REPRESENTATIONS_BIT_KHR.rawValue) }
                        return vkCreateComputePipelines(handle, cache, 1, &info, nil, &pipeline)
                    }
                }
            }
        }
        let t3 = DispatchTime.now().uptimeNanoseconds
        guard result == VK_SUCCESS, let pipeline else {
            vkDestroyPipelineLayout(handle, layout, nil)
            vkDestroyDescriptorSetLayout(handle, setLayout, nil)
            throw FlexError.vulkan(call: "vkCreateComputePipelines(\(d.source.name))", result: result.rawValue)
        }
        if reportsPipelineStatistics {
            let defines = d.source.defines.map { "\($0.name)=\($0.value)" }.joined(separator: " ")
            FileHandle.standardError.write(Data("vkflex: pipeline \(d.source.name) [\(defines)]: \(pipelineStatistics(pipeline))\n".utf8))
            if let dir = pipelineIRDirectory {
                let parts: [String] = [d.source.name] + d.source.defines.map { "\($0.name)=\($0.value)" }
                let raw: String = parts.joined(separator: "_")
                let stem = String(raw.unicodeScalars.prefix(180).map { ch -> Character in
                    CharacterSet.alphanumerics.contains(ch) || ch == "_" || ch == "=" ? Character(ch) : "-"
                })
                writeInternalRepresentations(pipeline, to: dir, stem: stem)
            }
        }
        return ComputePipeline(name: d.source.name, pipeline: pipeline, layout: layout!, setLayout: setLayout!,
                               bindingCount: d.bindingCount, pushConstantSize: d.pushConstantSize,
                               compileSeconds: Double(t1 - t0) * 1e-9, createSeconds: Double(t3 - t2) * 1e-9, device: self)
    }
}

extension Device {
    /// The driver's statistics of a pipeline's executables ("Register Count = 128, ..."), from
    /// `VK_KHR_pipeline_executable_properties`.
    func pipelineStatistics(_ pipeline: VkPipeline) -> String {
        guard let rawStats = vkGetDeviceProcAddr(handle, "vkGetPipelineExecutableStatisticsKHR"),
              let executables = pipelineExecutables(pipeline) else { return "unavailable" }
        let getStats = unsafeBitCast(rawStats, to: PFN_vkGetPipelineExecutableStatisticsKHR.self)
        var parts: [String] = []
        for var exec in executables {
            var n: UInt32 = 0
            guard getStats(handle, &exec, &n, nil) == VK_SUCCESS, n > 0 else { continue }
            var template = VkPipelineExecutableStatisticKHR()
            template.sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_STATISTIC_KHR
            var list = [VkPipelineExecutableStatisticKHR](repeating: template, count: Int(n))
            guard getStats(handle, &exec, &n, &list) == VK_SUCCESS else { continue }
            for stat in list.prefix(Int(n)) {
                var stat = stat
                let name = withUnsafeBytes(of: &stat.name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                let value: String
                switch stat.format {
                case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_BOOL32_KHR: value = stat.value.b32 != 0 ? "true" : "false"
                case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_INT64_KHR: value = "\(stat.value.i64)"
                case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR: value = "\(stat.value.u64)"
                default: value = "\(stat.value.f64)"
                }
                parts.append("\(name) = \(value)")
            }
        }
        return parts.isEmpty ? "no statistics" : parts.joined(separator: ", ")
    }
}

extension Device {
    /// The executables of a pipeline (one for a compute pipeline), as the
    /// `VK_KHR_pipeline_executable_properties` queries take them; nil if the driver lacks them.
    func pipelineExecutables(_ pipeline: VkPipeline) -> [VkPipelineExecutableInfoKHR]? {
        guard let rawProps = vkGetDeviceProcAddr(handle, "vkGetPipelineExecutablePropertiesKHR") else { return nil }
        let getProps = unsafeBitCast(rawProps, to: PFN_vkGetPipelineExecutablePropertiesKHR.self)
        var info = VkPipelineInfoKHR()
        info.sType = VK_STRUCTURE_TYPE_PIPELINE_INFO_KHR
        info.pipeline = pipeline
        var count: UInt32 = 0
        guard getProps(handle, &info, &count, nil) == VK_SUCCESS else { return nil }
        return (0..<count).map { index in
            var exec = VkPipelineExecutableInfoKHR()
            exec.sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INFO_KHR
            exec.pipeline = pipeline
            exec.executableIndex = index
            return exec
        }
    }

    /// Writes the driver's internal representations of a pipeline's executables (text ones as
    /// they are, others as bytes) to `dir/stem.N.name.txt`; says on standard error what it wrote.
    func writeInternalRepresentations(_ pipeline: VkPipeline, to dir: String, stem: String) {
        guard let rawIR = vkGetDeviceProcAddr(handle, "vkGetPipelineExecutableInternalRepresentationsKHR"),
              let executables = pipelineExecutables(pipeline) else { return }
        let getIR = unsafeBitCast(rawIR, to: PFN_vkGetPipelineExecutableInternalRepresentationsKHR.self)
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var written = 0
        for var exec in executables {
            let index = exec.executableIndex
            var n: UInt32 = 0
            guard getIR(handle, &exec, &n, nil) == VK_SUCCESS, n > 0 else { continue }
            var template = VkPipelineExecutableInternalRepresentationKHR()
            template.sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INTERNAL_REPRESENTATION_KHR
            var list = [VkPipelineExecutableInternalRepresentationKHR](repeating: template, count: Int(n))
            // First pass: sizes; then buffers of those sizes.
            _ = getIR(handle, &exec, &n, &list)
            var storage: [UnsafeMutableRawPointer] = []
            for i in 0..<Int(n) {
                let size = max(list[i].dataSize, 1)
                let buf = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
                storage.append(buf)
                list[i].pData = buf
            }
            defer { storage.forEach { $0.deallocate() } }
            _ = getIR(handle, &exec, &n, &list)
            for i in 0..<Int(n) {
                var ir = list[i]
                let name = withUnsafeBytes(of: &ir.name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                guard let data = ir.pData, ir.dataSize > 0 else { continue }
                let bytes = Data(bytes: data, count: ir.isText != 0 ? strnlen(data.assumingMemoryBound(to: CChar.self), ir.dataSize) : ir.dataSize)
                let safe = name.map { $0.isLetter || $0.isNumber ? String($0) : "-" }.joined()
                let path = "\(dir)/\(stem).\(index).\(safe).\(ir.isText != 0 ? "txt" : "bin")"
                if FileManager.default.createFile(atPath: path, contents: bytes) { written += 1 }
            }
        }
        FileHandle.standardError.write(Data("vkflex: pipeline \(stem): \(written) internal representation(s) written to \(dir)\n".utf8))
    }
}
