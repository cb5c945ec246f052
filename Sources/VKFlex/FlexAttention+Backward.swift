import Foundation
import VKFlexExpr
import VKFlexVulkan

/// What ``flexAttentionBackward(_:_:_:output:lse:gradOutput:gradLSE:scoreMod:blockMask:scale:enableGQA:kvLengths:sinks:gradCaptures:out:options:)``
/// returns: the gradients of the loss with respect to q, k and v, in their shapes and dtype.
public struct FlexGradients {
    /// `[B, Hq, Lq, D]`.
    public var dq: Tensor
    /// `[B, Hkv, Lkv, D]` (summed over each group of query heads under GQA).
    public var dk: Tensor
    /// `[B, Hkv, Lkv, Dv]`.
    public var dv: Tensor
    /// `[Hq]` float32, the sinks' gradient `dsink_h = −Σ_{b,i} exp(sink_h − LSE_bhi)·Δ_bhi`, when
    /// the call had `sinks:`.
    public var dsinks: Tensor? = nil
    /// The gradients of the captured tensors the call named in `gradCaptures:`, in that order:
    /// float32, each in its capture's shape.
    public var captures: [Tensor] = []
    /// The kernel of the dQ and dK/dV passes: `.portable`, `.coopmatNV` (NVIDIA's layout) or
    /// `.coopmatGeneric` (cooperative matrices; the other passes are the portable kernel's).
    public var kernel: FlexKernel = .portable

    /// The gradient of one of the tensors named in `gradCaptures:` (nil for any other tensor).
    ///
    /// ```swift
    /// let relativeBias = ScoreMod { score, _, _, q, kv in score + table[q - kv + (S - 1)] }
    /// let forward = try flexAttention(q, k, v, scoreMod: relativeBias, returnLSE: true)
    /// let grads = try forward.backward(gradOutput: dO, gradCaptures: [table])
    /// let dTable = try grads.gradient(of: table)!.toArray()
    /// ```
    public func gradient(of capture: Tensor) -> Tensor? {
        zip(requested, captures).first { $0.0 == capture.id }?.1
    }

    /// The ids of the tensors the call named in `gradCaptures:`.
    var requested: [Int] = []

    /// Tensors for a backward call to write its gradients into (its `out:`): a previous call's
    /// result does the same, so a training step writes last step's gradient memory again.
    ///
    /// ```swift
    /// // One micro-batch's gradients into its rows of the whole batch's (contiguous slices).
    /// let dqAll = try device.empty(shape: [2 * B, H, S, D], dtype: q.dtype)
    /// let dkAll = try device.empty(shape: [2 * B, H, S, D], dtype: q.dtype)
    /// let dvAll = try device.empty(shape: [2 * B, H, S, D], dtype: q.dtype)
    /// func rows(_ t: Tensor, _ i: Int) throws -> Tensor {
    ///     try t.asStrided(shape: [B, H, S, D], strides: t.strides, byteOffset: i * B * H * S * D * t.dtype.size)
    /// }
    /// let forward = try flexAttention(q, k, v, returnLSE: true)
    /// let into = FlexGradients(dq: try rows(dqAll, 1), dk: try rows(dkAll, 1), dv: try rows(dvAll, 1))
    /// _ = try forward.backward(gradOutput: dO, out: into)
    /// ```
    public init(dq: Tensor, dk: Tensor, dv: Tensor) {
        (self.dq, self.dk, self.dv) = (dq, dk, dv)
    }

    init(dq: Tensor, dk: Tensor, dv: Tensor, dsinks: Tensor?, captures: [Tensor], requested: [Int]) {
        (self.dq, self.dk, self.dv, self.dsinks, self.captures, self.requested) = (dq, dk, dv, dsinks, captures, requested)
    }
}

