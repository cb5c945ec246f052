import Foundation
import VKFlexExpr
import VKFlexVulkan

/// What ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:returnLSE:returnMaxScores:out:options:)`` returns.
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
}

/// Which kernel runs an attention call.
///
/// `VKFLEX_KERNEL=portable|coopmat-nv` (or ``FlexOptions/kernel`` per call) forces one; a forced
/// kernel the inputs or device cannot use is an error. By default vkflex takes the
/// cooperative-matrix kernel where it applies.
public enum FlexKernel: String, Sendable, CaseIterable {
    /// Scalar math, any Vulkan device, any head dim, float32 or float16.
    case portable
    /// Cooperative matrices in NVIDIA's fragment order (through `VK_KHR_cooperative_matrix`, else
    /// `VK_NV_cooperative_matrix`, see ``CooperativeMatrixAPI``): float16, head dim = value dim, a
    /// multiple of 16 up to 256, on a device whose fragment element order is NVIDIA's
    /// (``CooperativeMatrixLayout/nvidiaMMA``, measured once per device).
    case coopmatNV = "coopmat-nv"

    /// The kernel a name picks: `portable`, `coopmat-nv` (`coopmat` is kept as its old name).
    public init?(name: String) {
        switch name.lowercased() {
        case "portable": self = .portable
        case "coopmat-nv", "coopmat": self = .coopmatNV
        default: return nil
        }
    }

    /// Why this kernel cannot run a call with these inputs on `device`, or nil when it can.
    public func problem(_ q: Tensor, _ k: Tensor, _ v: Tensor, blockMask: BlockMask? = nil, enableGQA: Bool = false) -> String? {
        guard let shape = try? AttentionShape(q, k, v, blockMask: blockMask, enableGQA: enableGQA) else { return "the inputs are rejected" }
        return self == .portable ? nil : FlexKernel.coopmatProblem(shape, device: q.device)
    }

    /// Why `coopmat` cannot run this call, or nil when it can.
    static func coopmatProblem(_ s: AttentionShape, device: Device) -> String? {
        let caps = device.capabilities
        if device.cooperativeMatrixAPI == nil { return "\(caps.name) has no VK_NV_cooperative_matrix or VK_KHR_cooperative_matrix" }
        if !device.cooperativeMatrixShapes.contains(where: { $0.m == 16 && $0.n == 16 && $0.k == 16 && $0.a == "float16" && $0.result == "float32" }) {
            return "\(caps.name) offers no 16x16x16 float16 -> float32 cooperative matrix"
        }
        if caps.subgroupSize != 32 { return "the cooperative-matrix kernel needs a subgroup size of 32" }
        if let problem = shapeProblem(dtype: s.dtype, D: s.D, Dv: s.Dv) { return problem }
        if CoopmatTiles(D: s.D, device: device) == nil {
            if let forced = ProcessInfo.processInfo.environment["VKFLEX_COOPMAT_TILES"] {
                return "VKFLEX_COOPMAT_TILES=\(forced) does not fit \(caps.maxSharedMemory) bytes of shared memory at head dim \(s.D)"
            }
            return "not enough shared memory for the cooperative-matrix tiles"
        }
        guard let layout = CooperativeMatrixLayout.of(device) else { return "the cooperative-matrix layout of \(caps.name) could not be measured" }
        if !layout.matches(CooperativeMatrixLayout.nvidiaMMA) {
            return "\(caps.name) lays out cooperative-matrix elements in a way the kernel is not written for (\(layout.summary))"
        }
        return nil
    }

    /// Why `coopmat` cannot take inputs of this dtype and these head dims, or nil when it can.
    static func shapeProblem(dtype: DType, D: Int, Dv: Int) -> String? {
        if dtype != .float16 { return "the cooperative-matrix kernel takes float16 inputs" }
        if D != Dv || D % 16 != 0 || D > 256 {
            return "the cooperative-matrix kernel needs head dim = value dim, a multiple of 16 up to 256 (got \(D)/\(Dv))"
        }
        return nil
    }

