import Foundation
import VKFlexExpr
import VKFlexVulkan

/// What ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)`` returns.
public struct FlexResult {
    /// `[B, Hq, Lq, Dv]`, in the query's dtype.
    public var output: Tensor
    /// `[B, Hq, Lq]` float32, natural log; `-inf` on rows where every score is masked. Only with `returnLSE: true`.
    public var lse: Tensor?
    /// `[B, Hq, Lq]` float32: each row's largest score after scale, score-mod and mask (natural
    /// units, PyTorch's `max_scores`); `-inf` on rows with no key, NaN on NaN rows. Only with
    /// `returnMaxScores: true`; no gradient flows through it.
    public var maxScores: Tensor?
    /// The kernel that ran.
    public var kernel: FlexKernel = .portable
    /// What the backward needs of the call (``backward(gradOutput:gradLSE:gradCaptures:out:options:)``).
    var saved: SavedForBackward?
}

/// The inputs and mods of a forward call, kept for its backward.
struct SavedForBackward {
    let q: Tensor, k: Tensor, v: Tensor
    let scoreMod: ScoreMod?, blockMask: BlockMask?
    let scale: Double, enableGQA: Bool
    let kvLengths: Tensor?, sinks: Tensor?
    /// What the call had that the backward does not take (query offsets, a page table), if anything.
    var notDifferentiable: String? = nil
}

extension FlexResult {
    /// The gradients of this call: what
    /// ``flexAttentionBackward(_:_:_:output:lse:gradOutput:gradLSE:scoreMod:blockMask:scale:enableGQA:kvLengths:sinks:gradCaptures:out:options:)``
    /// returns for its inputs, mods and outputs, so a training loop need not pass them again.
    ///
    /// ```swift
    /// let forward = try flexAttention(q, k, v, scoreMod: softcap, blockMask: mask, returnLSE: true)
    /// let grads = try forward.backward(gradOutput: dO)
    /// ```
    ///
    /// - gradCaptures: float tensors the score-mod captures whose gradients to return (a learnable
    ///   bias): ``FlexGradients/gradient(of:)``.
    /// - out: tensors to write dQ, dK and dV into (a previous step's gradients: no new memory), as
    ///   ``flexAttentionBackward(_:_:_:output:lse:gradOutput:gradLSE:scoreMod:blockMask:scale:enableGQA:kvLengths:sinks:gradCaptures:out:options:)``.
    /// - options: the dQ and dK/dV passes' kernel (`.portable`, `.coopmatNV` or `.coopmatGeneric`;
    ///   default: the planner's, ``FlexGradients/kernel`` says which ran).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` when the forward ran without `returnLSE: true`;
    ///   what the backward throws.
    public func backward(gradOutput: Tensor, gradLSE: Tensor? = nil, gradCaptures: [Tensor] = [], out: FlexGradients? = nil,
                         options: FlexOptions = FlexOptions()) throws -> FlexGradients {
        guard let saved else { throw FlexError("this result has no forward call to differentiate") }
        guard let lse else { throw FlexError("backward needs the LSE: call flexAttention with returnLSE: true") }
        if let what = saved.notDifferentiable {
            throw FlexError.unsupported("the backward does not take \(what) (a serving call); differentiate the call over the whole sequence with contiguous K and V")
        }
        return try flexAttentionBackward(saved.q, saved.k, saved.v, output: output, lse: lse, gradOutput: gradOutput, gradLSE: gradLSE,
                                         scoreMod: saved.scoreMod, blockMask: saved.blockMask, scale: saved.scale, enableGQA: saved.enableGQA,
                                         kvLengths: saved.kvLengths, sinks: saved.sinks, gradCaptures: gradCaptures, out: out, options: options)
    }
}