/// The backward pass of ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)``,
/// with PyTorch's semantics: P is recomputed from the saved LSE; `Δ = rowsum(dO ⊙ O) − dLSE`;
/// `dV = Pᵀ·dO`; `dS = P ⊙ (dO·Vᵀ − Δ)`, through the mask (masked pairs give nothing) and the
/// score-mod's symbolic derivative; `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, summed over each group
/// of query heads under GQA. Rows with no key (LSE `-inf`) contribute nothing.
///
/// ```swift
/// let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: S, kvLen: S, device: device)
/// let softcap = ScoreMod { score, _, _, _, _ in 20 * tanh(score / 20) }
/// let forward = try flexAttention(q, k, v, scoreMod: softcap, blockMask: causal, returnLSE: true)
/// let grads = try flexAttentionBackward(q, k, v, output: forward.output, lse: forward.lse!,
///                                       gradOutput: dO, scoreMod: softcap, blockMask: causal)
/// let dq = try grads.dq.toArray()
/// ```
///
/// - output, lse: what the forward call returned for these inputs (`returnLSE: true`).
/// - gradOutput: dLoss/dOutput, the output's shape and dtype.
/// - gradLSE: dLoss/dLSE `[B, Hq, Lq]` float32, where the LSE is used downstream; nil means 0.
/// - gradCaptures: float tensors the score-mod captures (a learnable bias table, ALiBi slopes,
///   per-head temperatures) whose gradients to return in ``FlexGradients/captures``: the sum over
///   every pair the mask keeps of dLoss/d(score-mod output) times the derivative of the score-mod
///   by each place it reads the tensor, added to the element it read (a tensor read twice, or at a
///   computed index such as `rb[q_idx - kv_idx + S]`, works). float32 whatever the tensor's dtype.
///   Added with float atomics where the device has them (lavapipe and NVIDIA do), else through
///   per-workgroup partial sums.
/// - out: tensors to write dQ, dK and dV into instead of new ones (``FlexGradients/init(dq:dk:dv:)``
///   of the caller's, or a previous call's result): contiguous, in q's, k's and v's shapes and the
///   inputs' dtype, sharing no memory with an input — e.g. one micro-batch's rows of a whole batch's
///   gradients. They are overwritten, not added to. The result holds them (its `dsinks` and
///   captures' gradients are new tensors).
///
/// The dQ and dK/dV passes run through cooperative matrices: on a device where the forward takes
/// `coopmat-nv` (NVIDIA's fragment layout, float16 or bfloat16, head dim = value dim, a multiple
/// of 16 up to 128) through `coopmat-nv` (flex_attention_bwd_nv.comp, P and dS made in
/// registers), else through `coopmat-generic` (flex_attention_bwd_mm.comp: float16 inputs on a
/// device with cooperative matrices, bfloat16 ones on a device with bfloat16 cooperative
/// matrices, once they matched the portable passes there on a small input), else the portable
/// kernels, which run on every device; all sum in float32 whatever the inputs' dtype. `options:`
/// forces the dQ and dK/dV passes' kernel (`FlexOptions(kernel: .portable)`, `.coopmatNV` or
/// `.coopmatGeneric`, which forced on a device without cooperative matrices runs its products as
/// scalar loops); so does `VKFLEX_KERNEL` where it names one of them. ``FlexGradients/kernel`` says which ran. `kvLengths:` and `sinks:` are the forward call's (with
/// sinks, `lse` includes them and ``FlexGradients/dsinks`` is their gradient).
///
/// - Throws: ``FlexError/invalidArgument(_:)`` for shapes or dtypes that do not match the forward
///   call's, and for a `gradCaptures:` tensor that is an int tensor, is not read by the score-mod
///   (or only by the mask-mod), or is listed twice; what ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)``
///   throws for the same inputs; ``FlexError/limitExceeded(_:)`` where a tensor exceeds what the device binds.
public func flexAttentionBackward(_ q: Tensor, _ k: Tensor, _ v: Tensor, output: Tensor, lse: Tensor, gradOutput: Tensor,
                                  gradLSE: Tensor? = nil, scoreMod: ScoreMod? = nil, blockMask: BlockMask? = nil,
                                  scale: Double? = nil, enableGQA: Bool = false, kvLengths: Tensor? = nil,
                                  sinks: Tensor? = nil, gradCaptures: [Tensor] = [], out: FlexGradients? = nil,
                                  options: FlexOptions = FlexOptions()) throws -> FlexGradients {
    let s = try AttentionShape(q, k, v, blockMask: blockMask, enableGQA: enableGQA)
    let wanted = try captureGradientTargets(gradCaptures, scoreMod: scoreMod, blockMask: blockMask)
    try checkKVLengths(kvLengths, shape: s, device: q.device)
    try checkSinks(sinks, shape: s, device: q.device)
    let device = q.device
    let outShape = [s.B, s.Hq, s.Lq, s.Dv], rowShape = [s.B, s.Hq, s.Lq]
    for (name, t, shape, dtype) in [("output", output, outShape, q.dtype), ("gradOutput", gradOutput, outShape, q.dtype),
                                    ("lse", lse, rowShape, DType.float32)] + (gradLSE.map { [("gradLSE", $0, rowShape, DType.float32)] } ?? []) {
        guard t.device === device else { throw FlexError("\(name): the tensor belongs to another device") }
        guard t.shape == shape else { throw FlexError("\(name) has shape \(t.shape); it must be \(shape)") }
        guard t.dtype == dtype else { throw FlexError("\(name) is \(t.dtype.rawValue); it must be \(dtype.rawValue)") }
    }
    let scale = scale ?? 1 / Double(s.D).squareRoot()
    guard scale.isFinite else { throw FlexError("scale must be finite, got \(scale)") }
    let shapes = [[s.B, s.Hq, s.Lq, s.D], [s.B, s.Hkv, s.Lkv, s.D], [s.B, s.Hkv, s.Lkv, s.Dv]]
    let (dq, dk, dv): (Tensor, Tensor, Tensor)
    if let out {
        try checkGradientOutputs(out, shapes: shapes, dtype: q.dtype,
                                 inputs: [q, k, v, output, gradOutput, lse] + [gradLSE, kvLengths, sinks].compactMap { $0 })
        (dq, dk, dv) = (out.dq, out.dk, out.dv)
    } else {
        dq = try device.empty(shape: shapes[0], dtype: q.dtype, name: "dq")
        dk = try device.empty(shape: shapes[1], dtype: q.dtype, name: "dk")
        dv = try device.empty(shape: shapes[2], dtype: q.dtype, name: "dv")
    }
    let dsinks = sinks == nil ? nil : try device.tensor([Float](repeating: 0, count: s.Hq), shape: [s.Hq], name: "dsinks")
    let dcaps = try gradCaptures.map { try device.empty(shape: $0.shape, dtype: .float32, name: "d" + $0.name) }
    var grads = FlexGradients(dq: dq, dk: dk, dv: dv, dsinks: dsinks, captures: dcaps, requested: gradCaptures.map(\.id))
    grads.kernel = try AttentionPlanner.backwardKernel(s, device: device, forced: options.kernel)
    if s.B * s.Hq * s.Lq == 0 || s.Hkv * s.Lkv == 0 || s.D == 0 {
        // Only the tensors' own elements: a caller's may be a view into a larger buffer.
        for t in [dq, dk, dv] + dcaps where t.count > 0 { try t.copy(from: [Float](repeating: 0, count: t.count)) }
        return grads
    }
    try BackwardKernel.run(shape: s, q: q, k: k, v: v, output: output, lse: lse, gradOutput: gradOutput, gradLSE: gradLSE,
                           scoreMod: scoreMod, blockMask: blockMask, scale: scale, kvLengths: kvLengths, sinks: sinks,
                           dq: dq, dk: dk, dv: dv, dsinks: dsinks, gradCaptures: wanted, dcaps: dcaps, kernel: grads.kernel)
    return grads
}

