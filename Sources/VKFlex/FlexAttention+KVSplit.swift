import Foundation
import VKFlexVulkan

/// Key splits for drivers that cap a shader's loop iterations.
///
/// Mesa's llvmpipe (lavapipe) ends every loop of a shader once the iterations of all its loops add
/// up to 65535 (gallivm's `LP_MAX_TGSI_LOOP_ITERATIONS`, "shared between every loop"): measured
/// here on 2026-12-05, the portable kernel returned the attention over the first ~17,300 keys of
/// 20,000 at D = 64 (relative error 0.40, exit 0) and over the first ~3,350 with 4-key tiles. The
/// planner therefore walks long key ranges a share per dispatch on such a driver, into float32
/// partials (O over the share, its LSE) that `flex_attention_merge.comp` combines; the kernel
/// reports an error, never a silent truncation, if its walk stops early all the same.
extension ForwardKernel {
    /// Tests turn the splitting off to check that the kernel reports a truncated walk.
    nonisolated(unsafe) static var ignoreLoopLimitForTesting = false

    /// The loop iterations a shader invocation may run on `device`, or nil where they are not capped.
    static func loopIterationLimit(_ device: Device) -> Int? {
        let caps = device.capabilities
        return (caps.driverName.lowercased().contains("llvmpipe") || caps.name.lowercased().contains("llvmpipe")) ? 65535 : nil
    }

    /// An upper bound of the loop iterations the portable kernel runs per staged key tile, counting
    /// every loop of flex_attention_fwd.comp as if the compiler unrolled none (measured 121 per
    /// 32-key tile at D = 64 against 483 from this bound: splits are small, never too long).
    static func portableIterationsPerTile(D: Int, Dv: Int, BQ: Int, BKV: Int, WG: Int, half: Bool) -> Int {
        let unit = half ? 8 : 4
        func ceilDiv(_ a: Int, _ b: Int) -> Int { (a + b - 1) / b }
        let stage = ceilDiv(BKV * max(D, Dv), unit * WG) * (1 + unit) + ceilDiv(BKV * max(D, Dv), 2 * WG) * 3
        let tpr = WG % BQ == 0 ? WG / BQ : 1
        var perTile = 1 + 2 * stage + BKV + ceilDiv(BKV, tpr) + 8
        if AttentionPlanner.portableBlocked(Dv: Dv, BQ: BQ, BKV: BKV, WG: WG) {
            let ct = BQ * BKV / (4 * WG), pvTasks = ceilDiv((BQ / 4) * (Dv / 4), WG)
            perTile += D * (1 + ct) + ct * 5 + 4 + 4 * pvTasks + BKV * (1 + pvTasks * 5)
        } else {
            let perInvocation = ceilDiv(BQ * BKV, WG), acc = ceilDiv(BQ * Dv, WG)
            perTile += perInvocation * (2 + D) + acc * (1 + BKV) + BKV * 3
        }
        return perTile
    }

    /// The same bound for flex_attention_fwd_generic.comp: staging, the two products (scalar loops
    /// where emulated, the only form a capped driver runs), the softmax and O's updates.
    static func genericIterationsPerTile(D: Int, Dv: Int, tiles t: GenericTiles) -> Int {
        func ceilDiv(_ a: Int, _ b: Int) -> Int { (a + b - 1) / b }
        let tpr = max(1, t.SG / t.M), rpl = t.M / (t.SG / tpr)
        let stage = ceilDiv(t.BKV * D, t.WG) + ceilDiv(t.BKV * Dv, t.WG)
        let products = t.emulated
            ? ceilDiv(t.M * t.BKV, t.SG) * (1 + D) + ceilDiv(t.M * Dv, t.SG) * (1 + t.BKV)
            : t.soft ? softIterationsPerTile(D: D, Dv: Dv, tiles: t)
            : (t.BKV / t.N) * (1 + D / t.K) + t.BKV / t.K + (Dv / t.N) * (1 + t.BKV / t.K)
        return stage + products + rpl * (1 + 2 * (t.BKV / tpr) + 2 * (Dv / tpr)) + 16
    }