/// Which kernel runs an attention call.
///
/// `VKFLEX_KERNEL=portable|coopmat-nv|split-kv` (or ``FlexOptions/kernel`` per call) forces one;
/// a forced kernel the inputs or device cannot use is an error. By default vkflex takes split-KV
/// for up to 16 query rows (decoding), else the cooperative-matrix kernel where it applies, else
/// the portable one.
public enum FlexKernel: String, Sendable, CaseIterable {
    /// Scalar math, any Vulkan device, any head dim, float32, float16 or bfloat16 (computed in float32).
    case portable
    /// Cooperative matrices in NVIDIA's fragment order (through `VK_KHR_cooperative_matrix`, else
    /// `VK_NV_cooperative_matrix`, see ``CooperativeMatrixAPI``): float16, or bfloat16 where the
    /// device has bfloat16 cooperative matrices (KHR only); head dim = value dim, a
    /// multiple of 16 up to 256, on a device whose fragment element order is NVIDIA's
    /// (``CooperativeMatrixLayout/nvidiaMMA``, measured once per device).
    case coopmatNV = "coopmat-nv"
    /// Split-KV decoding, any Vulkan device: for up to 16 query rows, each KV head's keys are
    /// split across workgroups that hold the query heads sharing it (read once per group), and a
    /// second pass merges the splits. What the planner picks for decode steps.
    case splitKV = "split-kv"
    /// Cooperative matrices through `VK_KHR_cooperative_matrix` with no assumption about a
    /// vendor's element order or subgroup size (scores and P pass through shared memory): float16,
    /// or bfloat16 where the device has bfloat16 matrices; head dims that the device's matrix
    /// shapes divide. What AMD, Intel and other devices with the extension get (and bfloat16 calls
    /// on NVIDIA), once a first call matched the portable kernel there. Forced on a device
    /// without cooperative matrices it runs its products as scalar loops (slowly: for testing).
    case coopmatGeneric = "coopmat-generic"

    /// The kernel a name picks: `portable`, `coopmat-nv` (`coopmat` is kept as its old name),
    /// `coopmat-generic`, `split-kv`.
    public init?(name: String) {
        switch name.lowercased() {
        case "portable": self = .portable
        case "coopmat-nv", "coopmat": self = .coopmatNV
        case "split-kv": self = .splitKV
        case "coopmat-generic": self = .coopmatGeneric
        default: return nil
        }
    }

    /// Why this kernel cannot run a call with these inputs on `device`, or nil when it can.
    public func problem(_ q: Tensor, _ k: Tensor, _ v: Tensor, blockMask: BlockMask? = nil, enableGQA: Bool = false) -> String? {
        guard let shape = try? AttentionShape(q, k, v, blockMask: blockMask, enableGQA: enableGQA) else { return "the inputs are rejected" }
        switch self {
        case .portable: return nil
        case .coopmatNV: return AttentionPlanner.coopmatProblem(shape, device: q.device, tuning: (try? AttentionTuning.of(q.device)) ?? AttentionTuning())
        case .splitKV: return AttentionPlanner.decodeProblem(shape, device: q.device)
        case .coopmatGeneric: return AttentionPlanner.genericProblem(shape, device: q.device, tuning: (try? AttentionTuning.of(q.device)) ?? AttentionTuning())
        }
    }

}

/// Per-call choices (PyTorch's `kernel_options`): they override the `VKFLEX_*` variables for
/// one call.
///
/// ```swift
/// let r = try flexAttention(q, k, v, blockMask: mask, options: FlexOptions(kernel: .portable))
/// ```
public struct FlexOptions: Sendable, Hashable {
    /// Forces a kernel (nil: `VKFLEX_KERNEL`, else the fastest that applies).
    public var kernel: FlexKernel?
    public init(kernel: FlexKernel? = nil) { self.kernel = kernel }
}