/// `out:` of a backward call, checked: each gradient on the inputs' device, in its shape and
/// dtype, contiguous (the passes write rows one after another from the tensor's first byte), at an
/// offset the device can bind, and sharing no byte with another gradient or with an input.
func checkGradientOutputs(_ out: FlexGradients, shapes: [[Int]], dtype: DType, inputs: [Tensor]) throws {
    let grads = [("dq", out.dq), ("dk", out.dk), ("dv", out.dv)]
    let device = inputs[0].device
    let align = device.capabilities.minStorageBufferOffsetAlignment
    for ((name, t), shape) in zip(grads, shapes) {
        guard t.device === device else { throw FlexError("out: \(name) belongs to another device") }
        guard t.shape == shape else { throw FlexError("out: \(name) has shape \(t.shape); it must be \(shape)") }
        guard t.dtype == dtype else { throw FlexError("out: \(name) is \(t.dtype.rawValue); it must be \(dtype.rawValue), the inputs' dtype") }
        guard t.isContiguous else { throw FlexError("out: \(name) is a strided view; the backward writes contiguous gradients (copy them after, or pass a contiguous slice)") }
        guard t.byteOffset % align == 0 else {
            throw FlexError("out: \(name) starts at byte \(t.byteOffset) of its buffer, not a multiple of \(align) (\(device.capabilities.name)'s storage-buffer alignment)")
        }
    }
    func overlap(_ a: Tensor, _ b: Tensor) -> Bool {
        guard a.buffer === b.buffer, a.count > 0, b.count > 0 else { return false }
        let (x, y) = (a.byteSpan, b.byteSpan)
        return x.lower < y.upper && y.lower < x.upper
    }
    for (i, (name, t)) in grads.enumerated() {
        for (other, u) in grads[(i + 1)...] where overlap(t, u) { throw FlexError("out: \(name) and \(other) share memory; each gradient needs its own") }
        for u in inputs where overlap(t, u) { throw FlexError("out: \(name) shares memory with the input \(u.name); the backward reads the inputs while it writes the gradients") }
    }
}

/// The captures of `gradCaptures:` as the score-mod sees them, checked: float, read by the
/// score-mod, each once.
func captureGradientTargets(_ tensors: [Tensor], scoreMod: ScoreMod?, blockMask: BlockMask?) throws -> [CaptureInfo] {
    let read = scoreMod?.graph.captures ?? []
    let masked = blockMask?.maskMod?.graph.captures ?? []
    var seen: Set<Int> = []
    return try tensors.map { t in
        guard seen.insert(t.id).inserted else { throw FlexError("gradCaptures lists \(t.name) twice") }
        guard t.dtype != .int32 else { throw FlexError("gradCaptures: \(t.name) is an int32 tensor; only float captures have gradients") }
        guard let info = read.first(where: { $0.id == t.id }) else {
            if masked.contains(where: { $0.id == t.id }) {
                throw FlexError("gradCaptures: \(t.name) is read only by the mask-mod, which has no gradient (a mask keeps or drops a pair); capture it in the score-mod to learn it")
            }
            throw FlexError("gradCaptures: the score-mod does not read \(t.name)\(scoreMod == nil ? " (the call has no score-mod)" : "")")
        }
        return info
    }
}

/// The backward kernels' bindings, declared once (the generated `flex_bwd_params.glsl`).
enum BackwardBinding: Int, CaseIterable {
    case q = 0, k, v, o, gradOutput, lse, gradLSE, delta, dq, dk, dv
    case kvNum, kvIndices, fullKVNum, fullKVIndices, qNum, qIndices, fullQNum, fullQIndices
    case kvLengths, sinks, dsinks
    case partDQ, partDK, partDV
    case dcaps, partCaps
    case params, errors
    static let firstCapture = BackwardBinding.allCases.count

    var macro: String {
        let names: [BackwardBinding: String] = [.q: "Q", .k: "K", .v: "V", .o: "O", .gradOutput: "DO", .lse: "LSE", .gradLSE: "DLSE", .delta: "DELTA",
                                                .dq: "DQ", .dk: "DK", .dv: "DV", .kvNum: "KV_NUM", .kvIndices: "KV_IDX", .fullKVNum: "FULL_KV_NUM",
                                                .fullKVIndices: "FULL_KV_IDX", .qNum: "Q_NUM", .qIndices: "Q_IDX", .fullQNum: "FULL_Q_NUM",
                                                .fullQIndices: "FULL_Q_IDX", .kvLengths: "KV_LENS", .sinks: "SINKS", .dsinks: "DSINKS",
                                                .partDQ: "PART_DQ", .partDK: "PART_DK", .partDV: "PART_DV", .dcaps: "DCAPS", .partCaps: "PART_CAPS",
                                                .params: "PARAMS", .errors: "ERRORS"]
        return "BWD_BINDING_" + names[self]!
    }
}

/// The backward kernels' parameters: sizes, element offsets and strides of the inputs, the
/// BlockMask's geometry, the scale.
enum BackwardField: String, KernelParamField {
    static let slots = ParamSlots<BackwardField>()
    case B, Hq, Hkv, Lq, Lkv
    case q_base, q_sb, q_sh, q_sl, q_sd
    case k_base, k_sb, k_sh, k_sl, k_sd
    case v_base, v_sb, v_sh, v_sl, v_sd
    case o_base, o_sb, o_sh, o_sl, o_sd
    case do_base, do_sb, do_sh, do_sl, do_sd
    case lse_base, lse_sb, lse_sh, lse_sl
    case dlse_base, dlse_sb, dlse_sh, dlse_sl, has_dlse
    case mask_b, mask_h, q_bs, kv_bs, q_blocks, kv_blocks, dense
    case has_kv_lens, has_sinks
    /// Q, K, V and dO rows are contiguous and 8-aligned: the matrix passes load them 16 bytes at a time.
    case vec_ok
    /// Key splits of the dQ pass and the KV blocks each walks; query splits of the dK/dV pass and
    /// the (query head of the group, query block) units each walks (1: no split); the sum pass's
    /// element count, splits and target.
    case dq_splits, dq_split_blocks, dk_splits, dk_split_blocks, sum_n, sum_splits, sum_target
    /// The captures' gradients (pass 5): their element count, the query rows (units) each
    /// workgroup walks, and its key splits with the KV blocks each walks.
    case cg_total, cg_units, cg_splits, cg_split_blocks
    case scale
    var isFloat: Bool { self == .scale }
}

