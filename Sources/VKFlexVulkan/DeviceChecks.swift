import Foundation

/// One named check of a device, as `vkflex selftest` runs it.
public struct DeviceCheck: Sendable {
    public var name: String
    public var run: @Sendable (Device) throws -> String

    public init(name: String, run: @escaping @Sendable (Device) throws -> String) {
        self.name = name
        self.run = run
    }
}

/// A check that does not apply to the device (`vkflex selftest` prints SKIP with the reason).
public struct CheckSkipped: Error, CustomStringConvertible {
    public var description: String
    public init(_ reason: String) { self.description = reason }
}

/// A failed check, with what was expected.
public struct CheckFailure: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The checks of the device layer: memory round trips, run-time compilation, subgroup
/// reductions, the pipeline cache, limits and timestamps.
public enum DeviceChecks {
    public static let all: [DeviceCheck] = [
        DeviceCheck(name: "buffer round trips (float32, float16, int32)") { device in
            var checked = 0
            for count in [1, 7, 1000, 65_537] {
                let f32 = (0..<count).map { Float($0) * 0.5 - 3 }
                let b1 = try device.makeBuffer(bytes: count * 4)
                try b1.upload(f32)
                guard try b1.download(count: count, as: Float.self) == f32 else { throw CheckFailure("float32 x\(count) came back different") }
                let f16 = (0..<count).map { Float16(Float($0 % 2048) - 1024) }
                let b2 = try device.makeBuffer(bytes: count * 2)
                try b2.upload(f16)
                guard try b2.download(count: count, as: Float16.self) == f16 else { throw CheckFailure("float16 x\(count) came back different") }
                let i32 = (0..<count).map { Int32($0) * -7 }
                let b3 = try device.makeBuffer(bytes: count * 4)
                try b3.upload(i32)
                guard try b3.download(count: count, as: Int32.self) == i32 else { throw CheckFailure("int32 x\(count) came back different") }
                checked += 3
            }
            return "\(checked) round trips"
        },
        DeviceCheck(name: "subgroup reduction shader") { device in
            let (sums, expected) = try runSubgroupSum(device, count: 10_000, perGroup: 1000)
            for (i, (a, b)) in zip(sums, expected).enumerated() where abs(a - b) > 1e-3 * max(1, abs(b)) {
                throw CheckFailure("workgroup \(i): got \(a), expected \(b)")
            }
            return "subgroup size \(device.capabilities.subgroupSize), \(sums.count) workgroups"
        },
        DeviceCheck(name: "compile error names the line") { _ in
            let broken = "#version 450\nlayout(local_size_x = 1) in;\nvoid main() {\n  float x = undefined_name;\n}\n"
            do {
                _ = try ShaderCompiler.shared.compile(ShaderSource(name: "broken", text: broken))
                throw CheckFailure("a broken shader compiled")
            } catch FlexError.shaderCompile(let error) {
                guard error.line == 4, error.excerpt.contains(">     4 |   float x = undefined_name;") else {
                    throw CheckFailure("error does not point at line 4: \(error)")
                }
                return "line \(error.line!) reported"
            }
        },
        DeviceCheck(name: "pipeline cache builds each key once under concurrency") { device in
            struct Key: Hashable, Sendable { let tag: UUID }
            let key = Key(tag: UUID())
            let before = device.pipelineBuilds
            let source = try subgroupSumDescription(device)
            let results = ThreadSafeArray<ObjectIdentifier>()
            DispatchQueue.concurrentPerform(iterations: 8) { _ in
                if let p = try? device.pipeline(for: key, make: { source }) { results.append(ObjectIdentifier(p)) }
            }
            let ids = results.values
            guard ids.count == 8, Set(ids).count == 1 else { throw CheckFailure("\(ids.count) of 8 requests got \(Set(ids).count) pipelines") }
            guard device.pipelineBuilds - before == 1 else { throw CheckFailure("built \(device.pipelineBuilds - before) times") }
            return "8 threads, 1 build"
        },
        DeviceCheck(name: "over-limit allocation is a clean error") { device in
            let tooBig = device.capabilities.maxMemoryAllocation + 4096
            do {
                _ = try device.makeBuffer(bytes: tooBig)
                throw CheckFailure("allocating \(formatBytes(tooBig)) succeeded")
            } catch let error as FlexError {
                guard case .limitExceeded = error else { throw CheckFailure("wrong error: \(error)") }
                return "\(formatBytes(tooBig)) refused"
            }
        },
        DeviceCheck(name: "cooperative-matrix element layout") { device in
            guard let layout = try CooperativeMatrixLayout.measure(on: device) else {
                throw CheckSkipped("no cooperative-matrix extension with subgroup size 32")
            }
            guard layout.isConsistent else {
                throw CheckFailure("the measured fragments do not cover each element exactly once: \(layout.summary)")
            }
            let known = layout.matches(CooperativeMatrixLayout.nvidiaMMA)
            // On NVIDIA the fast kernel is written for this order: another one means it silently is not used.
            if device.capabilities.vendorID == 0x10DE && !known {
                throw CheckFailure("an NVIDIA GPU whose fragments are not in tensor-core order (the coopmat-nv kernel would not run): \(layout.summary)")
            }
            let b = layout.float16B == CooperativeMatrixLayout.nvidiaMMAB ? "B operands in mma order (split-KV's word-by-word loads apply); " : ""
            return (known ? "NVIDIA tensor-core order (the coopmat-nv kernel applies): " : "another order (attention uses the portable kernel): ") + b + layout.summary
        },
        DeviceCheck(name: "GPU timestamps") { device in
            guard device.capabilities.timestamps else { throw CheckSkipped("the device has no timestamps") }
            let pipeline = try device.pipeline(for: "vkflex.subgroup_sum") { try subgroupSumDescription(device) }
            let data = try device.makeBuffer(bytes: 4 * 100_000)
            let out = try device.makeBuffer(bytes: 4 * 100)
            let (a, b) = try device.record { rec -> (GPUTimestamp, GPUTimestamp) in
                let a = try rec.timestamp()
                try rec.dispatch(pipeline, bindings: [BufferBinding(data), BufferBinding(out, writes: true)],
                                 pushConstants: pushBytes(UInt32(100_000), UInt32(1000)), groups: (100, 1, 1))
                return (a, try rec.timestamp())
            }
            let seconds = try device.seconds(from: a, to: b)
            guard seconds >= 0, seconds < 10 else { throw CheckFailure("implausible time \(seconds) s") }
            return String(format: "dispatch took %.3f ms", seconds * 1e3)
        },
    ]