/// PyTorch's `flex_attention`: softmax(score_mod(scale · Q Kᵀ) masked by the BlockMask) · V, as one
/// fused block-sparse kernel.
///
/// ```swift
/// let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: S, kvLen: S, device: device)
/// let softcap = ScoreMod { score, _, _, _, _ in 20 * tanh(score / 20) }
/// let result = try flexAttention(q, k, v, scoreMod: softcap, blockMask: causal, returnLSE: true)
/// let out = try result.output.toArray()
/// ```
///
/// - q: `[B, Hq, Lq, D]`, k: `[B, Hkv, Lkv, D]`, v: `[B, Hkv, Lkv, Dv]`; float32 or float16 (all the
///   same); any head dims 1–256; `Lq` and `Lkv` independent; strided views work without a copy.
/// - scoreMod: applied to `scale · q·k` before masking. nil means the identity.
/// - blockMask: from ``createBlockMask(_:B:H:qLen:kvLen:device:blockSize:backend:)``; its lengths
///   must be the inputs' and its B/H 1 or the inputs'. nil means dense (every pair).
/// - scale: default `1/sqrt(D)`.
/// - enableGQA: allow `Hq` a multiple of `Hkv`; query head `h` reads key/value head `h / (Hq/Hkv)`.
/// - kvLengths: int32 `[B]`: batch `b` has only its first `kvLengths[b]` keys (a contiguous cache
///   filled up to a different length per sequence); keys at or past it are never loaded nor given
///   to a mod, full blocks included, and a row left with no key gives 0 / LSE `-inf`. The values
///   are checked to lie in `0...Lkv`: from the host's copy for a tensor made from host values
///   (`device.tensor([...])`, `copy(from:)`), else read back (the call then waits for the tensor's writer).
/// - qOffset: where the query rows sit in their sequence (``QueryOffset``: an Int for every batch,
///   or an int32 `[B]` tensor): row `i` of batch `b` is position `i + offset[b]`, which the mods
///   see as `q_idx` and the BlockMask is walked at; the BlockMask then covers the whole sequence
///   (`qLen` at least the last position + 1). Default 0. Runs the portable kernel.
/// - pageTable: read K and V as paged caches (``PageTable``; ``PagedKVCache`` manages one): `k`
///   and `v` are then physical `[1, Hkv, pages·pageSize, D]`, the mods see logical key indices,
///   each batch has the table's length (instead of `kvLengths:`), and a BlockMask's `kvLen` is
///   `maxPages·pageSize`. Runs the portable kernel.
/// - sinks: float32 `[Hq]`: each head's sink logit (gpt-oss, StreamingLLM) joins every softmax
///   denominator with no value row: `out_i = Σ_j exp(s_ij − m) v_j / (exp(sink_h − m) + Σ_j exp(s_ij − m))`.
///   Not scaled, through neither mod; the LSE includes it, and a row with no key gives 0 and LSE
///   `sink_h`. (Merging two partial attentions by their LSEs then counts the sink twice: merge
///   attentions computed without it and add it once.)
/// - out: a caller's tensor to write (shape `[B, Hq, Lq, Dv]`, the query's dtype).
/// - options: per-call choices, such as forcing a kernel (``FlexOptions``).
///
/// The call enqueues the work and returns at once; reading the output waits for it. A captured
/// index out of range (or an integer division by zero) in a mod makes reading the output throw.
///
/// - Throws: ``FlexError/invalidArgument(_:)`` for shapes, dtypes, a BlockMask built for other lengths or heads, GQA without `enableGQA`, a bad `out`; ``FlexError/expression(_:)`` for a mod that does not type-check; ``FlexError/limitExceeded(_:)`` when a tensor exceeds what the device binds; ``FlexError/vulkan(call:result:)`` and ``FlexError/shaderCompile(_:)`` from the device. A mod that fails while it runs (``FlexError/modFailed(_:)``) is thrown when the output is read.
public func flexAttention(_ q: Tensor, _ k: Tensor, _ v: Tensor, scoreMod: ScoreMod? = nil, blockMask: BlockMask? = nil,
                          scale: Double? = nil, enableGQA: Bool = false, kvLengths: Tensor? = nil, qOffset: QueryOffset? = nil,
                          pageTable: PageTable? = nil, sinks: Tensor? = nil, returnLSE: Bool = false, returnMaxScores: Bool = false,
                          out: Tensor? = nil, options: FlexOptions = FlexOptions()) throws -> FlexResult {
    let shape = try AttentionShape(q, k, v, blockMask: blockMask, enableGQA: enableGQA, queryOffsets: qOffset != nil,
                                   pagedKeys: pageTable?.logicalKeys)
    let device = q.device
    if pageTable != nil, kvLengths != nil { throw FlexError("kvLengths: with pageTable: the lengths are the page table's (pageTable.lengths)") }
    let paging = try pageTable?.resolve(batches: shape.B, physicalKeys: k.shape[2], device: device)
    let offsets = try qOffset?.resolve(shape: shape, blockMask: blockMask, device: device)
    if qOffset != nil, offsets == nil, let m = blockMask, m.qLen != shape.Lq {
        throw FlexError("the BlockMask was built for qLen=\(m.qLen) but the inputs have qLen=\(shape.Lq) and every qOffset is 0: build it for these lengths")
    }
    if let out {
        guard out.device === device else { throw FlexError("out: the tensor belongs to another device") }
        guard out.shape == [shape.B, shape.Hq, shape.Lq, shape.Dv] else {
            throw FlexError("out: shape \(out.shape) should be \([shape.B, shape.Hq, shape.Lq, shape.Dv])")
        }
        guard out.dtype == q.dtype else { throw FlexError("out: dtype \(out.dtype.rawValue) should be the query's, \(q.dtype.rawValue)") }
    }
    try checkSinks(sinks, shape: shape, device: device)
    try checkKVLengths(kvLengths, shape: shape, device: device)
    let keyLengths = paging?.lengths ?? kvLengths
    let scale = scale ?? 1 / Double(shape.D).squareRoot()
    guard scale.isFinite else { throw FlexError("scale must be finite, got \(scale)") }
    let output = try out ?? device.empty(shape: [shape.B, shape.Hq, shape.Lq, shape.Dv], dtype: q.dtype, name: "output")
    let lse = returnLSE ? try device.empty(shape: [shape.B, shape.Hq, shape.Lq], dtype: .float32, name: "lse") : nil
    let maxScores = returnMaxScores ? try device.empty(shape: [shape.B, shape.Hq, shape.Lq], dtype: .float32, name: "max_scores") : nil
    let notForCoopmat = offsets != nil ? "qOffset:" : paging != nil ? "pageTable:" : nil
    var kernel = try AttentionPlanner.kernel(shape, device: device, forced: options.kernel, notForCoopmat: notForCoopmat, maxScores: returnMaxScores)
    if shape.B == 0 || shape.Hq == 0 || shape.Lq == 0 || shape.Dv == 0 { return FlexResult(output: output, lse: lse, maxScores: maxScores, kernel: kernel) }
    // No keys: every row is fully masked (output 0, LSE -inf), which the kernels give for a key
    // range of length 0; they only need K and V buffers to bind, so one-row stand-ins take their place.
    let (originalK, originalV) = (k, v)
    var (k, v) = (k, v)
    if paging != nil, shape.Lkv > 0 {
        // The physical caches as [B, ...] views with batch stride 0: every batch binds the same pages.
        k = try k.asStrided(shape: [shape.B] + k.shape.dropFirst(), strides: [0] + k.strides.dropFirst())
        v = try v.asStrided(shape: [shape.B] + v.shape.dropFirst(), strides: [0] + v.strides.dropFirst())
    }
    if shape.Lkv == 0 {
        k = try device.empty(shape: [shape.B, shape.Hkv, 1, shape.D], dtype: k.dtype, name: "no_keys")
        v = try device.empty(shape: [shape.B, shape.Hkv, 1, shape.Dv], dtype: v.dtype, name: "no_values")
    }
    kernel = try ForwardKernel.run(shape: shape, q: q, k: k, v: v, scoreMod: scoreMod, blockMask: blockMask, scale: scale,
                            output: output, lse: lse, maxScores: maxScores, kvLengths: keyLengths, sinks: sinks, qOffsets: offsets,
                            paging: paging, kernel: kernel)
    return FlexResult(output: output, lse: lse, maxScores: maxScores, kernel: kernel,
                      saved: SavedForBackward(q: q, k: originalK, v: originalV, scoreMod: scoreMod, blockMask: blockMask, scale: scale,
                                              enableGQA: enableGQA, kvLengths: kvLengths, sinks: sinks, notDifferentiable: offsets != nil ? "qOffset:" : paging != nil ? "pageTable:" : nil))
}