typealias BackwardParams = ParamBlock<BackwardField>

extension ParamBlock where Field == BackwardField {
    static var includeName: String { "flex_bwd_params.glsl" }
    static var glsl: String {
        var lines = ["// Generated from BackwardBinding and BackwardField (Sources/VKFlex/FlexAttention+Backward.swift)."]
        for b in BackwardBinding.allCases { lines.append("#define \(b.macro) \(b.rawValue)") }
        lines.append(membersMacro("BWD_PARAMS_MEMBERS"))
        return lines.joined(separator: "\n") + "\n"
    }
}

/// The three backward passes (Δ, dQ, dK/dV) of flex_attention_bwd.comp.
enum BackwardKernel {
    /// The backward's pipelines (Δ, dQ, dK/dV, and the sinks' gradient with `sinks`), built or
    /// found in the cache, with the mods they splice.
    struct Prepared {
        let pipelines: [Int: ComputePipeline]
        let mods: SplicedMods
        let pushParams: Bool
        /// Invocations per workgroup of the dQ and dK/dV passes, and their tiles: query rows and keys.
        let WG: Int
        var BQ = 16, BKV = 32
        /// With captures' gradients: the terms pass 5 adds per pair, and whether it uses float atomics.
        var capTerms = 0
        var capAtomic = false
        /// The dQ and dK/dV passes through cooperative matrices (flex_attention_bwd_mm.comp): their
        /// tiles (T = BQ rows owned and staged); nil: the portable passes with BQ, BKV, WG above.
        /// `mm` is the dQ pass's, `mmDKV` the dK/dV pass's (coopmat-nv tunes them apart).
        var mm: GenericTiles? = nil
        var mmDKV: GenericTiles? = nil
        /// The dK/dV pass dispatched beside the dQ pass, no barrier between (`VKFLEX_BWD_OVERLAP`).
        var overlap = true
    }

    /// Invocations a row of the Δ pass (flex_attention_bwd.comp, pass 0: its `DL`).
    static let deltaLanes = 16
    /// Invocations per workgroup of the Δ pass: 16 rows where the device allows 256 invocations.
    static func deltaWorkgroup(_ caps: DeviceCapabilities) -> Int { min(256, caps.maxWorkgroupInvocations / deltaLanes * deltaLanes) }

    /// An upper bound of the loop iterations of one staged step of flex_attention_bwd_mm.comp's
    /// passes (as emulated: the only form a driver with a loop cap runs).
    static func mmIterationsPerStep(D: Int, Dv: Int, tiles t: GenericTiles) -> Int {
        func ceilDiv(_ a: Int, _ b: Int) -> Int { (a + b - 1) / b }
        let T = t.BQ
        let stage = (ceilDiv(T * D / 8, t.WG) + ceilDiv(T * Dv / 8, t.WG)) * 5 + 1
        let products = t.soft ? softProductIterations(D: D, Dv: Dv, tiles: t) : ceilDiv(t.M * T, t.SG) * (2 + D + Dv)
        let grads = (t.M * D / t.SG) * (1 + T) + (t.M * Dv / t.SG) * (1 + T)
        return stage + products + 2 * (t.M * T / t.SG) + grads + 16
    }

    /// With software matrices (flex_mm.glsl's `VKF_MM_SOFT`) a step's products, loads and stores
    /// are loops over a lane's elements, a pair an iteration, and the loops around them stay loops:
    /// S and dP (T / N tiles of D / K and Dv / K products), their stores, the gradients' products
    /// (D / N and Dv / N tiles of T / K), the A operands' loads.
    static func softProductIterations(D: Int, Dv: Int, tiles t: GenericTiles) -> Int {
        let c = ForwardKernel.softChunk, T = t.BQ
        let (na, nb, nc) = (t.M * t.K / t.SG, t.K * t.N / t.SG, t.M * t.N / t.SG)
        let mad = (na + nb + nc) / c + 3
        let scores = (T / t.N) * (1 + ((D + Dv) / t.K) * (1 + nb / c + 1 + mad) + 2 * (1 + nc / c))
        let grads = 2 * (T / t.K) * (1 + na / c) + ((D + Dv) / t.N) * (T / t.K) * (1 + nb / c + 1 + mad)
        return scores + grads
    }