    /// The description of the subgroup-sum device check shader for this device.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public static func subgroupSumDescription(_ device: Device) throws -> PipelineDescription {
        let lib = ShaderLibrary.standard
        let size = min(256, device.capabilities.maxWorkgroupInvocations, device.capabilities.minSubgroupSize * 64)
        return PipelineDescription(source: ShaderSource(name: "subgroup_sum", text: try lib.text("subgroup_sum.comp")),
                                   bindingCount: 2, pushConstantSize: 8, specialization: [UInt32(size)])
    }

    /// Runs the subgroup-sum shader over `count` random values; returns (GPU sums, float64 sums).
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public static func runSubgroupSum(_ device: Device, count: Int, perGroup: Int) throws -> ([Float], [Float]) {
        guard device.capabilities.subgroupArithmetic else {
            throw FlexError.unsupported("\(device.capabilities.name) lacks subgroup arithmetic in compute shaders")
        }
        let pipeline = try device.pipeline(for: "vkflex.subgroup_sum") { try subgroupSumDescription(device) }
        var rng = SystemRandomNumberGenerator()
        let values = (0..<count).map { _ in Float.random(in: -1...1, using: &rng) }
        let groups = (count + perGroup - 1) / perGroup
        let data = try device.makeBuffer(bytes: count * 4)
        try data.upload(values)
        let out = try device.makeBuffer(bytes: groups * 4)
        try device.record { rec in
            try rec.dispatch(pipeline, bindings: [BufferBinding(data), BufferBinding(out, writes: true)],
                             pushConstants: pushBytes(UInt32(count), UInt32(perGroup)), groups: (groups, 1, 1))
        }
        let sums = try out.download(count: groups, as: Float.self)
        let expected = (0..<groups).map { g in
            Float(values[(g * perGroup)..<min(count, (g + 1) * perGroup)].reduce(0.0) { $0 + Double($1) })
        }
        return (sums, expected)
    }
}

/// Packs 32-bit values into push-constant bytes.
public func pushBytes(_ values: UInt32...) -> [UInt8] {
    values.withUnsafeBytes { Array($0) }
}

final class ThreadSafeArray<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [T] = []
    func append(_ x: T) { lock.withLock { items.append(x) } }
    var values: [T] { lock.withLock { items } }
}