    /// With software matrices (`VKF_MM_SOFT`) every matrix operation is loops over a lane's
    /// elements, `softChunk` an iteration (flex_mm.glsl's `SOFT_CH`), and the loops over matrices
    /// and elements stay loops (`MM_UNROLL`): a bound over both softmax forms, the rare rescaling
    /// counted every step.
    static func softIterationsPerTile(D: Int, Dv: Int, tiles t: GenericTiles) -> Int {
        let c = softChunk
        let (na, nb, nc) = (t.M * t.K / t.SG, t.K * t.N / t.SG, t.M * t.N / t.SG)
        let rb = t.rpw, tpr = max(1, t.SG / (t.M * rb)), rpl = t.M * rb / (t.SG / tpr)
        let mad = (na + nb + nc) / c + 3
        let qk = (t.BKV / t.N) * (1 + (D / t.K) * (1 + nb / c + rb * (1 + mad)) + rb * (1 + nc / c))
        let elements = 2 * (t.BKV / t.N) * rb * (1 + nc)
        let rescale = (t.BKV / t.N) * rb * (1 + nc / c) + rb * (2 + nc / c + nc + (Dv / t.N) * (1 + nc)) + 2 * rpl * (1 + t.N)
            + (Dv / t.N) * (2 + 2 * nc / c + rpl * (1 + t.N / tpr))
        let pv = rb * (t.BKV / t.K) * (1 + na / c + mad) + (Dv / t.N) * (t.BKV / t.K) * (1 + nb / c + rb * (1 + mad))
        return qk + elements + rescale + pv
    }

    /// A lane's matrix elements each loop iteration of software matrices takes (flex_mm.glsl's `SOFT_CH`).
    static let softChunk = 2

    /// KV blocks each dispatch walks so that the portable (or generic) kernel stays inside the
    /// device's loop cap, or nil when one dispatch walks them all.
    static func kvBlocksPerDispatch(shape s: AttentionShape, plan: AttentionPlan, kvBlockSize: Int, kvBlocks: Int,
                                    device: Device) -> Int? {
        guard let limit = loopIterationLimit(device), !ignoreLoopLimitForTesting else { return nil }
        let (BQ, BKV, WG) = (plan.BQ, plan.BKV, plan.WG)
        let perTile: Int
        if case .generic(let t) = plan.tiles {
            perTile = genericIterationsPerTile(D: s.D, Dv: s.Dv, tiles: t)
        } else {
            let half = s.dtype == .float16 && s.D % 2 == 0 && AttentionPlanner.portableBlocked(Dv: s.Dv, BQ: BQ, BKV: BKV, WG: WG)
            perTile = portableIterationsPerTile(D: s.D, Dv: s.Dv, BQ: BQ, BKV: BKV, WG: WG, half: half)
        }
        // Outside the key tiles: staging Q, the mask's per-row values, the output, the walk over
        // the block lists (one iteration per listed block, walked or not).
        var fixed = 2 * (BQ * max(s.D, s.Dv) / WG + 1) * 9 + 2 * kvBlocks + 512
        if case .generic(let t) = plan.tiles, t.soft {
            // Q's operands, the index matrix, and O's way out through the score tile, as loops.
            let (na, nc, c) = (t.M * t.K / t.SG, t.M * t.N / t.SG, softChunk)
            fixed += (BQ / t.BKV + 1) * t.rpw * (s.D / t.K) * (1 + na / c) + 4 * t.rpw * (1 + nc / c) + t.M * t.N / t.SG
                + (s.Dv / t.N) * (1 + t.rpw * (1 + nc / c) + t.M * t.rpw * (1 + t.N))
        }
        let budget = limit * 3 / 4 - fixed
        let tilesPerBlock = (kvBlockSize + BKV - 1) / BKV
        let blocks = max(1, budget / (perTile * tilesPerBlock))
        return blocks >= kvBlocks ? nil : blocks
    }

    struct MergeKey: Hashable, Sendable { let out: DType; let vec4: Bool }

    /// The merge's invocations a workgroup: 256, or the largest power of two the device allows.
    static func mergeWorkgroup(_ device: Device) -> Int {
        var wg = 256
        while wg > device.capabilities.maxWorkgroupInvocations { wg /= 2 }
        return wg
    }

    /// Whether the merge reads partial O four columns at a time (`MERGE_VEC4`).
    static func mergeVec4(Dv: Int) -> Bool { Dv % 4 == 0 }