    static func prepare(shape s: AttentionShape, scoreMod: ScoreMod?, blockMask: BlockMask?, sinks: Bool, gradLSE: Bool = false,
                        gradCaptures: [CaptureInfo] = [], kernel: FlexKernel = .portable, device: Device) throws -> Prepared {
        let caps = device.capabilities
        let mods = try SplicedMods(score: scoreMod.flatMap { $0.isIdentity ? nil : $0 }, mask: blockMask?.maskMod,
                                   firstBinding: BackwardBinding.firstCapture, errorBinding: BackwardBinding.errors.rawValue, device: device)
        let tuning = try AttentionTuning.of(device)
        let push = AttentionPlanner.pushesParams(device, tuning: tuning, bytes: BackwardParams.byteCount)
        // The dQ and dK/dV passes: tiles of query rows and keys in shared memory, the largest that fit.
        guard let tiles = AttentionPlanner.backwardTiles(D: s.D, Dv: s.Dv, device: device) else {
            throw FlexError.limitExceeded("head dims \(s.D)/\(s.Dv) need more shared memory than \(caps.name) has for the backward kernels")
        }
        let WG = tiles.WG
        let maxGroups = caps.maxWorkgroupCount
        guard s.Lq <= maxGroups[0], s.Lkv <= maxGroups[0], s.Hq <= maxGroups[1], s.B <= maxGroups[2] else {
            throw FlexError.limitExceeded("the backward kernels run a workgroup per row tile: lengths \(s.Lq)/\(s.Lkv) exceed \(caps.name)'s dispatch limit \(maxGroups[0])")
        }
        var includes = mods.includes
        includes[BackwardParams.includeName] = BackwardParams.glsl
        // Pass 5 splices the mods with score_mod_cap_grads (its own text, so passes 0-4 stay the
        // pipelines of a backward without captures' gradients). Without dLSE and sinks a row's
        // dS sums to 0, so per-row terms (a bias by head or query row) are left out: exactly 0.
        let capMods = gradCaptures.isEmpty ? nil : try SplicedMods(score: scoreMod, mask: blockMask?.maskMod, firstBinding: BackwardBinding.firstCapture,
                                                                   errorBinding: BackwardBinding.errors.rawValue, gradCaptures: gradCaptures,
                                                                   rowShiftInvariant: !sinks && !gradLSE, bindsCaptures: false, device: device)
        let capAtomic = device.enabledFeatures.floatAtomicAdd
        let mm: GenericTiles?, mmDKV: GenericTiles?
        switch kernel {
        case .coopmatGeneric:
            mm = AttentionPlanner.backwardMMTiles(D: s.D, Dv: s.Dv, dtype: s.dtype, device: device, tuning: tuning)
            if mm == nil { throw FlexError.unsupported(AttentionPlanner.backwardMMProblem(s, device: device, tuning: tuning) ?? "no backward tiles fit") }
            mmDKV = mm
        case .coopmatNV:
            if let problem = AttentionPlanner.backwardNVProblem(s, device: device, tuning: tuning) { throw FlexError.unsupported(problem) }
            let rows = blockMask.map { min($0.blockSize.q, $0.blockSize.kv) } ?? AttentionPlanner.backwardDenseBlock
            mm = AttentionPlanner.backwardNVTiles(D: s.D, sharedMemory: caps.maxSharedMemory, blockRows: rows, pass: 1, forced: tuning.backwardTiles(pass: 1, D: s.D))
            mmDKV = AttentionPlanner.backwardNVTiles(D: s.D, sharedMemory: caps.maxSharedMemory, blockRows: rows, pass: 2,
                                                     forced: tuning.backwardTiles(pass: 2, D: s.D))
        default:
            (mm, mmDKV) = (nil, nil)
        }
        func pipeline(_ pass: Int) throws -> ComputePipeline {
            let spliced = pass == 5 ? capMods! : mods
            var passIncludes = includes
            passIncludes[SplicedMods.includeName] = spliced.glsl.source
            var plan = AttentionPlanner.backward(shape: s, pass: pass, tiles: [1, 2, 5].contains(pass) ? tiles : (0, 0, pass == 0 ? deltaWorkgroup(caps) : 64), pushParams: push,
                                                 mods: spliced, capAtomic: pass == 5 && capAtomic)
            // On a GPU the portable passes unroll their accumulator loops: run-time indices kept the
            // accumulators in local memory (NVIDIA: 64 and 128 bytes an invocation, sixth session's
            // statistics). A CPU device keeps the loops, which compile faster on lavapipe.
            plan.unrollAccumulators = device.capabilities.type != .cpu
            if var mm = pass == 1 ? mm : mmDKV, pass == 1 || pass == 2 || pass == 6 {
                // Pass 6: the dK half of a dK/dV pass split in two (coopmat-nv's DKV), pass 2 then the dV half.
                if mm.splitDKV, pass != 1 { mm.dkvHalf = pass == 6 ? 2 : 1 }
                plan.pass = .backward(pass == 6 ? 2 : pass)
                plan.kernel = kernel
                plan.tiles = .generic(mm)
                plan.typedOperands = !mm.emulated && device.cooperativeMatrixAPI == .khr
            }
            return try device.pipeline(for: plan) {
                PipelineDescription(source: try plan.source(), bindingCount: BackwardBinding.firstCapture + mods.tensors.count,
                                    pushConstantSize: push ? BackwardParams.byteCount : 0, includes: passIncludes,
                                    cooperativeMatrixKHR: plan.typedOperands, bfloat16Operands: plan.bfloat16Operands)
            }
        }
        // Pass 4 sums key or query splits, where the device caps a shader's loops (lavapipe), and
        // the workgroups' slices of the captures' gradients without float atomics.
        let sums = ForwardKernel.loopIterationLimit(device) != nil || (capMods != nil && !capAtomic)
        let passes = [0, 1, 2] + (sinks ? [3] : []) + (sums ? [4] : []) + (capMods != nil ? [5] : []) + (mmDKV?.splitDKV == true ? [6] : [])
        var prepared = Prepared(pipelines: Dictionary(uniqueKeysWithValues: try passes.map { ($0, try pipeline($0)) }), mods: mods, pushParams: push,
                                WG: WG, BQ: tiles.BQ, BKV: tiles.BKV)
        (prepared.mm, prepared.mmDKV) = (mm, mmDKV)
        prepared.overlap = tuning.backwardOverlap
        if let capMods {
            prepared.capTerms = capMods.glsl.captureGradientTerms
            prepared.capAtomic = capAtomic
        }
        return prepared
    }