/// Builds, ahead of time, the kernel that ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)``
/// with the same arguments will run: the GLSL → SPIR-V compile and the pipeline creation that
/// make up a first call's cost (on an H200 about 1 s for the cooperative-matrix kernel when
/// neither vkflex's SPIR-V cache nor the driver's shader cache has it, under 10 ms when both do;
/// docs/performance.md, "First call"); with `backward: true` the backward's pipelines too (for
/// ``flexAttentionBackward(_:_:_:output:lse:gradOutput:gradLSE:scoreMod:blockMask:scale:enableGQA:kvLengths:sinks:gradCaptures:out:options:)``
/// without sinks). Nothing is dispatched and the tensors' contents are not
/// read, so it can run while they are being filled, and from another thread: a kernel is built
/// once however many threads ask for it.
///
/// ```swift
/// let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: S, kvLen: S, device: device)
/// let softcap = ScoreMod { score, _, _, _, _ in 20 * tanh(score / 20) }
/// try prepareFlexAttention(q, k, v, scoreMod: softcap, blockMask: causal)   // compiles now
/// let result = try flexAttention(q, k, v, scoreMod: softcap, blockMask: causal)   // no compile
/// ```
///
/// The kernel depends on the head dims, the dtype, the mods (the shapes of the tensors they
/// capture included), the sign of the scale, the device, whether there is a BlockMask, whether
/// the call returns the LSE (`returnLSE:`, implied by `backward: true`) and, for
/// BlockMask query blocks that are not a multiple of 128 rows, the block size — not on the batch, the number of heads or the
/// lengths — so one call prepares every shape that shares those. Arguments are
/// checked as `flexAttention` checks them. Returns the kernel that was prepared. For decode steps
/// pass what the steps pass (`qOffset:`, `pageTable:`, `kvLengths:`: their values are not read,
/// only their presence selects the kernel's variant); a split-KV kernel's merge pass is built too.
///
/// ```swift
/// // A serving loop's first step compiles nothing (qStep: [B, H, 1, D]).
/// let cache = try PagedKVCache(device: device, kvHeads: 8, headDim: 64, pageSize: 128, pages: 64, entries: 4, maxLength: 2048)
/// try prepareFlexAttention(q, cache.k, cache.v, blockMask: mask, qOffset: .uniform(1), pageTable: try cache.pageTable())
/// ```
///
/// - Throws: what ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)`` throws for the same arguments.
@discardableResult
public func prepareFlexAttention(_ q: Tensor, _ k: Tensor, _ v: Tensor, scoreMod: ScoreMod? = nil, blockMask: BlockMask? = nil,
                                 scale: Double? = nil, enableGQA: Bool = false, kvLengths: Tensor? = nil, qOffset: QueryOffset? = nil,
                                 pageTable: PageTable? = nil, returnLSE: Bool = false, returnMaxScores: Bool = false,
                                 backward: Bool = false, options: FlexOptions = FlexOptions()) throws -> FlexKernel {
    let shape = try AttentionShape(q, k, v, blockMask: blockMask, enableGQA: enableGQA, queryOffsets: qOffset != nil,
                                   pagedKeys: pageTable?.logicalKeys)
    let scale = scale ?? 1 / Double(shape.D).squareRoot()
    guard scale.isFinite else { throw FlexError("scale must be finite, got \(scale)") }
    let notForCoopmat = qOffset != nil ? "qOffset:" : pageTable != nil ? "pageTable:" : nil
    let kernel = try AttentionPlanner.kernel(shape, device: q.device, forced: options.kernel, notForCoopmat: notForCoopmat, maxScores: returnMaxScores)
    _ = try ForwardKernel.prepare(shape: shape, scoreMod: scoreMod, blockMask: blockMask, scale: scale, kernel: kernel,
                                  device: q.device, maxScores: returnMaxScores, kvLengths: kvLengths != nil || pageTable != nil,
                                  qOffsets: qOffset.map { if case .uniform(0) = $0 { false } else { true } } ?? false, paged: pageTable != nil,
                                  lse: returnLSE || backward)
    if kernel == .splitKV { _ = try ForwardKernel.mergePipeline(outDType: q.dtype, Dv: shape.Dv, device: q.device) }
    if backward {
        // The backward's dQ and dK/dV passes as the backward will choose them: portable and
        // coopmat-generic when forced; a forward forced to coopmat-nv leaves the backward to the
        // planner (which takes coopmat-nv where its passes apply: up to D = 128).
        let forced = options.kernel.flatMap { $0 == .portable || $0 == .coopmatGeneric ? $0 : nil }
        let backwardKernel = try AttentionPlanner.backwardKernel(shape, device: q.device, forced: forced)
        _ = try BackwardKernel.prepare(shape: shape, scoreMod: scoreMod, blockMask: blockMask, sinks: false, kernel: backwardKernel, device: q.device)
    }
    return kernel
}