    /// The kernel for a call: the call's option, else `VKFLEX_KERNEL` when set, else coopmat-nv
    /// where it applies.
    static func choose(_ s: AttentionShape, device: Device, forced: FlexKernel? = nil) throws -> FlexKernel {
        if let forced = ProcessInfo.processInfo.environment["VKFLEX_COOPMAT_TILES"], CoopmatTiles.parse(forced) == nil {
            throw FlexError("VKFLEX_COOPMAT_TILES=\(forced): use BKVxRPWxNSGxNBUF[xP[xS]] with BKV a multiple of 16 up to 128, RPW 1-2, NSG 1-8, NBUF 1-2, P 0-1, S 1-4 and S·BKV at most 128 (e.g. 32x2x4x1x1x2)")
        }
        let env = ProcessInfo.processInfo.environment["VKFLEX_KERNEL"] ?? ""
        let kernel: FlexKernel?
        let source: String
        if let forced {
            kernel = forced; source = "kernel: .\(forced == .portable ? "portable" : "coopmatNV")"
        } else if env.isEmpty || env.lowercased() == "auto" {
            return coopmatProblem(s, device: device) == nil ? .coopmatNV : .portable
        } else {
            guard let k = FlexKernel(name: env) else { throw FlexError("VKFLEX_KERNEL=\(env): use portable, coopmat-nv or auto") }
            kernel = k; source = "VKFLEX_KERNEL=\(env)"
        }
        if kernel == .coopmatNV, let problem = coopmatProblem(s, device: device) { throw FlexError.unsupported("\(source): \(problem)") }
        return kernel!
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

/// Tile sizes of the cooperative-matrix kernel that fit the device's shared memory: BKV keys per
/// computed step, NSG subgroups, RPW 16-row blocks per subgroup (two amortize each K/V fragment
/// load), NBUF K/V buffers (two: one barrier per staged tile), `split` computed steps per staged tile.
struct CoopmatTiles: Hashable, CustomStringConvertible {
    let BKV: Int, NSG: Int, RPW: Int, NBUF: Int
    /// Whether the next K/V tile's global loads are issued a tile ahead (costs registers).
    let prefetch: Bool
    /// K/V tiles are staged `split * BKV` keys at a time (one or two barriers per staged tile)
    /// and computed `BKV` keys at a time.
    let split: Int

    init(BKV: Int, NSG: Int, RPW: Int, NBUF: Int, prefetch: Bool = true, split: Int = 1) {
        self.BKV = BKV; self.NSG = NSG; self.RPW = RPW; self.NBUF = NBUF; self.prefetch = prefetch; self.split = split
    }
    /// `queryBlock`: the BlockMask's query block size, when there is one (see below).
    init?(D: Int, device: Device, queryBlock: Int? = nil, dense: Bool = false) {
        self.init(D: D, sharedMemory: device.capabilities.maxSharedMemory, queryBlock: queryBlock, dense: dense,
                  typedOperands: device.cooperativeMatrixAPI == .khr)
    }

    /// Query rows per workgroup (16 per row block per subgroup).
    var BQ: Int { 16 * NSG * RPW }
    /// `VKFLEX_COOPMAT_TILES=BKVxRPWxNSGxNBUF[xP[xS]]` (e.g. `64x1x8x1`, `32x2x4x1x0` without
    /// prefetch, `32x2x4x1x1x2` staging 64 keys per step) forces a choice, for tuning.
    ///
    /// A workgroup's query tile never spans two BlockMask query blocks, so blocks of fewer rows
    /// than the preferred tile's 128 would leave subgroups idle: with 64-row blocks the tiles
    /// switch to one row block per subgroup (64 rows; causal on the H200 at S = 8192: D=64 77.7 →
    /// 119.0 TFLOP/s, D=128 82.3 → 124.7), with 32-row blocks also to two subgroups.
    ///
    /// `dense`: no BlockMask, so query tiles need not stay inside 128-row blocks. At D = 64 the
    /// workgroup then takes 256 rows (eight subgroups of two row blocks): each staged K/V tile
    /// serves twice the rows (H200, full D=64: 219.2 / 217.9 → 225.4 / 225.4 TFLOP/s; the driver
    /// fits one such workgroup per SM instead of two of four subgroups). Not at D = 16, 32 or 48,
    /// where it was 3-9% slower (full D=32: 183.8 against 201.5).
    ///
    /// `typedOperands`: the kernel runs through `VK_KHR_cooperative_matrix`, whose B operands need
    /// no transposes (``CooperativeMatrixKHRRewriter``). The registers that frees let 64 < D ≤ 128
    /// compute 32 keys at a time without spilling (H200, D=128: full 260.4 → 271.3, causal 245.1
    /// → 254.1 TFLOP/s against 16-key steps; through the NV extension 32-key steps spilled).
    init?(D: Int, sharedMemory budget: Int, queryBlock: Int? = nil, dense: Bool = false, typedOperands: Bool = false,
          forced: String? = ProcessInfo.processInfo.environment["VKFLEX_COOPMAT_TILES"]) {
        // Preferred first, from the H200 sweeps in docs/performance.md: at D <= 64 two row blocks
        // per subgroup (each K/V fragment read from shared memory feeds two products), 64 keys
        // staged per step in one buffer and computed 32 at a time; above 64 two row blocks
        // without the register prefetch, 32 keys staged and computed 16 at a time (at D = 128
        // the score fragments of 32 keys made the driver spill: 160.6 against 174.1 TFLOP/s
        // causal). Some neighbours collapse: 64 keys computed at once at
        // D = 64 (44 TFLOP/s against 145: the driver caps registers at 128 and spills), and
        // anything whose shared memory passes ~24 KiB (two K/V buffers of 64 keys: 104.9 against
        // 149.1) — the driver then fits fewer workgroups on an SM.
        var options: [CoopmatTiles] = D <= 64
            ? [.init(BKV: 32, NSG: 4, RPW: 2, NBUF: 1, split: 2), .init(BKV: 32, NSG: 4, RPW: 2, NBUF: 2), .init(BKV: 32, NSG: 8, RPW: 1, NBUF: 2)]
            : D <= 128
            ? [.init(BKV: 16, NSG: 4, RPW: 2, NBUF: 1, prefetch: false, split: 2), .init(BKV: 32, NSG: 4, RPW: 2, NBUF: 1, prefetch: false),
               .init(BKV: 64, NSG: 8, RPW: 1, NBUF: 1)]
            // Above 128 one row block per subgroup: O alone is then 128 registers per lane.
            : [.init(BKV: 16, NSG: 4, RPW: 1, NBUF: 1, prefetch: false)]
        if dense && D == 64 { options.insert(.init(BKV: 32, NSG: 8, RPW: 2, NBUF: 1, split: 2), at: 0) }
        if typedOperands && D > 64 && D <= 128 { options.insert(.init(BKV: 32, NSG: 4, RPW: 2, NBUF: 1, prefetch: false), at: 0) }
        options += [.init(BKV: 32, NSG: 4, RPW: 1, NBUF: 1), .init(BKV: 16, NSG: 4, RPW: 1, NBUF: 1), .init(BKV: 16, NSG: 2, RPW: 1, NBUF: 1)]
        if let rows = queryBlock, rows % 128 != 0 {
            // Fewer query rows per workgroup where that leaves fewer of them idle: 64 (four
            // subgroups of one row block), or 32 (two subgroups) for blocks of at most 32 rows.
            let bkv = D <= 64 ? 32 : 16, big = D > 128   // above 128: no prefetch, no second step (registers, shared memory)
            let rows64 = CoopmatTiles(BKV: bkv, NSG: 4, RPW: 1, NBUF: 1, prefetch: !big, split: big ? 1 : 2)
            let rows32 = CoopmatTiles(BKV: bkv, NSG: 2, RPW: 1, NBUF: 1, prefetch: !big, split: big ? 1 : 2)
            func busy(_ bq: Int) -> Double { Double(rows) / Double((rows + bq - 1) / bq * bq) }
            if rows <= 32 {
                options = [rows32, rows64] + options
            } else if busy(64) > busy(128) {
                options = [rows64] + options
            }
        }
        if let forced {
            guard let t = CoopmatTiles.parse(forced) else { return nil }
            options = [t]
        }
        guard let fit = options.first(where: { $0.sharedBytes(D: D) <= budget }) else { return nil }
        self = fit
    }

    /// `BKVxRPWxNSGxNBUF[xP[xS]]`: BKV a multiple of 16 up to 128, RPW 1-2, NSG 1-8, NBUF 1-2,
    /// P 0-1, S 1-4 with S·BKV at most 128; nil for anything else.
    static func parse(_ text: String) -> CoopmatTiles? {
        let parts = text.split(separator: "x", omittingEmptySubsequences: false).map { Int($0) }
        guard (4...6).contains(parts.count), parts.allSatisfy({ $0 != nil }) else { return nil }
        let v = parts.map { $0! }
        let prefetch = v.count < 5 || v[4] == 1, split = v.count < 6 ? 1 : v[5]
        guard v[0] > 0, v[0] % 16 == 0, v[0] <= 128, (1...2).contains(v[1]), (1...8).contains(v[2]), (1...2).contains(v[3]),
              v.count < 5 || (0...1).contains(v[4]), (1...4).contains(split), v[0] * split <= 128 else { return nil }
        return CoopmatTiles(BKV: v[0], NSG: v[2], RPW: v[1], NBUF: v[3], prefetch: prefetch, split: split)
    }

    /// Columns of Q and O staged at a time through shared memory (`QC`): all of D up to 128; above,
    /// the largest multiple of 16 up to 128 that divides D.
    static func stagingColumns(D: Int) -> Int {
        if D <= 128 { return D }
        return 16 * (1...8).reversed().first { (D / 16) % $0 == 0 }!
    }

    /// Mirrors the shared array of flex_attention_fwd_coopmat.comp (units of 8 halves): the K/V
    /// tiles, or each subgroup's Q/O staging rows (at most 128 columns at a time).
    func sharedBytes(D: Int) -> Int {
        let ks4 = D / 8 + 1, qs4 = CoopmatTiles.stagingColumns(D: D) / 8 + 1
        return max(2 * NBUF * BKV * split * ks4, 16 * NSG * qs4) * 16
    }

    var description: String { "\(BKV)x\(RPW)x\(NSG)x\(NBUF)x\(prefetch ? 1 : 0)" + (split == 1 ? "" : "x\(split)") }
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
/// - out: a caller's tensor to write (shape `[B, Hq, Lq, Dv]`, the query's dtype).
/// - options: per-call choices, such as forcing a kernel (``FlexOptions``).
///
/// The call enqueues the work and returns at once; reading the output waits for it. A captured
/// index out of range (or an integer division by zero) in a mod makes reading the output throw.
///
/// - Throws: ``FlexError/invalidArgument(_:)`` for shapes, dtypes, a BlockMask built for other lengths or heads, GQA without `enableGQA`, a bad `out`; ``FlexError/expression(_:)`` for a mod that does not type-check; ``FlexError/limitExceeded(_:)`` when a tensor exceeds what the device binds; ``FlexError/vulkan(call:result:)`` and ``FlexError/shaderCompile(_:)`` from the device. A mod that fails while it runs (``FlexError/modFailed(_:)``) is thrown when the output is read.
public func flexAttention(_ q: Tensor, _ k: Tensor, _ v: Tensor, scoreMod: ScoreMod? = nil, blockMask: BlockMask? = nil,
                          scale: Double? = nil, enableGQA: Bool = false, returnLSE: Bool = false, returnMaxScores: Bool = false,
                          out: Tensor? = nil, options: FlexOptions = FlexOptions()) throws -> FlexResult {
    let shape = try AttentionShape(q, k, v, blockMask: blockMask, enableGQA: enableGQA)
    let device = q.device
    if let out {
        guard out.device === device else { throw FlexError("out: the tensor belongs to another device") }
        guard out.shape == [shape.B, shape.Hq, shape.Lq, shape.Dv] else {
            throw FlexError("out: shape \(out.shape) should be \([shape.B, shape.Hq, shape.Lq, shape.Dv])")
        }
        guard out.dtype == q.dtype else { throw FlexError("out: dtype \(out.dtype.rawValue) should be the query's, \(q.dtype.rawValue)") }
    }
    let scale = scale ?? 1 / Double(shape.D).squareRoot()
    guard scale.isFinite else { throw FlexError("scale must be finite, got \(scale)") }
    let output = try out ?? device.empty(shape: [shape.B, shape.Hq, shape.Lq, shape.Dv], dtype: q.dtype, name: "output")
    let lse = returnLSE ? try device.empty(shape: [shape.B, shape.Hq, shape.Lq], dtype: .float32, name: "lse") : nil
    let maxScores = returnMaxScores ? try device.empty(shape: [shape.B, shape.Hq, shape.Lq], dtype: .float32, name: "max_scores") : nil
    let kernel = try FlexKernel.choose(shape, device: device, forced: options.kernel)
    if shape.B == 0 || shape.Hq == 0 || shape.Lq == 0 || shape.Dv == 0 { return FlexResult(output: output, lse: lse, maxScores: maxScores, kernel: kernel) }
    // No keys: every row is fully masked (output 0, LSE -inf), which the kernels give for a key
    // range of length 0; they only need K and V buffers to bind, so one-row stand-ins take their place.
    var (k, v) = (k, v)
    if shape.Lkv == 0 {
        k = try device.empty(shape: [shape.B, shape.Hkv, 1, shape.D], dtype: k.dtype, name: "no_keys")
        v = try device.empty(shape: [shape.B, shape.Hkv, 1, shape.Dv], dtype: v.dtype, name: "no_values")
    }
    try ForwardKernel.run(shape: shape, q: q, k: k, v: v, scoreMod: scoreMod, blockMask: blockMask, scale: scale,
                            output: output, lse: lse, maxScores: maxScores, kernel: kernel)
    return FlexResult(output: output, lse: lse, maxScores: maxScores, kernel: kernel)
}

/// Builds, ahead of time, the kernel that ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:returnLSE:returnMaxScores:out:options:)``
/// with the same arguments will run: the GLSL → SPIR-V compile and the pipeline creation that
/// make up a first call's cost (on an H200 about 1 s for the cooperative-matrix kernel when
/// neither vkflex's SPIR-V cache nor the driver's shader cache has it, under 10 ms when both do;
/// docs/performance.md, "First call"). Nothing is dispatched and the tensors' contents are not
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
/// capture included), the sign of the scale, the device, whether there is a BlockMask and, for
/// BlockMask query blocks that are not a multiple of 128 rows, the block size — not on the batch, the number of heads or the
/// lengths — so one call prepares every shape that shares those. Arguments are
/// checked as `flexAttention` checks them. Returns the kernel that was prepared.
///
/// - Throws: what ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:returnLSE:returnMaxScores:out:options:)`` throws for the same arguments.
@discardableResult
public func prepareFlexAttention(_ q: Tensor, _ k: Tensor, _ v: Tensor, scoreMod: ScoreMod? = nil, blockMask: BlockMask? = nil,
                                 scale: Double? = nil, enableGQA: Bool = false, returnMaxScores: Bool = false,
                                 options: FlexOptions = FlexOptions()) throws -> FlexKernel {
    let shape = try AttentionShape(q, k, v, blockMask: blockMask, enableGQA: enableGQA)
    let scale = scale ?? 1 / Double(shape.D).squareRoot()
    guard scale.isFinite else { throw FlexError("scale must be finite, got \(scale)") }
    let kernel = try FlexKernel.choose(shape, device: q.device, forced: options.kernel)
    _ = try ForwardKernel.prepare(shape: shape, scoreMod: scoreMod, blockMask: blockMask, scale: scale, kernel: kernel,
                                  device: q.device, maxScores: returnMaxScores)
    return kernel
}

/// The sizes of an attention call, validated.
struct AttentionShape {
    let B: Int, Hq: Int, Hkv: Int, Lq: Int, Lkv: Int, D: Int, Dv: Int
    let dtype: DType

    init(_ q: Tensor, _ k: Tensor, _ v: Tensor, blockMask: BlockMask?, enableGQA: Bool) throws {
        for (name, t) in [("query", q), ("key", k), ("value", v)] {
            guard t.rank == 4 else { throw FlexError("\(name) must be 4-D [B, H, L, D], got shape \(t.shape)") }
            guard t.dtype == .float32 || t.dtype == .float16 else {
                throw FlexError("\(name) is \(t.dtype.rawValue); attention inputs must be float32 or float16")
            }
            guard t.device === q.device else { throw FlexError("\(name) is on another device than the query") }
        }
        guard q.dtype == k.dtype, q.dtype == v.dtype else {
            throw FlexError("query, key and value must share a dtype, got \(q.dtype.rawValue), \(k.dtype.rawValue), \(v.dtype.rawValue)")
        }
        B = q.shape[0]; Hq = q.shape[1]; Lq = q.shape[2]; D = q.shape[3]
        Hkv = k.shape[1]; Lkv = k.shape[2]; Dv = v.shape[3]
        dtype = q.dtype
        guard k.shape[0] == B, v.shape[0] == B else {
            throw FlexError("batch sizes differ: query \(B), key \(k.shape[0]), value \(v.shape[0])")
        }
        guard v.shape[1] == Hkv else { throw FlexError("key has \(Hkv) heads but value has \(v.shape[1])") }
        guard v.shape[2] == Lkv else { throw FlexError("key has length \(Lkv) but value has \(v.shape[2])") }
        guard k.shape[3] == D else { throw FlexError("query head dim \(D) differs from key head dim \(k.shape[3])") }
        guard (1...256).contains(D) else { throw FlexError("head dim \(D) is outside 1...256") }
        guard (1...256).contains(Dv) else { throw FlexError("value head dim \(Dv) is outside 1...256") }
        if Hq != Hkv {
            guard enableGQA else {
                throw FlexError("query has \(Hq) heads and key/value \(Hkv): pass enableGQA: true for grouped-query attention")
            }
            guard Hkv > 0, Hq % Hkv == 0 else {
                throw FlexError("enableGQA needs the query heads (\(Hq)) to be a multiple of the key/value heads (\(Hkv))")
            }
        }
        guard Hkv > 0 || Hq == 0 else { throw FlexError("key/value have no heads") }
        if q.dtype == .float16 && !q.device.enabledFeatures.storageBuffer16Bit {
            throw FlexError.unsupported("\(q.device.capabilities.name) cannot read float16 buffers (no 16-bit storage); use float32")
        }
        if let m = blockMask {
            guard m.qLen == Lq, m.kvLen == Lkv else {
                throw FlexError("the BlockMask was built for qLen=\(m.qLen), kvLen=\(m.kvLen) but the inputs have qLen=\(Lq), kvLen=\(Lkv): build it for these lengths")
            }
            guard m.B == 1 || m.B == B else { throw FlexError("the BlockMask has B=\(m.B); it must be 1 (broadcast) or the batch size \(B)") }
            guard m.H == 1 || m.H == Hq else { throw FlexError("the BlockMask has H=\(m.H); it must be 1 (broadcast) or the number of query heads \(Hq)") }
            guard m.device === q.device else { throw FlexError("the BlockMask belongs to another device") }
        }
    }
}

/// The forward kernels (portable and cooperative-matrix): tile sizes, pipelines and dispatch.
enum ForwardKernel {
    struct Key: Hashable, Sendable {
        let kernel: String
        let mods: String
        /// The template's defines: head dims, tiles, dtypes.
        let defines: String
    }

    /// The cooperative-matrix shader for a head dim and tiles. `rawMax`: no score-mod and a
    /// positive scale, so the softmax maximum can be taken over raw scores. `exp16`: P evaluated
    /// in fp16 — with a score-mod, whose own special functions (tanh) compete with exp2 for the
    /// same units (on the H200 soft-cap 107.8 → 114.7 TFLOP/s, ALiBi 130.8 → 134.8; without a
    /// score-mod it costs 6%, so it is off there). spirv-opt (SPIRV-Tools
    /// v2023.1) segfaults on some NV cooperative-matrix shaders but survives this one: a test
    /// compiles every variant optimized, so a crash would show there, not in a user's process.
    ///
    /// `narrowK`: Q·Kᵀ as 16×8×16 products (`VKF_K8`), where the device has the shape and its
    /// 16×8 layout was measured to be ``CooperativeMatrixLayout/nvidiaMMANarrow`` (H200: causal
    /// D=64 +2%, document +3%).
    ///
    /// `floatIndices`: the score-mod may take its index sums from float indices (`VKF_FLOAT_INDICES`;
    /// exact for lengths up to 2^22).
    ///
    /// `typedOperands`: the kernel runs through `VK_KHR_cooperative_matrix`. Up to D = 64 O is then
    /// rescaled only on the steps where a row's maximum moves (`VKF_ALWAYS_RESCALE=0`): H200 suite,
    /// TFLOP/s, full 275.7 → 285.9-286.1, causal 255.7 → 268.4-268.9, sliding window 212.0-213.8 →
    /// 223.8-224.0, prefix-LM 257.7-258.0 → 269.4-269.5, document 208.6-208.9 → 214.4-214.8,
    /// soft-cap 177.2-177.4 → 182.0-182.2, ALiBi 217.8 → 210.8-211.1 (the one loss). Through the
    /// NV extension it did not pay.
    static func coopmatSource(D: Int, tiles t: CoopmatTiles, rawMax: Bool, exp16: Bool, narrowK: Bool = false,
                              floatIndices: Bool = true, typedOperands: Bool = false) throws -> ShaderSource {
        var defines: [ShaderSource.Define] = [.init("D", "\(D)"), .init("BKV", "\(t.BKV)"), .init("NSG", "\(t.NSG)"), .init("RPW", "\(t.RPW)"),
                                              .init("NBUF", "\(t.NBUF)"), .init("SPLIT", "\(t.split)"), .init("VKF_NO_PREFETCH", t.prefetch ? "0" : "1"),
                                              .init("VKF_RAW_MAX", rawMax ? "1" : "0"), .init("VKF_EXP16", exp16 ? "1" : "0"),
                                              .init("VKF_K8", narrowK ? "1" : "0"), .init("VKF_FLOAT_INDICES", floatIndices ? "1" : "0")]
        // Up to D = 64 (two steps per staged tile), every step is computed and O rescaled at each:
        // no second version of O to merge (H200: causal D=64 +4%, ALiBi +7%; at D = 128 the
        // driver spilled).
        let straight = D <= 64 && t.split > 1
        defines += [.init("VKF_ALWAYS_HALVES", straight ? "1" : "0"), .init("VKF_ALWAYS_RESCALE", straight && !typedOperands ? "1" : "0")]
        if D > 128 { defines.append(.init("QC", "\(CoopmatTiles.stagingColumns(D: D))")) }
        // For tuning: VKFLEX_COOPMAT_DEFINES="TAU=0,VKF_NO_CLEAN=1" adds defines the template reads.
        for item in (ProcessInfo.processInfo.environment["VKFLEX_COOPMAT_DEFINES"] ?? "").split(separator: ",") {
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            let name = parts[0]
            guard let first = name.first, first == "_" || first.isLetter, name.allSatisfy({ $0 == "_" || ($0.isASCII && ($0.isLetter || $0.isNumber)) }),
                  parts.count == 1 || !parts[1].isEmpty else {
                throw FlexError("VKFLEX_COOPMAT_DEFINES: '\(item)' is not NAME or NAME=value")
            }
            // A name the host sets (VKF_EXP16, SPLIT...) takes the given value instead.
            defines.removeAll { $0.name == name }
            defines.append(.init(name, parts.count > 1 ? parts[1] : "1"))
        }
        return ShaderSource(name: "flex_attention_fwd_coopmat", text: try ShaderLibrary.standard.text("flex_attention_fwd_coopmat.comp"),
                            defines: defines, optimization: .full)
    }

    /// Tile sizes of the portable kernel that fit the device's shared memory. With fp32 in shared
    /// memory (float32 inputs) first 64 query rows on 256 invocations where that is the
    /// register-tiled path and the BlockMask's query blocks (`queryBlock`, nil without one) are
    /// not smaller (H200, `vkflex bench --b 4 --h 16 --s 4096 --d 64`: full 6.1 → 8.5 TFLOP/s,
    /// causal 8.0 → 8.9 against 32 rows on 128); then, and with fp16 (`half`), 32 rows and fewer
    /// on 128. Shared memory decides how many workgroups share an SM on the H200, and fp16 halves
    /// it: 32 rows on 128 take 16 KiB there, and beat 64 on 256 (27 KiB; full D=64 15.3 against
    /// 12.3 TFLOP/s).
    static func tiles(D: Int, Dv: Int, device: Device, half: Bool = false, queryBlock: Int? = nil) -> (BQ: Int, BKV: Int, WG: Int) {
        tiles(D: D, Dv: Dv, sharedMemory: device.capabilities.maxSharedMemory,
              maxInvocations: device.capabilities.maxWorkgroupInvocations, half: half, queryBlock: queryBlock)
    }

    static func tiles(D: Int, Dv: Int, sharedMemory: Int, maxInvocations: Int, half: Bool = false,
                      queryBlock: Int? = nil) -> (BQ: Int, BKV: Int, WG: Int) {
        let budget = sharedMemory - 256
        let wg = min(128, maxInvocations)
        if !half, maxInvocations >= 256, portableBlocked(Dv: Dv, BQ: 64, BKV: 32, WG: 256),
           queryBlock.map({ $0 % 64 == 0 || $0 > 128 }) ?? true,
           portableSharedBytes(D: D, Dv: Dv, BQ: 64, BKV: 32, WG: 256, half: half) <= budget {
            return (64, 32, 256)
        }
        for (bq, bkv) in [(32, 32), (16, 32), (16, 16), (8, 16), (8, 8), (4, 8), (4, 4), (2, 4), (1, 4)] {
            if portableSharedBytes(D: D, Dv: Dv, BQ: bq, BKV: bkv, WG: wg, half: half) <= budget {
                return (bq, bkv, wg)
            }
        }
        return (1, 1, 64)
    }

    /// Whether flex_attention_fwd.comp takes its register-tiled path (`VKF_BLOCKED`) for these
    /// tiles: 4 rows and 4 value dims per task, which the shapes must divide.
    static func portableBlocked(Dv: Int, BQ bq: Int, BKV bkv: Int, WG wg: Int) -> Bool {
        let ct = bq * bkv / (4 * wg)
        return bq % 4 == 0 && ct > 0 && Dv % 4 == 0 && (bq * bkv) % (4 * wg) == 0 && bkv % ct == 0
    }

    /// Shared memory of flex_attention_fwd.comp, mirrored: Q, K/V, scores (and, register-tiled,
    /// the rows' tile maxima in parts), row statistics, the softmax's row-sum shares.
    ///
    /// `half`: float16 inputs, which the register-tiled path keeps as fp16 in shared memory
    /// (`VKF_HALF`, for even D).
    static func portableSharedBytes(D: Int, Dv: Int, BQ bq: Int, BKV bkv: Int, WG wg: Int, half: Bool = false) -> Int {
        let stats = 3 * bq + wg
        if portableBlocked(Dv: Dv, BQ: bq, BKV: bkv, WG: wg) {
            let parts = bq * (bkv / (bq * bkv / (4 * wg)) + 1)   // the rows' tile maxima in parts
            if half && D % 2 == 0 {
                // Words: Q two per dim and 4 rows, K one per key and pair of dims (odd stride), V
                // one per pair of dims; the K/V area in whole pairs of words.
                let kv = (max((D / 2) * (bkv + 1), bkv * Dv / 2) + 1) / 2 * 2
                return 4 * (bq * D / 2 + kv + bkv * (bq + 4) + parts + stats)
            }
            let kv = (max(D * (bkv + 1), bkv * Dv) + 3) / 4 * 4
            return 4 * (bq * D + kv + bkv * (bq + 4) + parts + stats)
        }
        return 4 * (bq * D + bkv * (max(D, Dv) | 1) + bq * (bkv | 1) + stats)
    }

    /// A kernel built for a call: the pipeline, the mods it splices and its tiles.
    struct Prepared {
        let pipeline: ComputePipeline
        let mods: SplicedMods
        let BQ: Int, BKV: Int, WG: Int
        /// The parameter block goes as push constants (else as a buffer at binding 9).
        let pushParams: Bool
    }

    /// Bytes of the kernels' parameter block (`Params` in flex_attention_common.glsl).
    static let paramBytes = AttentionParams.byteCount

    /// Whether the parameter block goes as push constants: where the device takes 184 bytes of
    /// them (NVIDIA and most desktop drivers take 256; lavapipe takes Vulkan's minimum, 128). On
    /// the H200 a storage-buffer block was reloaded, bounds-checked, on every tile (causal D=64
    /// 180.9 → 192.1 TFLOP/s as push constants). `VKFLEX_PUSH_PARAMS=0` turns it off.
    static func pushesParams(_ device: Device) -> Bool {
        device.capabilities.maxPushConstantsSize >= paramBytes && ProcessInfo.processInfo.environment["VKFLEX_PUSH_PARAMS"] != "0"
    }

    /// `source` told where its parameter block comes from.
    static func withParams(_ source: ShaderSource, push: Bool) -> ShaderSource {
        var s = source
        if push { s.defines.append(.init("VKF_PARAMS_PUSH", "1")) }
        return s
    }

    /// Builds (or finds in the caches) the pipeline for a call's head dims, dtype, mods and
    /// kernel; batch and heads do not enter it, nor lengths below 2^22 (see `floatIndices`).
    /// `partialOutput`: O written as float32 whatever the inputs (the partials of a key split).
    /// `maxScores`: the kernel also writes each row's maximum score (binding 11).
    static func prepare(shape s: AttentionShape, scoreMod: ScoreMod?, blockMask: BlockMask?, scale: Double, kernel: FlexKernel,
                        device: Device, partialOutput: Bool = false, maxScores: Bool = false) throws -> Prepared {
        let caps = device.capabilities
        let mods = try SplicedMods(score: scoreMod.flatMap { $0.isIdentity ? nil : $0 }, mask: blockMask?.maskMod,
                                   firstBinding: AttentionBinding.firstCapture, errorBinding: AttentionBinding.errors.rawValue, device: device)
        let f16 = s.dtype == .float16
        let BQ: Int, BKV: Int, WG: Int
        var source: ShaderSource
        switch kernel {
        case .portable:
            var t = tiles(D: s.D, Dv: s.Dv, device: device, half: f16, queryBlock: blockMask?.blockSize.q)
            if let forced = ProcessInfo.processInfo.environment["VKFLEX_PORTABLE_TILES"], !forced.isEmpty {
                // For tuning: BQxBKVxWG (at least one invocation per query row: the row statistics
                // and the LSE are per invocation).
                let v = forced.split(separator: "x", omittingEmptySubsequences: false).map { Int($0) ?? 0 }
                guard v.count == 3, v.allSatisfy({ $0 > 0 }), v[2] >= v[0], v[2] <= caps.maxWorkgroupInvocations,
                      portableSharedBytes(D: s.D, Dv: s.Dv, BQ: v[0], BKV: v[1], WG: v[2], half: f16) <= caps.maxSharedMemory - 256 else {
                    throw FlexError("VKFLEX_PORTABLE_TILES=\(forced): use BQxBKVxWG with WG >= BQ that fits \(caps.maxSharedMemory) bytes of shared memory at head dims \(s.D)/\(s.Dv) (e.g. 32x32x128)")
                }
                t = (v[0], v[1], v[2])
            }
            (BQ, BKV, WG) = t
            source = ShaderSource(name: "flex_attention_fwd", text: try ShaderLibrary.standard.text("flex_attention_fwd.comp"), defines: [
                .init("D", "\(s.D)"), .init("DV", "\(s.Dv)"), .init("BQ", "\(BQ)"), .init("BKV", "\(BKV)"),
                .init("WG", "\(WG)"), .init("IN_F16", f16 ? "1" : "0"), .init("OUT_F16", f16 && !partialOutput ? "1" : "0"),
            ])
        case .coopmatNV:
            let identity = scoreMod.map { $0.isIdentity } ?? true
            guard let t = CoopmatTiles(D: s.D, device: device, queryBlock: blockMask?.blockSize.q, dense: blockMask == nil) else {
                throw FlexError("no cooperative-matrix tiles fit \(caps.name)'s shared memory at head dim \(s.D)")
            }
            (BQ, BKV, WG) = (t.BQ, t.BKV, 32 * t.NSG)
            let rawMax = identity && scale > 0
            let narrowK = CooperativeMatrixLayout.of(device)?.narrowMatchesNVIDIA ?? false
            source = try coopmatSource(D: s.D, tiles: t, rawMax: rawMax, exp16: !identity, narrowK: narrowK,
                                       floatIndices: max(s.Lq, s.Lkv) <= 1 << 22, typedOperands: device.cooperativeMatrixAPI == .khr)
        }
        if maxScores { source.defines.append(.init("VKF_MAX_SCORES", "1")) }
        let push = pushesParams(device)
        source = withParams(source, push: push)
        let key = Key(kernel: kernel.rawValue, mods: mods.glsl.source, defines: source.defines.map { "\($0.name)=\($0.value)" }.joined(separator: ","))
        let pipeline = try device.pipeline(for: key) {
            PipelineDescription(source: source, bindingCount: AttentionBinding.firstCapture + mods.tensors.count, pushConstantSize: push ? paramBytes : 0, includes: mods.includes)
        }
        return Prepared(pipeline: pipeline, mods: mods, BQ: BQ, BKV: BKV, WG: WG, pushParams: push)
    }

    static func run(shape s: AttentionShape, q: Tensor, k: Tensor, v: Tensor, scoreMod: ScoreMod?, blockMask: BlockMask?,
                    scale: Double, output: Tensor, lse: Tensor?, maxScores: Tensor? = nil, kernel: FlexKernel) throws {
        let device = q.device
        let caps = device.capabilities
        let prepared = try prepare(shape: s, scoreMod: scoreMod, blockMask: blockMask, scale: scale, kernel: kernel, device: device,
                                   maxScores: maxScores != nil)
        let (pipeline, mods, BQ, BKV) = (prepared.pipeline, prepared.mods, prepared.BQ, prepared.BKV)

        // Block structure: the mask's, or a dense walk.
        let qBS: Int, kvBS: Int, qBlocks: Int, kvBlocks: Int, maskB: Int, maskH: Int
        let maskBuffers: [Tensor]
        if let m = blockMask {
            qBS = m.blockSize.q; kvBS = m.blockSize.kv; qBlocks = m.qBlocks; kvBlocks = m.kvBlocks; maskB = m.B; maskH = m.H
            maskBuffers = [m.kvNumBlocks, m.kvIndices, m.fullKVNumBlocks, m.fullKVIndices]
        } else {
            qBS = BQ; kvBS = BKV * 8; qBlocks = (s.Lq + BQ - 1) / BQ; kvBlocks = (s.Lkv + kvBS - 1) / kvBS; maskB = 1; maskH = 1
            let dummy = try dummyIndexBuffer(device)
            maskBuffers = [dummy, dummy, dummy, dummy]
        }
        let tilesPerBlock = (qBS + BQ - 1) / BQ
        let groupsX = qBlocks * tilesPerBlock
        guard groupsX <= caps.maxWorkgroupCount[0], s.Hq <= caps.maxWorkgroupCount[1] else {
            throw FlexError.limitExceeded("\(groupsX) query tiles x \(s.Hq) heads exceed the device's dispatch limits")
        }
        let lseScratch = lse == nil ? try dummyFloatBuffer(device) : nil
        let unusedMax = maxScores == nil ? try dummyFloatBuffer(device) : nil   // binding 11 without max scores

        // Split over batches, then heads, when a tensor spans more than one storage-buffer binding.
        let chunks = try planChunks(s, q: q, k: k, v: v, output: output, lse: lse, device: device)
        let group = s.Hq / max(1, s.Hkv)
        let errors = try mods.makeErrorBuffer(device)
        let unusedParams = prepared.pushParams ? try dummyFloatBuffer(device) : nil   // binding 9 with push constants
        // Where the driver caps a shader's loop iterations, the key blocks are walked a share per
        // dispatch into float32 partials, which a merge pass combines by their LSEs.
        let kvSplit = kernel == .portable
            ? kvBlocksPerDispatch(shape: s, tiles: (BQ, BKV, prepared.WG), kvBlockSize: kvBS, kvBlocks: kvBlocks, device: device) : nil
        let splits = kvSplit.map { (kvBlocks + $0 - 1) / $0 } ?? 1
        let partial = splits > 1
            ? try prepare(shape: s, scoreMod: scoreMod, blockMask: blockMask, scale: scale, kernel: kernel, device: device,
                          partialOutput: true, maxScores: maxScores != nil) : nil

        func dispatch(_ pipeline: ComputePipeline, chunk: Chunk, out: WriteTarget, lse lseTarget: WriteTarget?, max maxTarget: WriteTarget?,
                      kvRange: Range<Int>) throws {
            // The maximum scores are addressed like the LSE (both [B, Hq, Lq], contiguous, made here).
            precondition(lseTarget == nil || maxTarget == nil || (lseTarget!.base == maxTarget!.base && lseTarget!.strides == maxTarget!.strides))
            let rowTarget = lseTarget ?? maxTarget
            let (b0, nb, h0, nh) = (chunk.b.lowerBound, chunk.b.count, chunk.h.lowerBound, chunk.h.count)
            let kvHeads = (h0 / group)..<((h0 + nh - 1) / group + 1)
            var slots: [AttentionBinding: BufferBinding] = [:]
            var p = AttentionParams()
            for (slot, t, heads, prefix) in [(AttentionBinding.q, q, chunk.h, "q"), (.k, k, kvHeads, "k"), (.v, v, kvHeads, "v")] {
                let (binding, base) = try bind(t, batches: chunk.b, heads: heads, writes: false, device: device)
                slots[slot] = binding
                let f = AttentionParams.Field.self
                p.set([f.init(rawValue: prefix + "_base")!: base, f.init(rawValue: prefix + "_sb")!: t.strides[0], f.init(rawValue: prefix + "_sh")!: t.strides[1],
                       f.init(rawValue: prefix + "_sl")!: t.strides[2], f.init(rawValue: prefix + "_sd")!: t.strides[3]])
            }
            slots[.output] = out.binding
            p.set([.o_base: out.base, .o_sb: out.strides[0], .o_sh: out.strides[1], .o_sl: out.strides[2], .o_sd: out.strides[3]])
            slots[.lse] = lseTarget?.binding ?? BufferBinding(lseScratch!, writes: true)
            let ls = rowTarget?.strides ?? [0, 0, 0]
            p.set([.lse_base: rowTarget?.base ?? 0, .lse_sb: ls[0], .lse_sh: ls[1], .lse_sl: ls[2]])
            for (slot, t) in zip([AttentionBinding.kvNum, .kvIndices, .fullKVNum, .fullKVIndices], maskBuffers) {
                slots[slot] = BufferBinding(t.buffer, offset: t.byteOffset, size: max(4, t.count * 4))
            }
            p.set([.B: s.B, .Hq: s.Hq, .Hkv: s.Hkv, .Lq: s.Lq, .Lkv: s.Lkv, .b_start: b0,
                   .mask_b: maskB, .mask_h: maskH, .q_bs: qBS, .kv_bs: kvBS, .q_blocks: qBlocks, .kv_blocks: kvBlocks,
                   .dense: blockMask == nil ? 1 : 0, .tiles_per_block: tilesPerBlock, .write_lse: lseTarget == nil ? 0 : 1])
            p.set(.scale, float: Float(scale))
            // Rows readable 8 halves at a time: unit inner stride, 8-aligned row offsets.
            let strides = [q.strides, k.strides, v.strides, out.strides]
            let bases = [AttentionParams.Field.q_base, .k_base, .v_base, .o_base].map { p.int($0) }
            let vecOK = (0..<4).allSatisfy { i in
                strides[i][3] == 1 && bases[i] % 8 == 0 && strides[i][0] % 8 == 0 && strides[i][1] % 8 == 0 && strides[i][2] % 8 == 0
            } && s.D % 8 == 0 && s.Dv % 8 == 0
            p.set([.vec_ok: vecOK ? 1 : 0, .h_start: h0, .hk_start: kvHeads.lowerBound, .kv_block_lo: kvRange.lowerBound,
                   .kv_block_hi: kvRange.upperBound, .write_max: maxTarget == nil ? 0 : 1])
            let params = p.bytes()
            if let unusedParams {
                slots[.params] = BufferBinding(unusedParams)
            } else {
                let paramBuffer = try device.makeBuffer(bytes: params.count)
                try paramBuffer.upload(params)
                slots[.params] = BufferBinding(paramBuffer)
            }
            slots[.errors] = BufferBinding(errors, writes: true)
            slots[.maxScores] = maxTarget?.binding ?? BufferBinding(unusedMax!, writes: true)
            let bindings = AttentionBinding.allCases.map { slots[$0]! } + mods.captureBindings()
            try device.record { rec in
                try rec.dispatch(pipeline, bindings: bindings, pushConstants: prepared.pushParams ? params : [], groups: (groupsX, nh, nb))
            }
        }

        for chunk in chunks {
            let (outBinding, outBase) = try bind(output, batches: chunk.b, heads: chunk.h, writes: true, device: device)
            let outTarget = WriteTarget(binding: outBinding, base: outBase, strides: output.strides)
            let lseTarget = try lse.map { l -> WriteTarget in
                let (binding, base) = try bind(l, batches: chunk.b, heads: chunk.h, writes: true, device: device)
                return WriteTarget(binding: binding, base: base, strides: l.strides)
            }
            let maxTarget = try maxScores.map { m -> WriteTarget in
                let (binding, base) = try bind(m, batches: chunk.b, heads: chunk.h, writes: true, device: device)
                return WriteTarget(binding: binding, base: base, strides: m.strides)
            }
            guard let partial, let perSplit = kvSplit else {
                try dispatch(pipeline, chunk: chunk, out: outTarget, lse: lseTarget, max: maxTarget, kvRange: 0..<kvBlocks)
                continue
            }
            // Partials: O [split, b, h, i, d] and LSE [split, b, h, i], float32, contiguous.
            let (nb, nh) = (chunk.b.count, chunk.h.count)
            let rows = nb * nh * s.Lq
            let partBytes = splits * rows * s.Dv * 4
            guard partBytes <= caps.maxStorageBufferRange else {
                throw FlexError.limitExceeded("\(caps.name) stops a shader's loops after 65535 iterations, so \(s.Lkv) keys are walked in \(splits) passes whose partial outputs (\(formatBytes(partBytes))) exceed what it binds per buffer (\(formatBytes(caps.maxStorageBufferRange))); pass fewer query rows or heads per call")
            }
            let partO = try device.makeBuffer(bytes: max(16, partBytes)), partL = try device.makeBuffer(bytes: max(16, splits * rows * 4))
            let partM = maxScores == nil ? nil : try device.makeBuffer(bytes: max(16, splits * rows * 4))
            for split in 0..<splits {
                let range = (split * perSplit)..<min(kvBlocks, (split + 1) * perSplit)
                try dispatch(partial.pipeline, chunk: chunk,
                             out: WriteTarget(binding: BufferBinding(partO, writes: true), base: split * rows * s.Dv, strides: [nh * s.Lq * s.Dv, s.Lq * s.Dv, s.Dv, 1]),
                             lse: WriteTarget(binding: BufferBinding(partL, writes: true), base: split * rows, strides: [nh * s.Lq, s.Lq, 1]),
                             max: partM.map { WriteTarget(binding: BufferBinding($0, writes: true), base: split * rows, strides: [nh * s.Lq, s.Lq, 1]) },
                             kvRange: range)
            }
            try merge(splits: splits, partO: partO, partL: partL, partMax: partM, nb: nb, nh: nh, shape: s, out: outTarget, lse: lseTarget,
                      max: maxTarget, outF16: output.dtype == .float16, device: device)
        }
        var checks: [ErrorCheck] = blockMask?.errorCheck.map { [$0] } ?? []
        if (scoreMod?.graph.canFail ?? false) || (blockMask?.maskMod?.graph.canFail ?? false) || loopIterationLimit(device) != nil {
            checks.append(ErrorCheck(errors: errors, captures: mods.glsl.captures))
        }
        for check in checks {
            output.addCheck(check)
            lse?.addCheck(check)
            maxScores?.addCheck(check)
        }
    }

    /// The bytes of `t` that batches `batches` and heads `heads` cover (all of L and D).
    static func span(_ t: Tensor, batches: Range<Int>, heads: Range<Int>) -> (first: Int, lower: Int, upper: Int) {
        let size = t.dtype.size
        let first = t.byteOffset + (batches.lowerBound * t.strides[0] + heads.lowerBound * t.strides[1]) * size
        var lo = first, hi = first + size
        for (d, (n, st)) in zip(t.shape, t.strides).enumerated() {
            let extent = d == 0 ? batches.count : d == 1 ? heads.count : n
            guard extent > 0 else { continue }
            if st >= 0 { hi += (extent - 1) * st * size } else { lo += (extent - 1) * st * size }
        }
        return (first, lo, hi)
    }

    /// Binds the part of `t` that `batches` and `heads` use; returns the binding and the element
    /// offset of element (batches.first, heads.first, 0, 0) inside it.
    static func bind(_ t: Tensor, batches: Range<Int>, heads: Range<Int>, writes: Bool, device: Device) throws -> (BufferBinding, Int) {
        let size = t.dtype.size
        let align = device.capabilities.minStorageBufferOffsetAlignment
        let (first, lo, hi) = span(t, batches: batches, heads: heads)
        let start = lo / align * align
        guard (first - start) % size == 0 else { throw FlexError("\(t.name) is not aligned to its element size") }
        return (BufferBinding(t.buffer, offset: start, size: hi - start, writes: writes), (first - start) / size)
    }

    struct Chunk { let b: Range<Int>; let h: Range<Int> }

    /// Dispatches such that every binding fits the device's storage-buffer range: all at once,
    /// else by groups of batches, else one batch and a group of heads at a time.
    static func planChunks(_ s: AttentionShape, q: Tensor, k: Tensor, v: Tensor, output: Tensor, lse: Tensor?, device: Device) throws -> [Chunk] {
        let caps = device.capabilities
        let limit = caps.maxStorageBufferRange - caps.minStorageBufferOffsetAlignment
        let group = s.Hq / max(1, s.Hkv)
        func fits(_ b: Range<Int>, _ h: Range<Int>) -> Bool {
            let kvh = (h.lowerBound / group)..<((h.upperBound - 1) / group + 1)
            let parts: [(Tensor, Range<Int>)] = [(q, h), (k, kvh), (v, kvh), (output, h)] + (lse.map { [($0, h)] } ?? [])
            return parts.allSatisfy { t, heads in
                let sp = span(t, batches: b, heads: heads)
                return sp.upper - sp.lower <= limit
            }
        }
        if fits(0..<s.B, 0..<s.Hq) { return [Chunk(b: 0..<s.B, h: 0..<s.Hq)] }
        var chunks: [Chunk] = []
        if fits(0..<1, 0..<s.Hq) {
            var b0 = 0
            while b0 < s.B {
                var nb = 1
                while b0 + nb < s.B && fits(b0..<(b0 + nb + 1), 0..<s.Hq) { nb += 1 }
                chunks.append(Chunk(b: b0..<(b0 + nb), h: 0..<s.Hq))
                b0 += nb
            }
            return chunks
        }
        for b in 0..<s.B {
            var h0 = 0
            while h0 < s.Hq {
                guard fits(b..<(b + 1), h0..<(h0 + 1)) else {
                    throw FlexError.limitExceeded("one head of one batch spans more than \(formatBytes(caps.maxStorageBufferRange)), what \(caps.name) binds per buffer; split the sequence")
                }
                var nh = 1
                while h0 + nh < s.Hq && fits(b..<(b + 1), h0..<(h0 + nh + 1)) { nh += 1 }
                chunks.append(Chunk(b: b..<(b + 1), h: h0..<(h0 + nh)))
                h0 += nh
            }
        }
        return chunks
    }

    static func dummyIndexBuffer(_ device: Device) throws -> Tensor {
        try device.tensor([Int32(0)], shape: [1], name: "no_block_mask")
    }

    static func dummyFloatBuffer(_ device: Device) throws -> Buffer {
        try device.makeBuffer(bytes: 16)
    }
}

/// Reads a kernel's error buffer when its output is read.
final class ErrorCheck: @unchecked Sendable {
    let errors: Buffer
    let captures: [CaptureInfo]
    init(errors: Buffer, captures: [CaptureInfo]) { self.errors = errors; self.captures = captures }
    func run() throws {
        try SplicedMods.decode(try errors.download(count: 4, as: Int32.self), captures: captures)
    }
}
