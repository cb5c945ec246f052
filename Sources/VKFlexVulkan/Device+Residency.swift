import CVulkan
import Foundation
import VKFlexCore

/// `VKFLEX_RESIDENCY=shader[,shader…]` (or `all`): the pipelines of those shaders are built with a
/// probe around their `main` that records, per subgroup, which compute unit ran it (NVIDIA's
/// `gl_SMIDNV`; 0 where the device has no such builtin) and the clocks when it started and ended.
/// ``Device/takeResidency()`` turns the records into how many workgroups a compute unit ran at
/// once — the occupancy the driver gave a kernel, which no Vulkan query reports.
///
/// The records go to a host-visible buffer through its device address, baked into the probed
/// shader's source, so no kernel's bindings change. A tool for tuning, not for production: a probed
/// pipeline writes one 32-byte record per subgroup with an atomic counter.
final class ResidencyProbe: @unchecked Sendable {
    /// Shader names to probe (nil: all).
    let shaders: Set<String>?
    /// Whether `gl_SMIDNV` is enabled (`VK_NV_shader_sm_builtins`).
    let smBuiltins: Bool
    /// Whether the device-wide real-time clock is enabled (else only the subgroup clock).
    let deviceClock: Bool
    /// Records the buffer holds (32 bytes each, after a 16-byte header).
    static let capacity = 1 << 19
    private let lock = NSLock()
    private var buffer: Buffer?
    /// Pipeline labels by probe id (the id is baked into each probed shader).
    private var labels: [String] = []

    init(shaders: Set<String>?, smBuiltins: Bool, deviceClock: Bool) {
        self.shaders = shaders
        self.smBuiltins = smBuiltins
        self.deviceClock = deviceClock
    }