/// `sinks:` must be float32 `[Hq]` on the call's device.
func checkSinks(_ sinks: Tensor?, shape: AttentionShape, device: Device) throws {
    guard let sinks else { return }
    guard sinks.device === device else { throw FlexError("sinks: the tensor belongs to another device") }
    guard sinks.dtype == .float32, sinks.shape == [shape.Hq] else {
        throw FlexError("sinks must be float32 [Hq] = [\(shape.Hq)], one per query head, got \(sinks.dtype.rawValue) \(sinks.shape)")
    }
}

/// `kvLengths:` must be int32 `[B]` with values in `0...Lkv` (read back to check them).
func checkKVLengths(_ kvLengths: Tensor?, shape: AttentionShape, device: Device) throws {
    guard let kvLengths else { return }
    guard kvLengths.device === device else { throw FlexError("kvLengths: the tensor belongs to another device") }
    guard kvLengths.dtype == .int32, kvLengths.shape == [shape.B] else {
        throw FlexError("kvLengths must be int32 [B] = [\(shape.B)], got \(kvLengths.dtype.rawValue) \(kvLengths.shape)")
    }
    if let (b, n) = try kvLengths.int32Values().enumerated().first(where: { $0.element < 0 || Int($0.element) > shape.Lkv }) {
        throw FlexError("kvLengths[\(b)] = \(n) is outside 0...\(shape.Lkv) (the key length)")
    }
}