    static func run(shape s: AttentionShape, q: Tensor, k: Tensor, v: Tensor, output: Tensor, lse: Tensor, gradOutput: Tensor, gradLSE: Tensor?,
                    scoreMod: ScoreMod?, blockMask: BlockMask?, scale: Double, kvLengths: Tensor?, sinks: Tensor?,
                    dq: Tensor, dk: Tensor, dv: Tensor, dsinks: Tensor?, gradCaptures: [CaptureInfo] = [], dcaps: [Tensor] = [],
                    kernel: FlexKernel = .portable) throws {
        let device = q.device
        let caps = device.capabilities
        guard caps.subgroupArithmetic || gradCaptures.isEmpty else {
            throw FlexError.unsupported("\(caps.name) lacks subgroup arithmetic, which the gradients of captured tensors use")
        }
        let prepared = try prepare(shape: s, scoreMod: scoreMod, blockMask: blockMask, sinks: sinks != nil, gradLSE: gradLSE != nil,
                                   gradCaptures: gradCaptures, kernel: kernel, device: device)
        let mods = prepared.mods, push = prepared.pushParams
        let (p0, p1, p2, p3) = (prepared.pipelines[0]!, prepared.pipelines[1]!, prepared.pipelines[2]!, prepared.pipelines[3])

        var slots: [BackwardBinding: BufferBinding] = [:]
        var p = BackwardParams()
        let all = 0..<s.B
        for (slot, t, heads, name) in [(BackwardBinding.q, q, 0..<s.Hq, "q"), (.k, k, 0..<s.Hkv, "k"), (.v, v, 0..<s.Hkv, "v"),
                                       (.o, output, 0..<s.Hq, "o"), (.gradOutput, gradOutput, 0..<s.Hq, "do")] {
            let (binding, base) = try ForwardKernel.bind(t, batches: all, heads: heads, writes: false, device: device)
            slots[slot] = binding
            p.setLayout(name, base: base, strides: t.strides)
        }
        let (lseBinding, lseBase) = try ForwardKernel.bind(lse, batches: all, heads: 0..<s.Hq, writes: false, device: device)
        slots[.lse] = lseBinding
        p.setLayout("lse", base: lseBase, strides: lse.strides)
        if let gradLSE {
            let (b, base) = try ForwardKernel.bind(gradLSE, batches: all, heads: 0..<s.Hq, writes: false, device: device)
            slots[.gradLSE] = b
            p.setLayout("dlse", base: base, strides: gradLSE.strides)
        } else {
            slots[.gradLSE] = BufferBinding(try ForwardKernel.dummyFloatBuffer(device))
            p.setLayout("dlse", base: 0, strides: [0, 0, 0])
        }
        p.set(.has_dlse, int: gradLSE == nil ? 0 : 1)
        let delta = try device.makeBuffer(bytes: max(16, s.B * s.Hq * s.Lq * 4))
        slots[.delta] = BufferBinding(delta, writes: true)
        slots[.dq] = dq.binding(writes: true); slots[.dk] = dk.binding(writes: true); slots[.dv] = dv.binding(writes: true)
        slots[.dsinks] = try dsinks?.binding(writes: true) ?? BufferBinding(ForwardKernel.dummyFloatBuffer(device), writes: true)
        // Inputs a call may lack (no BlockMask, key lengths or sinks) bind a stand-in the kernels then never read.
        let dummy = try ForwardKernel.dummyIndexBuffer(device)
        let optional: [(BackwardBinding, Tensor?)] = [(.kvLengths, kvLengths), (.sinks, sinks),
                                                      (.kvNum, blockMask?.kvNumBlocks), (.kvIndices, blockMask?.kvIndices), (.fullKVNum, blockMask?.fullKVNumBlocks),
                                                      (.fullKVIndices, blockMask?.fullKVIndices), (.qNum, blockMask?.qNumBlocks), (.qIndices, blockMask?.qIndices),
                                                      (.fullQNum, blockMask?.fullQNumBlocks), (.fullQIndices, blockMask?.fullQIndices)]
        for (slot, t) in optional { slots[slot] = (t ?? dummy).binding() }
        // Without a BlockMask every key block of every query block is walked, as full, in blocks
        // of the matrix passes' largest tiles (the portable passes' 64 otherwise).
        let denseBS = prepared.mm == nil ? 64 : AttentionPlanner.backwardDenseBlock
        let qBS = blockMask?.blockSize.q ?? denseBS, kvBS = blockMask?.blockSize.kv ?? denseBS
        p.set([.B: s.B, .Hq: s.Hq, .Hkv: s.Hkv, .Lq: s.Lq, .Lkv: s.Lkv, .mask_b: blockMask?.B ?? 1, .mask_h: blockMask?.H ?? 1,
               .q_bs: qBS, .kv_bs: kvBS, .q_blocks: blockMask?.qBlocks ?? (s.Lq + qBS - 1) / qBS,
               .kv_blocks: blockMask?.kvBlocks ?? (s.Lkv + kvBS - 1) / kvBS, .dense: blockMask == nil ? 1 : 0,
               .has_kv_lens: kvLengths == nil ? 0 : 1, .has_sinks: sinks == nil ? 0 : 1])
        p.set(.scale, float: Float(scale))
        // Rows readable 8 halves at a time by the matrix passes: unit inner stride, 8-aligned offsets.
        let vecOK = zip([q, k, v, gradOutput], [BackwardField.q_base, .k_base, .v_base, .do_base]).allSatisfy { t, base in
            t.strides[3] == 1 && p.int(base) % 8 == 0 && t.strides[0] % 8 == 0 && t.strides[1] % 8 == 0 && t.strides[2] % 8 == 0
        } && s.D % 8 == 0 && s.Dv % 8 == 0
        p.set(.vec_ok, int: vecOK ? 1 : 0)
        // Where the device caps a shader's loop iterations (lavapipe), the dQ pass splits each
        // row's key blocks and the dK/dV pass each key's (query head of its group, query block)
        // units into shares sized to stay under the cap (an upper bound of the loops per walked
        // block), summed by pass 4.
        let kvBlocks = p.int(.kv_blocks), qBlocks = p.int(.q_blocks), WG = prepared.WG, group = s.Hq / s.Hkv
        let (BQ, BKV) = (prepared.BQ, prepared.BKV)
        let tilesQ = (qBS + BQ - 1) / BQ, tilesK = (kvBS + BKV - 1) / BKV
        // The dQ and dK/dV passes' tiles: the matrix passes own and stage T rows at a time.
        let tilesQ12 = prepared.mm.map { (qBS + $0.BQ - 1) / $0.BQ } ?? tilesQ, tilesK12 = prepared.mmDKV.map { (kvBS + $0.BQ - 1) / $0.BQ } ?? tilesK
        guard qBlocks * max(tilesQ, tilesQ12) <= caps.maxWorkgroupCount[0], kvBlocks * max(tilesK, tilesK12) <= caps.maxWorkgroupCount[0] else {
            throw FlexError.limitExceeded("the backward's \(qBlocks * tilesQ) query tiles or \(kvBlocks * tilesK) key tiles exceed \(caps.name)'s dispatch limit \(caps.maxWorkgroupCount[0])")
        }
        var dqSplit = (count: 1, blocks: kvBlocks), dkSplit = (count: 1, blocks: group * qBlocks)
        let limit = ForwardKernel.loopIterationLimit(device)
        let budget = max(1, (limit ?? 0) * 3 / 4 - 4 * (s.D + s.Dv) - 2 * (kvBlocks + qBlocks) - 1024)
        if limit != nil {
            // Per staged tile: its staging loops, the pairs' dot products, the accumulation.
            func ceilDiv(_ a: Int, _ b: Int) -> Int { (a + b - 1) / b }
            let pairs = ceilDiv(BQ * BKV, WG) * (s.D + s.Dv + 8)
            var perKVBlock = tilesK * (ceilDiv(BKV * s.D, WG) + ceilDiv(BKV * s.Dv, WG) + pairs + ceilDiv(BQ * s.D, WG) * (BKV + 1) + 8)
            var perQBlock = tilesQ * (ceilDiv(BQ * s.D, WG) + ceilDiv(BQ * s.Dv, WG) + 1 + pairs
                                              + (ceilDiv(BKV * s.D, WG) + ceilDiv(BKV * s.Dv, WG)) * (BQ + 1) + 8)
            if let mm = prepared.mm {
                let step = mmIterationsPerStep(D: s.D, Dv: s.Dv, tiles: mm)
                (perKVBlock, perQBlock) = (tilesK12 * step, tilesQ12 * step)
            }
            let dqBlocks = max(1, budget / perKVBlock), dkBlocks = max(1, budget / perQBlock)   // dkBlocks: units
            if dqBlocks < kvBlocks { dqSplit = ((kvBlocks + dqBlocks - 1) / dqBlocks, dqBlocks) }
            let dkUnits = group * qBlocks
            if dkBlocks < dkUnits { dkSplit = ((dkUnits + dkBlocks - 1) / dkBlocks, dkBlocks) }
        }
        let nDQ = s.B * s.Hq * s.Lq * s.D, nDK = s.B * s.Hkv * s.Lkv * s.D, nDV = s.B * s.Hkv * s.Lkv * s.Dv
        func scratch(_ splits: Int, _ n: Int) throws -> Buffer {
            guard splits > 1 else { return try ForwardKernel.dummyFloatBuffer(device) }
            guard splits * n * 4 <= caps.maxStorageBufferRange else {
                throw FlexError.limitExceeded("\(caps.name) stops a shader's loops after 65535 iterations, so the backward splits its work into \(splits) parts whose partial gradients (\(formatBytes(splits * n * 4))) exceed what it binds per buffer; pass fewer rows or heads per call")
            }
            return try device.makeBuffer(bytes: splits * n * 4)
        }
        let (partDQ, partDK, partDV) = (try scratch(dqSplit.count, nDQ), try scratch(dkSplit.count, nDK), try scratch(dkSplit.count, nDV))
        slots[.partDQ] = BufferBinding(partDQ, writes: true); slots[.partDK] = BufferBinding(partDK, writes: true)
        slots[.partDV] = BufferBinding(partDV, writes: true)
        p.set([.dq_splits: dqSplit.count, .dq_split_blocks: dqSplit.blocks, .dk_splits: dkSplit.count, .dk_split_blocks: dkSplit.blocks,
               .sum_n: 0, .sum_splits: 1, .sum_target: 0])
        guard s.B * max(dqSplit.count, dkSplit.count) <= caps.maxWorkgroupCount[2] else {
            throw FlexError.limitExceeded("\(s.B) batches x \(max(dqSplit.count, dkSplit.count)) splits exceed \(caps.name)'s dispatch limit")
        }
        // The captures' gradients (pass 5): units are query tiles times key splits. With float
        // atomics a workgroup walks one unit and adds into `dcapsBuffer`; without, a workgroup walks
        // cg_units units into its own slice of `partCaps` (at most 1024 slices, within 256 MiB),
        // which pass 4 sums. Under a loop cap the key splits and the units per workgroup keep each
        // invocation's loop iterations under it (the adds without atomics scan terms x WG staged
        // values per step of a tile's pairs).
        let capTotal = dcaps.reduce(0) { $0 + $1.count }
        var capWorkgroups = 0, capUnits = 1, capSplit = (count: 1, blocks: kvBlocks)
        var dcapsBuffer = try ForwardKernel.dummyFloatBuffer(device), partCaps = dcapsBuffer
        if !gradCaptures.isEmpty {
            let terms = max(1, prepared.capTerms), atomic = prepared.capAtomic
            // Per staged key tile: its staging, then each step of the tile's pairs (the dot
            // products, the adds: without atomics a scan of terms × WG staged values).
            let steps = (BQ * BKV + WG - 1) / WG
            let perKVBlock = tilesK * ((BKV * (s.D + s.Dv) + WG - 1) / WG + steps * (s.D + s.Dv + 16 + (atomic ? 2 * terms : terms * (WG + 2))) + 8)
            if limit != nil {
                let blocks = max(1, budget / perKVBlock)
                if blocks < kvBlocks { capSplit = ((kvBlocks + blocks - 1) / blocks, blocks) }
            }
            let units = s.B * s.Hq * qBlocks * tilesQ * capSplit.count   // query tiles × key splits, as pass 1
            if atomic {
                capWorkgroups = units
            } else {
                let slices = min(units, max(1, min(caps.maxStorageBufferRange, 256 << 20) / (capTotal * 4)), 1024)
                capUnits = (units + slices - 1) / slices
                if limit != nil { capUnits = min(capUnits, max(1, budget / (capSplit.blocks * perKVBlock + (BQ * (s.D + s.Dv) + WG - 1) / WG + 64))) }
                capWorkgroups = (units + capUnits - 1) / capUnits
                guard capWorkgroups * capTotal * 4 <= caps.maxStorageBufferRange else {
                    throw FlexError.limitExceeded("\(caps.name) has no float atomics, so the captures' gradients (\(capTotal) elements) are summed from \(capWorkgroups) partial copies, which exceed what it binds per buffer (\(formatBytes(caps.maxStorageBufferRange))); pass fewer rows or heads per call, or smaller captures")
                }
                partCaps = try device.makeBuffer(bytes: capWorkgroups * capTotal * 4)
            }
            dcapsBuffer = try device.makeBuffer(bytes: capTotal * 4)
        }
        slots[.dcaps] = BufferBinding(dcapsBuffer, writes: true)
        slots[.partCaps] = BufferBinding(partCaps, writes: true)
        p.set([.cg_total: capTotal, .cg_units: capUnits, .cg_splits: capSplit.count, .cg_split_blocks: capSplit.blocks])
        let (errors, errorCheck) = try ForwardKernel.errorFlag(mods: mods, scoreMod: scoreMod, blockMask: blockMask, device: device)
        slots[.errors] = BufferBinding(errors, writes: true)
        // The parameters of one dispatch (the sum passes differ by their element count and target).
        func bindings(_ params: [UInt8]) throws -> [BufferBinding] {
            var all = slots
            if push {
                all[.params] = BufferBinding(try ForwardKernel.dummyFloatBuffer(device))
            } else {
                let buffer = try device.makeBuffer(bytes: params.count)
                try buffer.upload(params)
                all[.params] = BufferBinding(buffer)
            }
            return BackwardBinding.allCases.map { all[$0]! } + mods.captureBindings()
        }
        let params = p.bytes()
        let main = try bindings(params), pc = push ? params : []
        var sums: [([BufferBinding], [UInt8], Int)] = []
        let capSlices = gradCaptures.isEmpty || prepared.capAtomic ? 1 : capWorkgroups
        for (target, splits, n) in [(0, dqSplit.count, nDQ), (1, dkSplit.count, nDK), (2, dkSplit.count, nDV), (3, capSlices, capTotal)] where splits > 1 {
            var sp = p
            sp.set([.sum_n: n, .sum_splits: splits, .sum_target: target])
            let bytes = sp.bytes()
            sums.append((try bindings(bytes), push ? bytes : [], n))
        }
        try device.record { rec in
            // The Δ pass: deltaLanes invocations a row; past 4,096 workgroups (about one wave of an H100's
            // 132 SMs at 2,048 invocations each) they stride over the rows.
            let deltaRows = deltaWorkgroup(caps) / deltaLanes
            try rec.dispatch(p0, bindings: main, pushConstants: pc, groups: (min((s.B * s.Hq * s.Lq + deltaRows - 1) / deltaRows, 4096), 1, 1))
            try rec.dispatch(p1, bindings: main, pushConstants: pc, groups: (qBlocks * tilesQ12, s.Hq, s.B * dqSplit.count))
            // The dK/dV pass (and its dK half) beside the dQ pass: they read the same inputs and
            // write apart, so the one's first workgroups fill the compute units the other's last
            // leave idle (a tile pass ends in a partial wave: 8,192 workgroups on 264 slots at D = 128).
            try rec.dispatch(p2, bindings: main, pushConstants: pc, groups: (kvBlocks * tilesK12, s.Hkv, s.B * dkSplit.count), overlapsPrevious: prepared.overlap)
            if let p6 = prepared.pipelines[6] {
                try rec.dispatch(p6, bindings: main, pushConstants: pc, groups: (kvBlocks * tilesK12, s.Hkv, s.B * dkSplit.count), overlapsPrevious: prepared.overlap)
            }
            if let p3 { try rec.dispatch(p3, bindings: main, pushConstants: pc, groups: (s.Hq, 1, 1)) }
            if let p5 = prepared.pipelines[5] {
                rec.fill(prepared.capAtomic ? dcapsBuffer : partCaps, pattern: 0, bytes: prepared.capAtomic ? capTotal * 4 : partCaps.size)
                let gx = min(capWorkgroups, caps.maxWorkgroupCount[0])
                try rec.dispatch(p5, bindings: main, pushConstants: pc, groups: (gx, (capWorkgroups + gx - 1) / gx, 1))
            }
            for (b, pcs, n) in sums {
                let groups = (n + 63) / 64, gx = min(groups, caps.maxWorkgroupCount[0])
                try rec.dispatch(prepared.pipelines[4]!, bindings: b, pushConstants: pcs, groups: (gx, (groups + gx - 1) / gx, 1))
            }
            var offset = 0
            for t in dcaps {
                rec.copy(from: dcapsBuffer, to: t.buffer, bytes: t.count * 4, sourceOffset: offset * 4, destinationOffset: t.byteOffset)
                offset += t.count
            }
        }
        ForwardKernel.addChecks(errorCheck, blockMask: blockMask, to: [dq, dk, dv, dsinks] + dcaps)
    }
}