    /// The merge pass for outputs of `outDType` and `Dv` columns, built once per device.
    static func mergePipeline(outDType: DType, Dv: Int, device: Device) throws -> ComputePipeline {
        let vec4 = mergeVec4(Dv: Dv)
        return try device.pipeline(for: MergeKey(out: outDType, vec4: vec4)) {
            PipelineDescription(source: ShaderSource(name: "flex_attention_merge", text: try ShaderLibrary.standard.text("flex_attention_merge.comp"),
                                                     defines: [.init("OUT_F16", outDType == .float16 ? "1" : "0"),
                                                               .init("OUT_BF16", outDType == .bfloat16 ? "1" : "0"),
                                                               .init("MERGE_VEC4", vec4 ? "1" : "0"),
                                                               .init("WG", "\(mergeWorkgroup(device))")]),
                                bindingCount: 7, pushConstantSize: 20 * 4)
        }
    }

    /// How the merge deals a row's work: `ul` invocations cover its columns (units of four where
    /// Dv allows), `groups` groups of them take its splits in turn, `rows` rows a workgroup of `wg`.
    /// A group issues ``mergeSplitsInFlight`` splits' loads together, so groups enough that each
    /// takes about that many (one-row MQA: 132 splits of 128 rows, 8 groups), as many rows as fill
    /// the workgroup where splits are few. H100, 2026-12-06 (`VKFLEX_PROFILE=1`): a group a split
    /// made MQA's merge 11.0 µs (22 with one invocation walking every split) but speculative
    /// decoding's 16 splits 10.3 µs against 8.0 walked (docs/performance.md, seventeenth session).
    static func mergeLayout(splits: Int, Dv: Int, wg: Int) -> (ul: Int, groups: Int, rows: Int) {
        let units = mergeVec4(Dv: Dv) ? Dv / 4 : Dv
        var ul = 1
        while ul < units && ul < wg { ul *= 2 }
        var groups = 1
        while groups * mergeSplitsInFlight < splits && groups * ul < wg { groups *= 2 }
        return (ul, groups, wg / (ul * groups))
    }

    /// Splits whose loads one merge invocation issues together (`MS` in flex_attention_merge.comp).
    static let mergeSplitsInFlight = 8

    /// Where a dispatch writes O or the LSE: a tensor's part for a chunk, or a partial's.
    struct WriteTarget { var binding: BufferBinding; var base: Int; var strides: [Int] }

    /// Combines `splits` partial results (O [split, rows, Dv] and LSE [split, rows], float32) of
    /// a chunk of `nb` batches and `nh` heads into the output (and the LSE, when wanted).
    static func merge(splits: Int, partO: Buffer, partL: Buffer, partMax: Buffer?, nb: Int, nh: Int, shape s: AttentionShape,
                      out: WriteTarget, lse: WriteTarget?, max: WriteTarget?, sinks: Tensor? = nil, headStart: Int = 0,
                      outDType: DType, device: Device) throws {
        let pipeline = try mergePipeline(outDType: outDType, Dv: s.Dv, device: device)
        let layout = mergeLayout(splits: splits, Dv: s.Dv, wg: mergeWorkgroup(device))
        let groups = (nb * nh * s.Lq + layout.rows - 1) / layout.rows
        let gx = min(groups, device.capabilities.maxWorkgroupCount[0]), gy = (groups + gx - 1) / gx
        let rows = lse ?? max   // the LSE and the maximum scores share their addressing
        let ls = rows?.strides ?? [0, 0, 0]
        let params = [splits, nb, nh, s.Lq, s.Dv, out.base] + out.strides + [rows?.base ?? 0] + ls + [lse == nil ? 0 : 1, max == nil ? 0 : 1, sinks == nil ? 0 : 1, headStart, layout.ul, layout.groups]
        let unused = try dummyFloatBuffer(device)
        var bindings = [BufferBinding(partO), BufferBinding(partL), out.binding]
        bindings.append(lse?.binding ?? BufferBinding(unused, writes: true))
        bindings.append(partMax.map { BufferBinding($0) } ?? BufferBinding(unused))
        bindings.append(max?.binding ?? BufferBinding(unused, writes: true))
        bindings.append(sinks?.binding() ?? BufferBinding(unused))
        let push: [Int32] = params.map { Int32($0) }
        try device.record { rec in
            try rec.dispatch(pipeline, bindings: bindings, pushConstants: push.withUnsafeBytes { Array($0) }, groups: (gx, gy, 1))
        }
    }
}