    /// The shaders a `VKFLEX_RESIDENCY` value names: nil when unset, empty or 0, `.some(nil)` for all.
    static func requested(_ setting: String?) -> Set<String>?? {
        guard let value = setting?.trimmingCharacters(in: .whitespaces), !value.isEmpty, value != "0" else { return nil }
        if value == "all" || value == "1" { return .some(nil) }
        return .some(Set(value.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }))
    }

    /// Whether a shader (its `ShaderSource` name, defines apart) is probed.
    func probes(_ name: String) -> Bool { shaders?.contains(name) ?? true }

    func recordBuffer(_ device: Device) throws -> Buffer {
        try lock.withLock {
            if let buffer { return buffer }
            let b = try device.makeBuffer(bytes: 16 + 32 * ResidencyProbe.capacity, hostVisible: true)
            guard b.mapped != nil, b.deviceAddress != nil else {
                throw FlexError.unsupported("VKFLEX_RESIDENCY needs host-visible memory with a device address on \(device.capabilities.name)")
            }
            try b.upload([UInt32(0), UInt32(ResidencyProbe.capacity), 0, 0])
            buffer = b
            return b
        }
    }

    /// `source` with its `main` wrapped by the probe, or `source` itself when it is not probed.
    func instrument(_ source: ShaderSource, device: Device) throws -> ShaderSource {
        guard probes(source.name) else { return source }
        let address = try recordBuffer(device).deviceAddress!
        // The backward's passes share a shader: their defines tell them apart.
        let pass = source.defines.filter { ["BWD_PASS", "DKV"].contains($0.name) }.map { "\($0.name)=\($0.value)" }
        let label = pass.isEmpty ? source.name : source.name + " [" + pass.joined(separator: " ") + "]"
        let id = lock.withLock { () -> Int in labels.append(label); return labels.count - 1 }
        guard id < 4096 else { return source }   // the record keeps 12 bits of it
        var lines = source.text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        guard let version = lines.firstIndex(where: { $0.hasPrefix("#version") }) else { return source }
        var head = ["#extension GL_EXT_buffer_reference : require", "#extension GL_EXT_buffer_reference_uvec2 : require",
                    "#extension GL_ARB_shader_clock : require", "#extension GL_KHR_shader_subgroup_basic : require"]
        if deviceClock { head.append("#extension GL_EXT_shader_realtime_clock : require") }
        if smBuiltins { head.append("#extension GL_NV_shader_sm_builtins : require") }
        head += ["#define main vkf_probed_main", "#line \(version + 2)"]
        lines.insert(contentsOf: head, at: version + 1)
        let realtime = deviceClock ? "clockRealtime2x32EXT()" : "uvec2(0u)"
        lines += ["""
            #undef main
            // VKFLEX_RESIDENCY's probe: per subgroup its compute unit, workgroup and clocks.
            layout(buffer_reference, std430, buffer_reference_align = 16) buffer VkfResidency { uint n; uint cap; uint pad0; uint pad1; uvec4 rec[]; };
            void main() {
                const uvec2 c0 = clock2x32ARB(), r0 = \(realtime);
                vkf_probed_main();
                const uvec2 c1 = clock2x32ARB(), r1 = \(realtime);
                if (subgroupElect()) {
                    VkfResidency pr = VkfResidency(uvec2(\(UInt32(truncatingIfNeeded: address))u, \(UInt32(truncatingIfNeeded: address >> 32))u));
                    const uint i = atomicAdd(pr.n, 1u);
                    const uvec3 g = gl_WorkGroupID, ng = gl_NumWorkGroups;
                    if (i < pr.cap) {
                        pr.rec[2u * i] = uvec4(\(smBuiltins ? "gl_SMIDNV" : "0u") | (min(gl_NumSubgroups, 255u) << 12u) | (\(id)u << 20u),
                                              g.x + ng.x * (g.y + ng.y * g.z), c0.x, c1.x);
                        pr.rec[2u * i + 1u] = uvec4(r0.x, r1.x, gl_SubgroupID, 0u);
                    }
                }
            }
            """]
        return ShaderSource(name: source.name, text: lines.joined(separator: "\n"), defines: source.defines, optimization: source.optimization)
    }

    /// The records written since the last take, and the counter reset. The caller has waited for
    /// the work.
    func take() throws -> (records: [ResidencyRecord], labels: [String], dropped: Int) {
        let (b, names) = lock.withLock { (buffer, labels) }
        guard let b else { return ([], names, 0) }
        let header = try b.download(count: 4, as: UInt32.self)
        let n = Int(header[0]), kept = min(n, ResidencyProbe.capacity)
        let words = kept == 0 ? [] : try b.download(count: 4 + 8 * kept, as: UInt32.self)
        try b.upload([UInt32(0)])
        let records = (0..<kept).map { i -> ResidencyRecord in
            let w = Array(words[4 + 8 * i ..< 12 + 8 * i])
            return ResidencyRecord(unit: Int(w[0] & 0xFFF), subgroups: Int((w[0] >> 12) & 0xFF), probe: Int(w[0] >> 20),
                                   workgroup: Int(w[1]), clock: (w[2], w[3]), realtime: (w[4], w[5]), subgroup: Int(w[6]))
        }
        return (records, names, n - kept)
    }
}

/// One subgroup's run, as ``ResidencyProbe`` recorded it.
struct ResidencyRecord {
    var unit: Int, subgroups: Int, probe: Int, workgroup: Int
    /// The subgroup clock (the compute unit's cycles) and the device's real-time clock (0 where
    /// the device has none) at start and end, low 32 bits.
    var clock: (UInt32, UInt32), realtime: (UInt32, UInt32)
    var subgroup: Int
}

/// What a kernel's workgroups did on the compute units, from `VKFLEX_RESIDENCY`'s records of one
/// pipeline (``Device/takeResidency()``).
public struct ResidencyReport: Sendable {
    /// The pipeline's shader, with the defines that tell the backward's passes apart.
    public var pipeline: String
    /// Workgroups recorded (over every dispatch of the pipeline since the last take) and the
    /// subgroups each has.
    public var workgroups: Int, subgroupsPerWorkgroup: Int
    /// Compute units that ran at least one (1 where the device does not say which ran it).
    public var units: Int
    /// The most subgroups that ran at once on one compute unit, and their mean over the time a
    /// unit was busy with the pipeline (from the unit's own clock).
    public var maxSubgroupsAtOnce: Int, meanSubgroupsAtOnce: Double
    /// A subgroup's run from start to end, median and longest, in the device's real-time clock
    /// units (nanoseconds on NVIDIA and Mesa); nil where the device has no such clock.
    public var medianRun: Double?, longestRun: Double?
    /// Records lost because the buffer was full.
    public var dropped: Int

    /// One line, e.g. `flex_attention_decode: 512 workgroups × 1 subgroup on 132 units, at once on a unit at most 4 subgroups (mean 3.1, so 3.1 workgroups), a subgroup's run 41.2 µs (median; longest 60.3)`.
    public var summary: String {
        var s = "\(pipeline): \(workgroups) workgroups × \(subgroupsPerWorkgroup) subgroup\(subgroupsPerWorkgroup == 1 ? "" : "s")"
            + " on \(units) unit\(units == 1 ? "" : "s"), at once on a unit at most \(maxSubgroupsAtOnce) subgroups"
            + String(format: " (mean %.1f, so %.1f workgroups)", meanSubgroupsAtOnce, meanSubgroupsAtOnce / Double(max(1, subgroupsPerWorkgroup)))
        if let medianRun, let longestRun {
            s += String(format: ", a subgroup's run %.1f µs (median; longest %.1f)", medianRun / 1000, longestRun / 1000)
        }
        if dropped > 0 { s += " (\(dropped) records lost: the probe's buffer was full)" }
        return s
    }

    /// Sweeps each unit's start and end events (its own clock, wrap-safe from its first start).
    init(pipeline: String, records: [ResidencyRecord], dropped: Int) {
        self.pipeline = pipeline
        self.dropped = dropped
        subgroupsPerWorkgroup = records.map(\.subgroups).max() ?? 0
        workgroups = records.count / max(1, subgroupsPerWorkgroup)
        let byUnit = Dictionary(grouping: records, by: \.unit)
        units = byUnit.count
        var most = 0, weighted = 0.0, busy = 0.0
        for (_, rs) in byUnit {
            let base = rs.map(\.clock.0).min()!
            // Ends sort before starts at the same clock: a subgroup that ends as another starts did not overlap it.
            let events = rs.flatMap { r -> [(Double, Int)] in
                let s = Double(r.clock.0 &- base), e = Double(r.clock.1 &- base)
                return [(s, 1), (max(s, e), -1)]
            }.sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
            var now = 0, last = 0.0
            for (t, d) in events {
                if now > 0 { weighted += Double(now) * (t - last); busy += t - last }
                now += d; last = t
                most = max(most, now)
            }
        }
        maxSubgroupsAtOnce = most
        meanSubgroupsAtOnce = busy > 0 ? weighted / busy : Double(most)
        let runs = records.compactMap { r -> Double? in r.realtime == (0, 0) ? nil : Double(r.realtime.1 &- r.realtime.0) }.sorted()
        medianRun = runs.isEmpty ? nil : runs[runs.count / 2]
        longestRun = runs.last
    }
}

extension Device {
    /// Whether `VKFLEX_RESIDENCY` probes this device's pipelines (see ``takeResidency()``).
    public var probesResidency: Bool { residency != nil }

    /// With `VKFLEX_RESIDENCY=shader[,shader…]` or `all` in the environment when the device
    /// opened (or `Options(residency:)`): per probed pipeline, how its workgroups ran on the compute units since the last
    /// take — how many subgroups a unit ran at once (the occupancy the driver gave it), over how
    /// many units, and a subgroup's run time. Waits for the device. Empty without the variable.
    ///
    /// ```swift
    /// // VKFLEX_RESIDENCY=flex_attention_decode in the environment
    /// _ = try device.takeResidency()          // drop what came before
    /// _ = try flexAttention(q, k, v)
    /// for r in try device.takeResidency() { print(r.summary) }
    /// ```
    ///
    /// - Throws: ``FlexError/vulkan(call:result:)`` when waiting for the device fails.
    public func takeResidency() throws -> [ResidencyReport] {
        guard let residency else { return [] }
        try synchronize()
        let (records, labels, dropped) = try residency.take()
        return Dictionary(grouping: records, by: \.probe).sorted { $0.key < $1.key }.map { id, rs in
            ResidencyReport(pipeline: labels.indices.contains(id) ? labels[id] : "probe \(id)", records: rs, dropped: dropped)
        }
    }
}
