import Foundation
import VKFlexExpr
import VKFlexVulkan

// The kernel plan: which kernel and tiles a call gets, decided in one place with the reasons beside
// each choice, and the one value (`AttentionPlan`) that names a pipeline and makes its defines.

/// The `VKFLEX_*` tuning variables, read once per device (from ``Device/environment``, the
/// snapshot taken when it opened) and checked then: a malformed value is an error naming the
/// variable, never silently ignored.
struct AttentionTuning: Sendable {
    /// `VKFLEX_KERNEL=portable|coopmat-nv|coopmat-generic|split-kv|auto` (nil: auto).
    var kernel: FlexKernel?
    /// `VKFLEX_COOPMAT_TILES=BKVxRPWxNSGxNBUF[xP[xS]]`, checked by ``CoopmatTiles/parse(_:)``.
    var coopmatTiles: String?
    /// `VKFLEX_PORTABLE_TILES=BQxBKVxWG` (whether they fit is checked per call, with the head dims).
    var portableTiles: (BQ: Int, BKV: Int, WG: Int)?
    /// `VKFLEX_PUSH_PARAMS=0` passes the parameter block in a buffer even where push constants fit.
    var pushParams = true
    /// `VKFLEX_COOPMAT_SHAPE=MxNxK`: the matrix shape coopmat-generic computes in (one the device
    /// lists), to run each of them.
    var coopmatShape: (m: Int, n: Int, k: Int)?
    /// `VKFLEX_DECODE_WAVES=n`: split-KV decoding sizes its key splits for about n workgroups of
    /// 128 invocations per compute unit, rounded up (4 was the best of 2-16 on an H100's decode
    /// suite: docs/performance.md; the matrix kernel's one-subgroup workgroups count as many
    /// subgroups; unset, every kernel takes one wave of what a compute unit holds, rounded down:
    /// ``AttentionPlanner/decodeWantedSplits(workgroups:computeUnits:workgroupSize:subgroups:nvidiaLayout:waves:kvBlocks:)``),
    /// for tuning.
    var decodeWaves: Int?
    /// `VKFLEX_DECODE_SPLITS=n`: split-KV decoding's key splits (at most the KV blocks; a driver's
    /// loop cap can raise it), whatever the device — to see how a kernel's time scales with its
    /// workgroups, for tuning.
    var decodeSplits: Int?
    /// `VKFLEX_DECODE_TILE=RxK[xL][xs]`: split-KV decoding's query rows per workgroup (1, 2, 4, 8
    /// or 16), keys each key slot loads per round (1-8),
    /// invocations per key (a power of two up to the device's smallest subgroup) and `s` for the
    /// reduce-scatter of the scores (`DEC_RS`), for tuning.
    var decodeTile: (rows: Int, keys: Int, lanes: Int?, scatter: Bool)?
    /// `VKFLEX_DECODE_TILE=mm`: split-KV decoding through cooperative matrices
    /// (flex_attention_decode_mm.comp; emulated where the device has none), for any call; `scalar`:
    /// never (the default tiles of flex_attention_decode.comp).
    var decodeMatrices: Bool?
    /// `VKFLEX_DECODE_TILE=mmN[xS]` (N = 16 or 32, S = 1, 2 or 4): the matrix kernel with N keys a
    /// step — its shared memory is 21 KB (32) or 11 KB (16) a subgroup at D = 128 — and S
    /// subgroups a workgroup, each walking a split of its own (default 1), to see whether the
    /// driver then keeps more of its work on a compute unit at once — for tuning.
    var decodeMMKeys: Int?
    /// S of `VKFLEX_DECODE_TILE=mmNxS` (nil: one subgroup a workgroup).
    var decodeMMSubgroups: Int?
    /// `VKFLEX_DECODE_TILE=mm…p` (e.g. `mm16p`, `mm16x4p`): the matrix kernel loads each step's K
    /// and V into registers a step ahead (`DEC_PREFETCH`), for tuning.
    var decodeMMPrefetch = false
    /// `VKFLEX_DECODE_TILE=nv[r][xS][s|h]`: split-KV decoding through the NVIDIA-layout kernel
    /// (flex_attention_decode_nv.comp) where the call allows it; r: K and V loaded word by word
    /// into the matrices' registers (`DEC_REGLOAD`); S subgroups a workgroup (1, 2 or 4); a final
    /// s for no prefetch, h (with r) for the next step's K and V loaded as this step's are
    /// consumed (`DEC_PREFETCH=2`), for tuning.
    var decodeNV: (nsg: Int, prefetch: Bool, registers: Bool, rotate: Bool)?
    /// `VKFLEX_DECODE_TILE=nv2`: the NVIDIA-layout kernel with two 16-key chunks a step, both
    /// chunks' loads issued at its start, Q read from shared memory (`DEC_CHUNKS=2`); `nvr2`: the
    /// same with nvr's word-by-word loads, for tuning.
    var decodeNVChunks = 1
    /// `VKFLEX_DECODE_KLINES=1`: the NVIDIA-layout split-KV kernel's word loads (`nvr`, one chunk a
    /// step) read K as they read V, eight lanes a row, and shuffle the words to the lanes the B
    /// operand gives them (`DEC_KLINES`; head dims multiples of 64), for measuring.
    var decodeKLines = false
    /// `VKFLEX_DECODE_UNROLL=1` / `0`: the split-KV kernels' step loops left to the driver to
    /// unroll, or `[[dont_unroll]]` (`DEC_DONT_UNROLL`); unset, the NVIDIA-layout kernel's is not
    /// unrolled and the scalar kernel's is left to the driver, for measuring.
    var decodeDriverUnroll: Bool?
    /// `VKFLEX_BWD_TILES=[D:]NSGxSTEP[xFLAGS][/NSGxSTEP[xFLAGS]][,…]`: the coopmat-nv backward
    /// passes' tiles, for tuning (checked per call against the shared memory): the dQ pass's, and
    /// the dK/dV pass's where they differ (after the slash); an entry with `D:` first is for calls
    /// of head dim D only, one without for the others (so one process can time each head dim's
    /// tiles, e.g. `64:8x64/8x64xp,128:8x64/8x32xp`).
    var backwardTilesForced: [BackwardTilesEntry] = []
    struct BackwardTilesEntry: Sendable { var headDim: Int?; var dq: BackwardNVTiles; var dkv: BackwardNVTiles? }

    /// The forced tiles of the dQ pass (`pass` 1) or the dK/dV pass (2) for a call of head dim `D`:
    /// the entry for D, else the one for every head dim, else nil (the planner's).
    func backwardTiles(pass: Int, D: Int) -> BackwardNVTiles? {
        guard let e = backwardTilesForced.first(where: { $0.headDim == D }) ?? backwardTilesForced.first(where: { $0.headDim == nil }) else { return nil }
        return pass == 1 ? e.dq : e.dkv ?? e.dq
    }
    /// `VKFLEX_BWD_OVERLAP=0`: a barrier between the backward's dQ and dK/dV passes, as before
    /// they ran side by side (`1`, the default), for measuring.
    var backwardOverlap = true
    /// `VKFLEX_GENERIC_TILES=NSGxBKV[xp|xp1][xr2|xr4]`: coopmat-generic's subgroups per workgroup, keys per step,
    /// `p` for its software pipeline (`GEN_PREFETCH`; `p1` with one K/V buffer, `GEN_NBUF=1`) and
    /// `rN` for N row blocks a subgroup (`GEN_RPW`), for tuning (checked per call against the
    /// shared memory and the matrix shape).
    var genericTiles: (nsg: Int, bkv: Int, prefetch: Bool, singleBuffer: Bool, rpw: Int)?
    /// `VKFLEX_GENERIC_SOFTMAX=registers` / `shared`: coopmat-generic's online softmax on the scores
    /// in their accumulators (`GEN_REGSM`) or on every step's scores in shared memory, for tuning.
    var genericRegisterSoftmax: Bool?
    /// `VKFLEX_GENERIC_MATRICES=software`: on a device without cooperative matrices, coopmat-generic
    /// runs its matrix code with software matrices in a scrambled element order (`VKF_MM_SOFT`)
    /// instead of its scalar emulation: for tests of the code a GPU runs (float16 only).
    var genericSoftMatrices = false
    /// `VKFLEX_GENERIC_LSE_SUMS=float32` / `both`: the row sums of coopmat-generic's register softmax
    /// where the call returns the LSE — float32 P for both O and the LSE, or products with ones
    /// for O beside float32 sums for the LSE (`MM_EXACT_SUMS` 1 / 2); unset: the planner's (1 for
    /// float16, 2 for bfloat16). For tests and tuning.
    var genericLSESums: Int?

    /// - Throws: ``FlexError/invalidArgument(_:)`` naming the variable and what it takes.
    static func parse(_ env: [String: String]) throws -> AttentionTuning {
        var t = AttentionTuning()
        if let k = env["VKFLEX_KERNEL"], !k.isEmpty, k.lowercased() != "auto" {
            guard let kernel = FlexKernel(name: k) else { throw FlexError("VKFLEX_KERNEL=\(k): use portable, coopmat-nv, coopmat-generic, split-kv or auto") }
            t.kernel = kernel
        }
        if let c = env["VKFLEX_COOPMAT_TILES"], !c.isEmpty {
            guard CoopmatTiles.parse(c) != nil else {
                throw FlexError("VKFLEX_COOPMAT_TILES=\(c): use BKVxRPWxNSGxNBUF[xP[xS]] with BKV a multiple of 16 up to 128, RPW 1-2, NSG 1-8, NBUF 1-2, P 0-1, S 1-4 and S·BKV at most 128 (e.g. 32x2x4x1x1x2)")
            }
            t.coopmatTiles = c
        }
        if let p = env["VKFLEX_PORTABLE_TILES"], !p.isEmpty {
            // At least one invocation per query row: the row statistics and the LSE are per invocation.
            let v = p.split(separator: "x", omittingEmptySubsequences: false).map { Int($0) ?? 0 }
            guard v.count == 3, v.allSatisfy({ $0 > 0 }), v[2] >= v[0] else {
                throw FlexError("VKFLEX_PORTABLE_TILES=\(p): use BQxBKVxWG with WG >= BQ that fits the device's shared memory (e.g. 32x32x128)")
            }
            t.portableTiles = (v[0], v[1], v[2])
        }
        if let push = env["VKFLEX_PUSH_PARAMS"] {
            guard ["0", "1", ""].contains(push) else { throw FlexError("VKFLEX_PUSH_PARAMS=\(push): use 0 (a buffer) or 1 (push constants where they fit)") }
            t.pushParams = push != "0"
        }
        if let c = env["VKFLEX_COOPMAT_SHAPE"], !c.isEmpty {
            let v = c.lowercased().split(separator: "x", omittingEmptySubsequences: false).map { Int($0) ?? 0 }
            guard v.count == 3, v.allSatisfy({ $0 > 0 }) else {
                throw FlexError("VKFLEX_COOPMAT_SHAPE=\(c): use MxNxK, a float16 shape the device lists (`vkflex devices`), e.g. 16x16x16")
            }
            t.coopmatShape = (v[0], v[1], v[2])
        }
        if let k = env["VKFLEX_DECODE_KLINES"], !k.isEmpty {
            guard k == "0" || k == "1" else { throw FlexError("VKFLEX_DECODE_KLINES=\(k): use 1 (the NVIDIA-layout split-KV kernel's K words loaded eight lanes a row, then shuffled) or 0") }
            t.decodeKLines = k == "1"
        }
        if let u = env["VKFLEX_DECODE_UNROLL"], !u.isEmpty {
            guard u == "0" || u == "1" else { throw FlexError("VKFLEX_DECODE_UNROLL=\(u): use 1 (the driver may unroll the split-KV kernels' step loops) or 0 (it may not); unset: not the NVIDIA-layout kernel's, the scalar kernel's yes") }
            t.decodeDriverUnroll = u == "1"
        }
        if let w = env["VKFLEX_DECODE_WAVES"], !w.isEmpty {
            guard let n = Int(w), (1...64).contains(n) else {
                throw FlexError("VKFLEX_DECODE_WAVES=\(w): use a whole number of workgroups per compute unit from 1 to 64 (default 4)")
            }
            t.decodeWaves = n
        }
        if let v = env["VKFLEX_DECODE_SPLITS"], !v.isEmpty {
            guard let n = Int(v), (1...65535).contains(n) else {
                throw FlexError("VKFLEX_DECODE_SPLITS=\(v): use a whole number of key splits from 1 to 65535 (unset: from the device)")
            }
            t.decodeSplits = n
        }
        let tileHelp = "use nv (the NVIDIA-layout kernel; nv2: two 16-key chunks a step, nvr2: with word loads; nvr: its matrices loaded word by word; nvx2, nvx4: 2 or 4 subgroups a workgroup; a final s: no prefetch, h: nvr's next step loaded as this one's is consumed), mm (the matrix kernel; mm16 or mm32: with 16 or 32 keys a step, mm16x4: and 1, 2 or 4 subgroups a workgroup, a final p: each step's K and V loaded a step ahead), scalar, or RxK[xL][xs]"
        if let k = env["VKFLEX_DECODE_TILE"]?.lowercased(), k == "nv2" || k == "nvr2" {
            t.decodeNV = (1, false, k == "nvr2", false)
            t.decodeNVChunks = 2
            t.decodeMatrices = false
        } else if var k = env["VKFLEX_DECODE_TILE"]?.lowercased(), k.hasPrefix("nv") {
            let prefetch = !k.hasSuffix("s"), rotate = k.hasSuffix("h")
            if !prefetch || rotate { k.removeLast() }
            let registers = k.hasPrefix("nvr")
            if registers { k.remove(at: k.index(k.startIndex, offsetBy: 2)) }
            let nsg = k == "nv" ? 1 : k.hasPrefix("nvx") ? Int(k.dropFirst(3)) ?? 0 : 0
            guard [1, 2, 4].contains(nsg), registers || !rotate else { throw FlexError("VKFLEX_DECODE_TILE=\(env["VKFLEX_DECODE_TILE"]!): \(tileHelp)") }
            t.decodeNV = (nsg, prefetch, registers, rotate)
            t.decodeMatrices = false
        } else if var k = env["VKFLEX_DECODE_TILE"]?.lowercased(), k == "scalar" || k.hasPrefix("mm") {
            // mm, mmN or mmNxS (the matrix kernel), with a final p for the prefetch; scalar.
            if k.hasPrefix("mm"), k.hasSuffix("p") { k.removeLast(); t.decodeMMPrefetch = true }
            let mm = k.split(separator: "x", omittingEmptySubsequences: false).map(String.init)
            guard k == "scalar" || ["mm", "mm16", "mm32"].contains(mm[0]) && (mm.count == 1 || mm.count == 2 && mm[0] != "mm" && ["1", "2", "4"].contains(mm[1])) else {
                throw FlexError("VKFLEX_DECODE_TILE=\(env["VKFLEX_DECODE_TILE"]!): \(tileHelp)")
            }
            t.decodeMatrices = k != "scalar"
            t.decodeMMKeys = Int(mm[0].dropFirst(2))
            t.decodeMMSubgroups = mm.count == 2 ? Int(mm[1]) : nil
        } else if let k = env["VKFLEX_DECODE_TILE"], !k.isEmpty {
            t.decodeMatrices = false
            var parts = k.lowercased().split(separator: "x", omittingEmptySubsequences: false).map(String.init)
            let scatter = parts.count > 2 && parts.last == "s"
            if scatter { parts.removeLast() }
            let v = parts.map { Int($0) ?? 0 }
            guard (2...3).contains(v.count), [1, 2, 4, 8, 16].contains(v[0]), (1...8).contains(v[1]),
                  v.count == 2 || [1, 2, 4, 8, 16, 32, 64].contains(v[2]) else {
                throw FlexError("VKFLEX_DECODE_TILE=\(k): \(tileHelp), R query rows per workgroup (1, 2, 4, 8 or 16), K keys loaded per key slot and round (1 to 8), L invocations per key (a power of two up to 64) and s for the scores' reduce-scatter, e.g. 4x2, 4x2x8 or 16x1xs")
            }
            t.decodeTile = (v[0], v[1], v.count == 3 ? v[2] : nil, scatter)
        }
        if let b = env["VKFLEX_BWD_TILES"], !b.isEmpty {
            for entry in b.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
                let colon = entry.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
                let headDim = colon.count == 2 ? Int(colon[0]) : nil
                let halves = (colon.last ?? "").split(separator: "/", omittingEmptySubsequences: false).map { BackwardNVTiles(parsing: String($0)) }
                guard colon.count <= 2, colon.count == 1 || (headDim ?? 0) > 0, halves.count <= 2, let dq = halves[0], halves.allSatisfy({ $0 != nil }),
                      !t.backwardTilesForced.contains(where: { $0.headDim == headDim }) else {
                    throw FlexError("VKFLEX_BWD_TILES=\(b): use NSGxSTEP[xFLAGS], 1 to 8 subgroups, a multiple of 16 rows up to 128 per step, FLAGS of s (the owned rows' operands in shared memory), p (prefetch), k (dK and dV in two dispatches) and r (32 rows a subgroup), e.g. 8x64xp or 4x64xpk; A/B for the dQ pass's and the dK/dV pass's; a head dim and a colon first for calls of that head dim only, entries apart by commas, e.g. 64:8x64xp,128:8x64/8x32xp")
                }
                t.backwardTilesForced.append(.init(headDim: headDim, dq: dq, dkv: halves.count == 2 ? halves[1] : nil))
            }
        }
        if let o = env["VKFLEX_BWD_OVERLAP"], !o.isEmpty {
            guard o == "0" || o == "1" else { throw FlexError("VKFLEX_BWD_OVERLAP=\(o): use 1 (the backward's dQ and dK/dV passes side by side, the default) or 0 (a barrier between them)") }
            t.backwardOverlap = o == "1"
        }
        if let g = env["VKFLEX_GENERIC_TILES"], !g.isEmpty {
            let parts = g.lowercased().split(separator: "x", omittingEmptySubsequences: false).map(String.init)
            // Flags after NSGxBKV: at most one pipeline flag (p, p1), then at most one row-block flag (r2, r4).
            let flags = Array(parts.dropFirst(2))
            let pipe = flags.first.flatMap { ["p", "p1"].contains($0) ? $0 : nil }
            let rows = flags.dropFirst(pipe == nil ? 0 : 1)
            let rpw = rows.first.flatMap { ["r2": 2, "r4": 4][$0] }
            guard rows.count == (rpw == nil ? 0 : 1), parts.count >= 2, let nsg = Int(parts[0]), let bkv = Int(parts[1]), [1, 2, 4, 8].contains(nsg),
                  bkv > 0, bkv % 8 == 0, bkv <= 128 else {
                throw FlexError("VKFLEX_GENERIC_TILES=\(g): use NSGxBKV[xp|xp1][xr2|xr4], 1, 2, 4 or 8 subgroups, a multiple of 8 keys up to 128 a step, p for the software pipeline (p1: with one K/V buffer) and rN for N row blocks a subgroup, e.g. 4x32xp or 4x16xr2")
            }
            t.genericTiles = (nsg, bkv, pipe != nil, pipe == "p1", rpw ?? 1)
        }
        if let g = env["VKFLEX_GENERIC_SOFTMAX"], !g.isEmpty {
            guard ["registers", "shared"].contains(g.lowercased()) else {
                throw FlexError("VKFLEX_GENERIC_SOFTMAX=\(g): use registers (the scores stay in their accumulators) or shared (every step's scores through shared memory)")
            }
            t.genericRegisterSoftmax = g.lowercased() == "registers"
        }
        if let m = env["VKFLEX_GENERIC_MATRICES"], !m.isEmpty {
            guard ["software", "device"].contains(m.lowercased()) else {
                throw FlexError("VKFLEX_GENERIC_MATRICES=\(m): use software (software matrices in a scrambled element order, on a device without cooperative matrices) or device")
            }
            t.genericSoftMatrices = m.lowercased() == "software"
        }
        if let m = env["VKFLEX_GENERIC_LSE_SUMS"], !m.isEmpty {
            guard let v = ["float32": 1, "both": 2][m.lowercased()] else {
                throw FlexError("VKFLEX_GENERIC_LSE_SUMS=\(m): use float32 (O and the LSE from float32 row sums) or both (O from products with ones, the LSE from float32 sums)")
            }
            t.genericLSESums = v
        }
        if env["VKFLEX_COOPMAT_DEFINES"] != nil {
            throw FlexError("VKFLEX_COOPMAT_DEFINES is gone: the kernels take only what the planner chooses (docs/performance.md keeps the experiments)")
        }
        return t
    }

    /// The device's tuning, parsed the first time it is asked for.
    static func of(_ device: Device) throws -> AttentionTuning {
        try device.memoized("vkflex.attention.tuning") { try parse(device.environment) }
    }
}

/// The coopmat-nv backward passes' tiles (flex_attention_bwd_nv.comp): subgroups per workgroup
/// (each owns 16 rows, or 32 with `rpw` 2: each staged operand then feeds two products), rows
/// staged per step, the owned rows' operands in shared memory instead of registers, each step's
/// rows loaded while the step before computes, the dK/dV pass split in two dispatches (dV, then
/// dK: half the accumulators each, S computed twice).
/// `VKFLEX_BWD_TILES` spells them `NSGxSTEP[xFLAGS]`, FLAGS of `s`, `p`, `k` and `r` (`rpw` 2):
/// `8x64xp`; `A/B` gives the dQ pass A and the dK/dV pass B.
struct BackwardNVTiles: Sendable, CustomStringConvertible {
    var nsg: Int, step: Int
    var ownShared = false, prefetch = false, splitDKV = false
    /// 16-row blocks each subgroup owns (1 or 2).
    var rpw = 1

    init(nsg: Int, step: Int, ownShared: Bool = false, prefetch: Bool = false, splitDKV: Bool = false, rpw: Int = 1) {
        (self.nsg, self.step, self.ownShared, self.prefetch, self.splitDKV, self.rpw) = (nsg, step, ownShared, prefetch, splitDKV, rpw)
    }

    /// Nil unless `text` is `NSGxSTEP[xFLAGS]` with 1-8 subgroups, a multiple of 16 rows up to 128
    /// a step, and flags among `s`, `p`, `k` and `r`, each once.
    init?(parsing text: String) {
        let parts = text.lowercased().split(separator: "x", omittingEmptySubsequences: false)
        guard parts.count == 2 || parts.count == 3, let nsg = Int(parts[0]), let step = Int(parts[1]),
              (1...8).contains(nsg), step > 0, step % 16 == 0, step <= 128 else { return nil }
        let flags = parts.count == 3 ? String(parts[2]) : ""
        guard !(parts.count == 3 && flags.isEmpty), flags.allSatisfy({ "spkr".contains($0) }), Set(flags).count == flags.count else { return nil }
        self.init(nsg: nsg, step: step, ownShared: flags.contains("s"), prefetch: flags.contains("p"), splitDKV: flags.contains("k"),
                  rpw: flags.contains("r") ? 2 : 1)
    }

    var description: String {
        let flags = (ownShared ? "s" : "") + (prefetch ? "p" : "") + (splitDKV ? "k" : "") + (rpw == 2 ? "r" : "")
        return "\(nsg)x\(step)" + (flags.isEmpty ? "" : "x" + flags)
    }
}

/// Everything that selects and parameterizes an attention pipeline: the pipeline-cache key, and the
/// only input the shader defines are made from (``source()``).
struct AttentionPlan: Hashable, Sendable {
    enum Pass: Hashable, Sendable {
        /// O (in the query's dtype) and the row statistics.
        case forward
        /// O as float32 over a share of the keys, merged afterwards (key splits).
        case forwardPartial
        /// One pass of the backward (flex_attention_bwd.comp's `BWD_PASS`): 0 Δ, 1 dQ, 2 dK/dV,
        /// 3 the sinks' gradient, 4 the sum of splits' partials, 5 the captures' gradients.
        case backward(Int)
    }
    enum Tiles: Hashable, Sendable {
        case portable(BQ: Int, BKV: Int, WG: Int)
        case coopmat(CoopmatTiles)
        /// Split-KV decoding: query rows per workgroup, keys per key slot and round, invocations,
        /// invocations per key (``AttentionPlanner/DecodeTiles``).
        case decode(rows: Int, KPL: Int, WG: Int, LK: Int, scatter: Bool, noUnroll: Bool = false)
        /// Split-KV decoding through cooperative matrices (flex_attention_decode_mm.comp): one
        /// subgroup a workgroup, M rows, BKV keys a step.
        case decodeMM(GenericTiles)
        /// The backward's passes: the dQ and dK/dV passes' tiles (query rows, keys; 0 for the
        /// other passes) and invocations per workgroup.
        case backward(BQ: Int, BKV: Int, WG: Int)
        /// coopmat-generic: matrix shape, subgroup size, subgroups, keys per step.
        case generic(GenericTiles)
    }

    var pass: Pass
    var kernel: FlexKernel
    var dtype: DType
    var D: Int, Dv: Int
    var tiles: Tiles
    /// Cooperative-matrix kernel: the softmax maximum over raw scores (no score-mod, scale > 0).
    var rawMax = false
    /// Cooperative-matrix kernel: P evaluated in fp16 (with a score-mod).
    var exp16 = false
    /// Cooperative-matrix kernel: Q·Kᵀ as 16×8×16 products (the 16×8 layout was measured).
    var narrowK = false
    /// Cooperative-matrix kernels (coopmat-nv, coopmat-generic's register softmax): row sums of
    /// float32 P, not of the fp16 P that O is built from (where the call returns the LSE, whose
    /// error a sum of fp16 P would set at ~1e-5).
    var exactRowSums = false
    /// coopmat-generic's register softmax: with `exactRowSums`, O's row sums still by products with
    /// ones (the rounded P that O is built from) and float32 sums beside them for the LSE (`MM_EXACT_SUMS 2`).
    var bothRowSums = false
    /// The mods' tanh exact to a few float roundings, not ~1e-7 absolute (`VKF_EXACT_TANH`: the portable
    /// and split-KV kernels, where the call returns the LSE and a mod takes a tanh; soft-capping put
    /// the LSE at 2-3x PyTorch's error).
    var exactTanh = false
    /// Cooperative-matrix kernel: index sums of the score-mod from float indices (lengths ≤ 2^22).
    var floatIndices = false
    /// Cooperative-matrix kernel: built for `VK_KHR_cooperative_matrix` (typed B operands): the
    /// NV SPIR-V is rewritten for that extension when the pipeline is built.
    var typedOperands = false
    /// The kernel also writes each row's maximum score.
    var maxScores = false
    /// Per-batch key lengths are read from a tensor (`kvLengths:`).
    var kvLengths = false
    /// Each head's sink logit joins the softmax denominator (`sinks:`; a key split's merge adds it).
    var sinks = false
    /// Backward pass 5: the captures' gradients added with float atomics (else per-workgroup slices).
    var capAtomic = false
    /// The portable backward's accumulator loops unrolled (`VKF_UNROLL_ACC`; on GPUs).
    var unrollAccumulators = false
    /// Query rows sit at per-batch offsets (`qOffset:`; portable kernel).
    var qOffsets = false
    /// K and V are read through a page table (`pageTable:`; portable kernel).
    var paged = false
    /// The parameter block as push constants (else a buffer).
    var pushParams: Bool
    /// The kernel's 16-bit matrix operands are bfloat16: its SPIR-V's 16-bit floats are retyped
    /// when the pipeline is built (`BFloat16Retyper`; generic kernels through the KHR extension).
    var bfloat16Operands: Bool { typedOperands && dtype == .bfloat16 }
    /// The mods' identity: their generated GLSL.
    var mods: String

    var BQ: Int {
        switch tiles {
        case .portable(let bq, _, _), .decode(let bq, _, _, _, _, _), .backward(let bq, _, _): return bq
        case .coopmat(let t): return t.BQ
        case .generic(let t): return t.BQ
        case .decodeMM(let t): return t.M
        }
    }
    var BKV: Int {
        switch tiles {
        case .portable(_, let bkv, _), .backward(_, let bkv, _): return bkv
        case .decode(_, let kpl, let wg, let lk, _, _): return kpl * wg / lk
        case .coopmat(let t): return t.BKV
        case .generic(let t), .decodeMM(let t): return t.BKV
        }
    }
    var WG: Int {
        switch tiles {
        case .portable(_, _, let wg), .decode(_, _, let wg, _, _, _), .backward(_, _, let wg): return wg
        case .coopmat(let t): return 32 * t.NSG
        case .generic(let t): return t.WG
        case .decodeMM(let t): return t.WG
        }
    }

    /// The cooperative-matrix kernels' dtype defines: fp16 or bf16 in, the same out (float32 for a key split's partials).
    private func sixteenBitDefines(partial: Bool) -> [ShaderSource.Define] {
        let (input, output) = dtype == .bfloat16 ? ("IN_BF16", "OUT_BF16") : ("IN_F16", "OUT_F16")
        return [.init(input, "1"), .init(output, partial ? "0" : "1")]
    }

    /// The template and its defines, from this plan alone.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` when the template is missing from `VKFLEX_SHADER_DIR`.
    func source() throws -> ShaderSource {
        var source: ShaderSource
        switch tiles {
        case .portable(let BQ, let BKV, let WG):
            let f16 = dtype == .float16, partial = pass == .forwardPartial
            source = ShaderSource(name: "flex_attention_fwd", text: try ShaderLibrary.standard.text("flex_attention_fwd.comp"), defines: [
                .init("D", "\(D)"), .init("DV", "\(Dv)"), .init("BQ", "\(BQ)"), .init("BKV", "\(BKV)"),
                .init("WG", "\(WG)"), .init("IN_F16", f16 ? "1" : "0"), .init("OUT_F16", f16 && !partial ? "1" : "0"),
            ])
            // bfloat16 is stored as 16 bits and computed in float32 (never narrowed to float16).
            if dtype == .bfloat16 { source.defines += [.init("IN_BF16", "1"), .init("OUT_BF16", partial ? "0" : "1")] }
            if partial { source.defines.append(.init("VKF_KV_SPLIT", "1")) }
        case .backward(let BQ, let BKV, let WG):
            guard case .backward(let n) = pass else { preconditionFailure("backward tiles without a backward pass") }
            var defines: [ShaderSource.Define] = [.init("BWD_PASS", "\(n)"), .init("D", "\(D)"), .init("DV", "\(Dv)"), .init("WG", "\(WG)")]
            if BQ > 0 { defines += [.init("BQ", "\(BQ)"), .init("BKV", "\(BKV)")] }
            switch dtype {
            case .float16: defines += [.init("IN_F16", "1"), .init("OUT_F16", "1")]
            case .bfloat16: defines += [.init("IN_BF16", "1"), .init("OUT_BF16", "1")]
            default: break
            }
            if n == 0 { defines.append(.init("DL", "\(BackwardKernel.deltaLanes)")) }
            if n == 5 { defines.append(.init("VKF_CAP_ATOMIC", capAtomic ? "1" : "0")) }
            if unrollAccumulators { defines.append(.init("VKF_UNROLL_ACC", "1")) }
            source = ShaderSource(name: "flex_attention_bwd", text: try ShaderLibrary.standard.text("flex_attention_bwd.comp"), defines: defines)
        case .decode(let rows, let KPL, let WG, let LK, let scatter, let noUnroll):
            source = ShaderSource(name: "flex_attention_decode", text: try ShaderLibrary.standard.text("flex_attention_decode.comp"), defines: [
                .init("D", "\(D)"), .init("DV", "\(Dv)"), .init("RMAX", "\(rows)"), .init("KPL", "\(KPL)"), .init("WG", "\(WG)"), .init("LK", "\(LK)"), .init("DEC_RS", scatter ? "1" : "0"),
                .init("IN_F16", dtype == .float16 ? "1" : "0"),
            ])
            if noUnroll { source.defines.append(.init("DEC_DONT_UNROLL", "1")) }
            if dtype == .bfloat16 { source.defines.append(.init("IN_BF16", "1")) }
        case .decodeMM(let t) where t.nvDecode:
            source = ShaderSource(name: "flex_attention_decode_nv", text: try ShaderLibrary.standard.text("flex_attention_decode_nv.comp"), defines: [
                .init("D", "\(D)"), .init("DV", "\(Dv)"), .init("NSG", "\(t.NSG)"),
                .init("DEC_PREFETCH", t.nvRotate ? "2" : t.prefetch ? "1" : "0"), .init("DEC_REGLOAD", t.nvRegisters ? "1" : "0"),
                .init("DEC_DONT_UNROLL", t.nvDriverUnroll ? "0" : "1"), .init("DEC_CHUNKS", "\(t.nvChunks)"),
                .init("DEC_KLINES", t.nvKLines && t.nvRegisters && t.nvChunks == 1 && D % 64 == 0 ? "1" : "0"),
                .init(dtype == .bfloat16 ? "IN_BF16" : "IN_F16", "1"),
            ], optimization: .full)
            if t.nvChunks > 1 { source.defines.append(.init("DEC_B_T", t.nvBTransposed ? "1" : "0")) }
        case .decodeMM(let t):
            source = ShaderSource(name: "flex_attention_decode_mm", text: try ShaderLibrary.standard.text("flex_attention_decode_mm.comp"), defines: [
                .init("D", "\(D)"), .init("DV", "\(Dv)"), .init("MM", "\(t.M)"), .init("MN", "\(t.N)"), .init("MK", "\(t.K)"),
                .init("SG", "\(t.SG)"), .init("NSG", "\(t.NSG)"), .init("BKV", "\(t.BKV)"), .init("VKF_MM_EMULATE", t.emulated ? "1" : "0"),
                .init("DEC_PREFETCH", t.prefetch ? "1" : "0"), .init(dtype == .bfloat16 ? "IN_BF16" : "IN_F16", "1"),
            ])
        case .generic(let t):
            if case .backward(let n) = pass, kernel == .coopmatNV {
                // The backward's dQ (1) and dK/dV (2) passes on NVIDIA's layout: 16 rows owned per
                // subgroup, BKV staged per step.
                source = ShaderSource(name: "flex_attention_bwd_nv", text: try ShaderLibrary.standard.text("flex_attention_bwd_nv.comp"), defines: [
                    .init("BWD_PASS", "\(n)"), .init("D", "\(D)"), .init("DV", "\(Dv)"), .init("NSG", "\(t.NSG)"), .init("STEP", "\(t.BKV)"),
                    .init("BQ", "\(t.BQ)"), .init("OWN_SHARED", t.ownShared ? "1" : "0"), .init("PREFETCH", t.prefetch ? "1" : "0"),
                    .init("DKV", "\(t.dkvHalf)"), .init("RPW", "\(t.rpw)"),
                ] + sixteenBitDefines(partial: false))
                break
            }
            if case .backward(let n) = pass {
                // The backward's dQ (1) and dK/dV (2) passes through matrices: T rows owned and T staged.
                source = ShaderSource(name: "flex_attention_bwd_mm", text: try ShaderLibrary.standard.text("flex_attention_bwd_mm.comp"), defines: [
                    .init("BWD_PASS", "\(n)"), .init("D", "\(D)"), .init("DV", "\(Dv)"), .init("MM", "\(t.M)"), .init("MN", "\(t.N)"),
                    .init("MK", "\(t.K)"), .init("SG", "\(t.SG)"), .init("NSG", "\(t.NSG)"), .init("BQ", "\(t.BQ)"), .init("BKV", "\(t.BQ)"),
                    .init("VKF_MM_EMULATE", t.emulated ? "1" : "0"),
                ] + sixteenBitDefines(partial: false))
                if t.soft { source.defines.append(.init("VKF_MM_SOFT", "1")) }
                break
            }
            source = ShaderSource(name: "flex_attention_fwd_generic", text: try ShaderLibrary.standard.text("flex_attention_fwd_generic.comp"), defines: [
                .init("D", "\(D)"), .init("DV", "\(Dv)"), .init("MM", "\(t.M)"), .init("MN", "\(t.N)"), .init("MK", "\(t.K)"),
                .init("SG", "\(t.SG)"), .init("NSG", "\(t.NSG)"), .init("BKV", "\(t.BKV)"), .init("VKF_MM_EMULATE", t.emulated ? "1" : "0"),
                .init("GEN_PREFETCH", t.prefetch ? "1" : "0"), .init("GEN_REGSM", t.registerSoftmax ? "1" : "0"),
                .init("GEN_NBUF", t.singleBuffer ? "1" : "2"), .init("GEN_RPW", "\(t.rpw)"),
                .init("MM_EXACT_SUMS", bothRowSums ? "2" : exactRowSums ? "1" : "0"),
            ] + sixteenBitDefines(partial: pass == .forwardPartial))
            if t.soft { source.defines.append(.init("VKF_MM_SOFT", "1")) }
            if pass == .forwardPartial { source.defines.append(.init("VKF_KV_SPLIT", "1")) }
        case .coopmat(let t):
            var defines: [ShaderSource.Define] = [.init("D", "\(D)"), .init("BKV", "\(t.BKV)"), .init("NSG", "\(t.NSG)"), .init("RPW", "\(t.RPW)"),
                                                  .init("NBUF", "\(t.NBUF)"), .init("SPLIT", "\(t.split)"), .init("VKF_NO_PREFETCH", t.prefetch ? "0" : "1"),
                                                  .init("VKF_RAW_MAX", rawMax ? "1" : "0"), .init("VKF_EXP16", exp16 ? "1" : "0"),
                                                  .init("VKF_K8", narrowK ? "1" : "0"), .init("VKF_FLOAT_INDICES", floatIndices ? "1" : "0"),
                                                  .init("VKF_MMA_ROWSUM", narrowK && !exactRowSums ? "1" : "0")]
            // Up to D = 64 (two steps per staged tile), every step is computed and O rescaled at each:
            // no second version of O to merge (H200: causal D=64 +4%, ALiBi +7%; at D = 128 the
            // driver spilled).
            let straight = D <= 64 && t.split > 1
            defines += [.init("VKF_ALWAYS_HALVES", straight ? "1" : "0"), .init("VKF_ALWAYS_RESCALE", straight && !typedOperands ? "1" : "0")]
            if D > 128 { defines.append(.init("QC", "\(CoopmatTiles.stagingColumns(D: D))")) }
            defines += sixteenBitDefines(partial: false)
            source = ShaderSource(name: "flex_attention_fwd_coopmat", text: try ShaderLibrary.standard.text("flex_attention_fwd_coopmat.comp"),
                                  defines: defines, optimization: .full)
        }
        if exactTanh { source.defines.append(.init("VKF_EXACT_TANH", "1")) }
        if maxScores { source.defines.append(.init("VKF_MAX_SCORES", "1")) }
        if kvLengths { source.defines.append(.init("VKF_KV_LENGTHS", "1")) }
        if qOffsets { source.defines.append(.init("VKF_Q_OFFSETS", "1")) }
        if paged { source.defines.append(.init("VKF_PAGED", "1")) }
        if sinks && pass == .forward && kernel != .splitKV { source.defines.append(.init("VKF_SINKS", "1")) }
        if pushParams { source.defines.append(.init("VKF_PARAMS_PUSH", "1")) }
        return source
    }
}

/// Turns (device capabilities, shapes, dtypes, mask, mods, options) into a plan — ggml-vulkan's
/// `get_fa_tuning_params` in spirit: every device quirk and tile table, with its measurement,
/// lives here.
enum AttentionPlanner {
    /// The forward plan of a call.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for tuning variables that do not fit the call;
    ///   ``FlexError/unsupported(_:)`` when no cooperative-matrix tiles fit.
    static func forward(shape s: AttentionShape, mods: SplicedMods, scoreMod: ScoreMod?, blockMask: BlockMask?, scale: Double,
                        kernel: FlexKernel, device: Device, pass: AttentionPlan.Pass = .forward, maxScores: Bool = false,
                        kvLengths: Bool = false, sinks: Bool = false, qOffsets: Bool = false, paged: Bool = false,
                        lse: Bool = false) throws -> AttentionPlan {
        var plan = try forwardTiles(shape: s, mods: mods, scoreMod: scoreMod, blockMask: blockMask, scale: scale, kernel: kernel, device: device,
                                    pass: pass, maxScores: maxScores, kvLengths: kvLengths, sinks: sinks, qOffsets: qOffsets, paged: paged, lse: lse)
        // The LSE through a soft-cap: 2.1-3.3x PyTorch's error with the fast tanh, 0.68-0.91x with
        // the exact one in the portable kernel. Not in the matrix kernels, whose time is the
        // per-score work: coopmat-nv's soft-cap forward ran at half speed with it (187.8 -> 99.4
        // TFLOP/s) and its LSE still missed the rule (2.47 -> 1.19). H100, 2026-12-07.
        plan.exactTanh = lse && mods.glsl.usesTanh && (plan.kernel == .portable || plan.kernel == .splitKV)
        return plan
    }

    private static func forwardTiles(shape s: AttentionShape, mods: SplicedMods, scoreMod: ScoreMod?, blockMask: BlockMask?, scale: Double,
                                     kernel: FlexKernel, device: Device, pass: AttentionPlan.Pass, maxScores: Bool,
                                     kvLengths: Bool, sinks: Bool, qOffsets: Bool, paged: Bool, lse: Bool) throws -> AttentionPlan {
        let caps = device.capabilities
        let tuning = try AttentionTuning.of(device)
        let push = pushesParams(device, tuning: tuning)
        switch kernel {
        case .portable:
            let f16 = s.dtype == .float16
            var t = portableTiles(D: s.D, Dv: s.Dv, device: device, half: f16, queryBlock: blockMask?.blockSize.q)
            if let forced = tuning.portableTiles {
                guard forced.WG <= caps.maxWorkgroupInvocations,
                      portableSharedBytes(D: s.D, Dv: s.Dv, BQ: forced.BQ, BKV: forced.BKV, WG: forced.WG, half: f16) <= caps.maxSharedMemory - 256 else {
                    throw FlexError("VKFLEX_PORTABLE_TILES=\(device.environment["VKFLEX_PORTABLE_TILES"] ?? ""): use BQxBKVxWG with WG >= BQ that fits \(caps.maxSharedMemory) bytes of shared memory at head dims \(s.D)/\(s.Dv) (e.g. 32x32x128)")
                }
                t = forced
            }
            return AttentionPlan(pass: pass, kernel: kernel, dtype: s.dtype, D: s.D, Dv: s.Dv, tiles: .portable(BQ: t.BQ, BKV: t.BKV, WG: t.WG),
                                 maxScores: maxScores, kvLengths: kvLengths, sinks: sinks, qOffsets: qOffsets, paged: paged, pushParams: push,
                                 mods: mods.glsl.source)
        case .splitKV:
            guard let t = decodeTiles(s, device: device) else {
                throw FlexError.unsupported("split-kv: " + (decodeProblem(s, device: device) ?? "no tiles fit"))
            }
            var typed = false
            if case .decodeMM(let mm) = t { typed = !mm.emulated && device.cooperativeMatrixAPI == .khr }
            return AttentionPlan(pass: .forwardPartial, kernel: kernel, dtype: s.dtype, D: s.D, Dv: s.Dv, tiles: t, typedOperands: typed,
                                 maxScores: maxScores, kvLengths: kvLengths, qOffsets: qOffsets, paged: paged, pushParams: push, mods: mods.glsl.source)
        case .coopmatGeneric:
            guard let t = genericTiles(D: s.D, Dv: s.Dv, dtype: s.dtype, device: device, tuning: tuning) else {
                throw FlexError.unsupported("coopmat-generic: " + (genericProblem(s, device: device, tuning: tuning) ?? "no tiles fit"))
            }
            // Where the call returns the LSE, the register softmax adds float32 P (its products with
            // ones add the fp16 P: LSE 157-509x PyTorch's error on an H100, 1.00-1.43x with float32
            // sums). bfloat16 keeps the products with ones for O beside the float32 sums: O, built
            // from P rounded to 8 bits, no longer shares its rounding with a float32 l (an H100,
            // 2026-12-07, D = 160 / Dv = 48: out 1.04 -> 1.47x PyTorch's error); docs/performance.md.
            let sums = lse && t.registerSoftmax ? tuning.genericLSESums ?? (s.dtype == .bfloat16 ? 2 : 1) : 0
            return AttentionPlan(pass: pass, kernel: kernel, dtype: s.dtype, D: s.D, Dv: s.Dv, tiles: .generic(t),
                                 exactRowSums: sums > 0, bothRowSums: sums == 2,
                                 typedOperands: !t.emulated && device.cooperativeMatrixAPI == .khr,
                                 maxScores: maxScores, kvLengths: kvLengths, sinks: sinks, qOffsets: qOffsets, paged: paged, pushParams: push,
                                 mods: mods.glsl.source)
        case .coopmatNV:
            if qOffsets { throw FlexError.unsupported("the cooperative-matrix kernel does not take qOffset: (the portable kernel does)") }
            if paged { throw FlexError.unsupported("the cooperative-matrix kernel does not read paged K/V (the portable kernel does)") }
            let identity = scoreMod.map { $0.isIdentity } ?? true
            guard let t = CoopmatTiles(D: s.D, device: device, queryBlock: blockMask?.blockSize.q, dense: blockMask == nil, forced: tuning.coopmatTiles) else {
                throw FlexError.unsupported("no cooperative-matrix tiles fit \(caps.name)'s shared memory at head dim \(s.D)")
            }
            // bfloat16: no fp16 exp2 (bfloat16 has no arithmetic; P is converted from float32) and
            // no 16x8 products (whose bfloat16 shape and layout are not measured).
            let bf16 = s.dtype == .bfloat16
            return AttentionPlan(pass: pass, kernel: kernel, dtype: s.dtype, D: s.D, Dv: s.Dv, tiles: .coopmat(t),
                                 rawMax: identity && scale > 0, exp16: !identity && !bf16 && !lse,
                                 narrowK: !bf16 && CooperativeMatrixLayout.of(device)?.narrowMatchesNVIDIA ?? false, exactRowSums: lse,
                                 floatIndices: max(s.Lq, s.Lkv) <= 1 << 22, typedOperands: device.cooperativeMatrixAPI == .khr,
                                 maxScores: maxScores, kvLengths: kvLengths, sinks: sinks, pushParams: push, mods: mods.glsl.source)
        }
    }

    /// The most query rows a split-KV call takes (rows per workgroup are the plan's, 4 by default;
    /// a group's other (head, row) pairs go to further workgroups).
    static let decodeRows = 16

    /// The split-KV decode kernel's shape (flex_attention_decode.comp): `rows` query rows per
    /// workgroup, `lanes` invocations per key (each holding 16-byte units of its K and V rows),
    /// `keys` keys per key slot and round (loads in flight), `WG` invocations.
    struct DecodeTiles: Hashable, Sendable { var rows: Int, keys: Int, WG: Int, lanes: Int, scatter = false }

    /// Forces the split-KV matrix kernel on or off for the calls inside `withValue` (the first-call
    /// check compares the two; `VKFLEX_DECODE_TILE` does the same for a process).
    @TaskLocal static var forcedDecodeMatrices: Bool?

    /// Why the split-KV decode kernel cannot run this call, or nil when it can.
    static func decodeProblem(_ s: AttentionShape, device: Device, maxScores: Bool = false) -> String? {
        if s.Lq > decodeRows { return "split-kv takes at most \(decodeRows) query rows (decoding); this call has \(s.Lq)" }
        let caps = device.capabilities
        if !caps.subgroupOperations.contains("shuffle") || !caps.subgroupOperations.contains("vote") {
            return "split-kv needs subgroup shuffles and votes, which \(caps.name) does not offer to compute shaders"
        }
        guard decodeTiles(s, device: device) == nil else { return nil }
        if (forcedDecodeMatrices ?? (try? AttentionTuning.of(device))?.decodeMatrices) == true {
            return "VKFLEX_DECODE_TILE=mm: " + (decodeMMProblem(s, device: device) ?? "no tiles fit")
        }
        if let forced = (try? AttentionTuning.of(device))?.decodeTile {
            return "VKFLEX_DECODE_TILE=\(device.environment["VKFLEX_DECODE_TILE"] ?? "") does not fit \(caps.name)'s smallest subgroup (\(caps.minSubgroupSize)) or its shared memory at head dims \(s.D)/\(s.Dv)"
        }
        return "head dims \(s.D)/\(s.Dv) need more shared memory than \(caps.name) has"
    }

    /// A split-KV call's tiles: the matrix kernel's where it is forced, else where the planner
    /// picks it (``decodeMMByDefault(_:device:tuning:)``), else the scalar kernel's; nil when they do not fit.
    static func decodeTiles(_ s: AttentionShape, device: Device) -> AttentionPlan.Tiles? {
        let caps = device.capabilities
        let tuning = (try? AttentionTuning.of(device)) ?? AttentionTuning()
        // The NVIDIA-layout kernel where forced or measured faster, and the inputs allow it (else
        // the kernels below, whose loads take any layout).
        // Unforced: word-by-word loads that read whole sectors, the next chunk's loaded as this
        // one's registers free up (`nvrh`), where the B operand's layout is the one they are written
        // for (NVIDIA's KHR extension) and the inputs float16; else two 16-key chunks a step where
        // the B layout is one the kernel knows (`nv2`), else one. H100, 2026-12-06 22:05-22:09
        // (`VKFLEX_DECODE_TILE=t VKFLEX_PROFILE=1 vkflex bench --suite decode`, kernel µs):
        // specdec_4_of_8k nvrh 129.2 against nv2's 143.0, decode_mqa_32k 84.7 against 85.4,
        // decode_dense_4k 62.5 against 76.0, with 196 registers against 241.
        // (Head dims whose words a lane loads in 16-byte units, the ones `nvrh` has run on a GPU:
        // D a multiple of 32, Dv of 64; `VKFLEX_DECODE_TILE=nvrh` takes the others.)
        let wordUnits = s.D % 32 == 0 && s.Dv % 64 == 0
        let defaults: [(chunks: Int, registers: Bool)] = (wordUnits ? [(1, true)] : []) + [(2, false), (1, false)]
        if forcedDecodeMatrices == nil, tuning.decodeNV != nil || tuning.decodeMatrices == nil && decodeNVByDefault(s),
           let pick = (tuning.decodeNV != nil ? [(tuning.decodeNVChunks, tuning.decodeNV!.registers)] : defaults).first(where: {
               decodeNVProblem(s, device: device, registers: $0.registers, chunks: $0.chunks) == nil }) {
            var tuned = tuning
            if tuning.decodeNV == nil, pick.registers { tuned.decodeNV = (1, true, true, true) }   // nvrh
            var t = decodeNVTiles(tuned, chunks: pick.chunks)
            // DEC_CHUNKS 2 zeroes V's rows past a chunk's keys through the B operand's layout.
            if t.nvChunks > 1 {
                t.nvBTransposed = CooperativeMatrixLayout.of(device).map { (s.dtype == .bfloat16 ? $0.bfloat16B : $0.float16B) == CooperativeMatrixLayout.nvidiaMMAB } ?? false
            }
            return .decodeMM(t)
        }
        if forcedDecodeMatrices ?? tuning.decodeMatrices ?? decodeMMByDefault(s, device: device, tuning: tuning) {
            guard decodeMMProblem(s, device: device) == nil, let mm = decodeMMTiles(s, device: device, tuning: tuning) else { return nil }
            return .decodeMM(mm)
        }
        return decodeTiles(D: s.D, Dv: s.Dv, Lq: s.Lq, dtype: s.dtype, minSubgroupSize: caps.minSubgroupSize, sharedMemory: caps.maxSharedMemory,
                           maxInvocations: caps.maxWorkgroupInvocations, cpu: caps.type == .cpu, forced: tuning.decodeTile)
            .map { .decode(rows: $0.rows, KPL: $0.keys, WG: $0.WG, LK: $0.lanes, scatter: $0.scatter, noUnroll: tuning.decodeDriverUnroll == false) }
    }

    /// The decode kernel's shape for a call. Rows: 4 (the four query heads of a Llama-like group in
    /// one workgroup, each key read once for them; more rows per workgroup cost registers, and on
    /// lavapipe compile time: 16 rows took 18 s against 3 s), a call's other rows in further
    /// workgroups, or `VKFLEX_DECODE_TILE`'s. Lanes
    /// per key: as many 16-byte units as a row has, at most the device's smallest subgroup (a
    /// power of two, so that it divides every subgroup size). Two keys per slot and round — one on
    /// a CPU device, which has no memory latency to hide and compiles the shorter shader faster
    /// (lavapipe: 2.8 s against 4.0 s); 128 invocations (or the device's most).
    static func decodeTiles(D: Int, Dv: Int, Lq: Int, dtype: DType, minSubgroupSize: Int, sharedMemory: Int, maxInvocations: Int,
                            cpu: Bool = false, forced: (rows: Int, keys: Int, lanes: Int?, scatter: Bool)? = nil) -> DecodeTiles? {
        guard Lq >= 1, Lq <= decodeRows, minSubgroupSize >= 1 else { return nil }
        func pow2(atMost n: Int) -> Int { var p = 1; while p * 2 <= n { p *= 2 }; return p }
        let unit = dtype.size == 2 ? 8 : 4
        let units = (max(D, Dv) + unit - 1) / unit
        var lanes = min(pow2(atMost: units), pow2(atMost: minSubgroupSize))
        let wg = min(128, pow2(atMost: maxInvocations))
        var rows = 4, keys = cpu ? 1 : 2, scatter = false
        if let forced {
            guard (forced.lanes ?? 1) <= minSubgroupSize else { return nil }
            (rows, keys, lanes, scatter) = (forced.rows, forced.keys, forced.lanes ?? lanes, forced.scatter)
        }
        guard wg >= lanes else { return nil }   // 128 is a multiple of every subgroup size up to 128
        let t = DecodeTiles(rows: rows, keys: keys, WG: wg, lanes: lanes, scatter: scatter)
        return decodeSharedBytes(Dv: Dv, dtype: dtype, tiles: t) <= sharedMemory - 256 ? t : nil
    }

    /// flex_attention_decode.comp's shared arrays: each subgroup's row maxima and sums, the rows'
    /// P·V (float32, whole 16-byte units) and a NaN flag per row.
    static func decodeSharedBytes(Dv: Int, dtype: DType, tiles t: DecodeTiles) -> Int {
        let unit = dtype.size == 2 ? 8 : 4
        return 2 * (t.WG / t.lanes) * t.rows * 4 + t.rows * ((Dv + unit - 1) / unit * unit) * 4 + t.rows * 4
    }

    /// A backward pass's plan: the portable passes of flex_attention_bwd.comp with their tiles
    /// (``backwardTiles(D:Dv:device:)`` for the dQ and dK/dV passes), the parameter block as push
    /// constants where it fits.
    static func backward(shape s: AttentionShape, pass: Int, tiles t: (BQ: Int, BKV: Int, WG: Int), pushParams: Bool, mods: SplicedMods,
                         capAtomic: Bool) -> AttentionPlan {
        AttentionPlan(pass: .backward(pass), kernel: .portable, dtype: s.dtype, D: s.D, Dv: s.Dv, tiles: .backward(BQ: t.BQ, BKV: t.BKV, WG: t.WG),
                      capAtomic: capAtomic, pushParams: pushParams, mods: mods.glsl.source)
    }

    /// The dQ and dK/dV passes' tiles: query rows and keys staged in shared memory with their
    /// pairs' P and dS, the largest of 16×32, 16×16, 8×16, 8×8, 4×8, 4×4 that fits; 128 invocations
    /// (or the device's most).
    static func backwardTiles(D: Int, Dv: Int, device: Device) -> (BQ: Int, BKV: Int, WG: Int)? {
        let caps = device.capabilities
        for (bq, bkv) in [(16, 32), (16, 16), (8, 16), (8, 8), (4, 8), (4, 4)] {
            let bytes = 4 * (bq * (D + Dv) + bkv * (D + Dv) + 2 * bq * (bkv | 1) + 2 * bq)
            if bytes <= caps.maxSharedMemory - 256 { return (bq, bkv, min(128, caps.maxWorkgroupInvocations)) }
        }
        return nil
    }

    /// Why `coopmat` cannot run this call, or nil when it can.
    static func coopmatProblem(_ s: AttentionShape, device: Device, tuning: AttentionTuning) -> String? {
        let caps = device.capabilities
        if device.cooperativeMatrixAPI == nil { return "\(caps.name) has no VK_NV_cooperative_matrix or VK_KHR_cooperative_matrix" }
        if let problem = shapeProblem(dtype: s.dtype, D: s.D, Dv: s.Dv) { return problem }
        if let problem = nvidiaLayoutProblem(s.dtype, device: device, kernel: "the cooperative-matrix kernel") { return problem }
        if CoopmatTiles(D: s.D, device: device, forced: tuning.coopmatTiles) == nil {
            if let forced = tuning.coopmatTiles {
                return "VKFLEX_COOPMAT_TILES=\(forced) does not fit \(caps.maxSharedMemory) bytes of shared memory at head dim \(s.D)"
            }
            return "not enough shared memory for the cooperative-matrix tiles"
        }
        return nil
    }

    /// Why a kernel written for NVIDIA's fragment layout (coopmat-nv's, the NVIDIA-layout split-KV
    /// kernel) cannot take `dtype` on `device`, or nil: 16-bit matrices the device computes in,
    /// 16×16×16 products into float32, subgroups of 32, and the layout measured on the device
    /// (`CooperativeMatrixLayout.nvidiaMMA`, for bfloat16 too). `kernel` names it in the message.
    static func nvidiaLayoutProblem(_ dtype: DType, device: Device, kernel: String) -> String? {
        let caps = device.capabilities
        if let problem = matrixDTypeProblem(dtype, device: device, kernel: kernel) { return problem }
        let operand = dtype == .bfloat16 ? "bfloat16" : "float16"
        if !device.cooperativeMatrixShapes.contains(where: { $0.m == 16 && $0.n == 16 && $0.k == 16 && $0.a == operand && $0.result == "float32" }) {
            return "\(caps.name) offers no 16x16x16 \(operand) -> float32 cooperative matrix"
        }
        if caps.subgroupSize != 32 { return "\(kernel) needs a subgroup size of 32" }
        guard let layout = CooperativeMatrixLayout.of(device) else { return "the cooperative-matrix layout of \(caps.name) could not be measured" }
        if !layout.matches(CooperativeMatrixLayout.nvidiaMMA) || (dtype == .bfloat16 && layout.bfloat16 != CooperativeMatrixLayout.nvidiaMMA) {
            return "\(caps.name) lays out cooperative-matrix elements in a way \(kernel) is not written for (\(layout.summary))"
        }
        return nil
    }

    /// Why `coopmat` cannot take inputs of this dtype and these head dims, or nil when it can.
    static func shapeProblem(dtype: DType, D: Int, Dv: Int) -> String? {
        if dtype != .float16 && dtype != .bfloat16 { return "the cooperative-matrix kernel takes float16 and bfloat16 inputs (got \(dtype.rawValue))" }
        if D != Dv || D % 16 != 0 || D > 256 {
            return "the cooperative-matrix kernel needs head dim = value dim, a multiple of 16 up to 256 (got \(D)/\(Dv))"
        }
        return nil
    }

    /// The kernel for a call: the call's option, else `VKFLEX_KERNEL` when set, else coopmat-nv
    /// where it applies.
    ///
    /// - Throws: ``FlexError/unsupported(_:)`` when a forced kernel cannot run the call; a malformed `VKFLEX_*` tuning variable.
    /// `notForCoopmat`: what the call asks that the cooperative-matrix kernel does not take
    /// (`qOffset:` — decoding, where its 16-row tiles would run mostly empty — or `pageTable:`);
    /// the portable and split-KV kernels take both.
    static func kernel(_ s: AttentionShape, device: Device, forced: FlexKernel? = nil, notForCoopmat: String? = nil,
                       maxScores: Bool = false) throws -> FlexKernel {
        let decode = decodeProblem(s, device: device, maxScores: maxScores)
        let tuning = try AttentionTuning.of(device)
        let kernel: FlexKernel
        let source: String
        if let forced {
            kernel = forced; source = "kernel: .\(forced)"
        } else if let env = tuning.kernel {
            kernel = env; source = "VKFLEX_KERNEL=\(device.environment["VKFLEX_KERNEL"] ?? env.rawValue)"
            if env == .splitKV, decode != nil { return .portable }
            if notForCoopmat != nil, env == .coopmatNV { return .portable }
        } else {
            // Few query rows (decoding): split-KV, which reads each KV head once per GQA group and
            // spreads the keys over the device (unmeasured on a GPU so far: docs/performance.md).
            if decode == nil { return .splitKV }
            if notForCoopmat != nil { return .portable }
            // The cooperative-matrix kernel wherever it applies: 10-20x the portable one on the H200.
            if coopmatProblem(s, device: device, tuning: tuning) == nil { return .coopmatNV }
            // Any other device with cooperative matrices (AMD, Intel, Mesa): the generic kernel,
            // once it has matched the portable kernel there at these head dims (GenericKernelCheck).
            if device.cooperativeMatrixAPI != nil, genericProblem(s, device: device, tuning: tuning) == nil,
               GenericKernelCheck.passes(D: s.D, Dv: s.Dv, dtype: s.dtype, device: device) {
                return .coopmatGeneric
            }
            return .portable
        }
        if kernel == .splitKV, let decode { throw FlexError.unsupported("\(source): \(decode)") }
        if kernel == .coopmatNV, let what = notForCoopmat { throw FlexError.unsupported("\(source): the cooperative-matrix kernel does not take \(what) (the portable kernel does)") }
        if kernel == .coopmatNV, let problem = coopmatProblem(s, device: device, tuning: tuning) { throw FlexError.unsupported("\(source): \(problem)") }
        if kernel == .coopmatGeneric, let problem = genericProblem(s, device: device, tuning: tuning) { throw FlexError.unsupported("\(source): \(problem)") }
        return kernel
    }

    // The cooperative-matrix flags of a plan, and why. `rawMax`: no score-mod and a
    // positive scale, so the softmax maximum can be taken over raw scores. `exp16`: P evaluated
    // in fp16 — with a score-mod, whose own special functions (tanh) compete with exp2 for the
    // same units (on the H200 soft-cap 107.8 → 114.7 TFLOP/s, ALiBi 130.8 → 134.8; without a
    // score-mod it costs 6%, so it is off there) — and off where the call returns the LSE: fp16
    // P values sum to a row total (and an LSE) off by a few 1e-4, which a backward reading that
    // LSE turned into bias gradients 3-10x PyTorch's RMSE (H100, 2026-12-05). `exactRowSums`: the
    // same reason for the row sums — a product of the fp16 P with ones put the LSE 4e-6 to 3e-5 off
    // (52-509x the error of PyTorch's eager float32 LSE, H200, 2026-12-07, tools/conformance.py
    // --torch), so where the call returns the LSE the lanes add float32 P. spirv-opt (SPIRV-Tools
    // v2023.1) segfaults on some NV cooperative-matrix shaders but survives this one: a test
    // compiles every variant optimized, so a crash would show there, not in a user's process.
    //
    // `narrowK`: Q·Kᵀ as 16×8×16 products (`VKF_K8`), where the device has the shape and its
    // 16×8 layout was measured to be ``CooperativeMatrixLayout/nvidiaMMANarrow`` (H200: causal
    // D=64 +2%, document +3%).
    //
    // `floatIndices`: the score-mod may take its index sums from float indices (`VKF_FLOAT_INDICES`;
    // exact for lengths up to 2^22).
    //
    // `typedOperands`: the kernel runs through `VK_KHR_cooperative_matrix`. Up to D = 64 O is then
    // rescaled only on the steps where a row's maximum moves (`VKF_ALWAYS_RESCALE=0`): H200 suite,
    // TFLOP/s, full 275.7 → 285.9-286.1, causal 255.7 → 268.4-268.9, sliding window 212.0-213.8 →
    // 223.8-224.0, prefix-LM 257.7-258.0 → 269.4-269.5, document 208.6-208.9 → 214.4-214.8,
    // soft-cap 177.2-177.4 → 182.0-182.2, ALiBi 217.8 → 210.8-211.1 (the one loss). Through the
    // NV extension it did not pay.
    /// Tile sizes of the portable kernel that fit the device's shared memory. With fp32 in shared
    /// memory (float32 inputs) first 64 query rows on 256 invocations where that is the
    /// register-tiled path and the BlockMask's query blocks (`queryBlock`, nil without one) are
    /// not smaller (H200, `vkflex bench --b 4 --h 16 --s 4096 --d 64`: full 6.1 → 8.5 TFLOP/s,
    /// causal 8.0 → 8.9 against 32 rows on 128); then, and with fp16 (`half`), 32 rows and fewer
    /// on 128. Shared memory decides how many workgroups share an SM on the H200, and fp16 halves
    /// it: 32 rows on 128 take 16 KiB there, and beat 64 on 256 (27 KiB; full D=64 15.3 against
    /// 12.3 TFLOP/s).
    static func portableTiles(D: Int, Dv: Int, device: Device, half: Bool = false, queryBlock: Int? = nil) -> (BQ: Int, BKV: Int, WG: Int) {
        portableTiles(D: D, Dv: Dv, sharedMemory: device.capabilities.maxSharedMemory,
              maxInvocations: device.capabilities.maxWorkgroupInvocations, half: half, queryBlock: queryBlock)
    }

    static func portableTiles(D: Int, Dv: Int, sharedMemory: Int, maxInvocations: Int, half: Bool = false,
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

    /// Whether a parameter block of `bytes` goes as push constants: where the device takes that
    /// many (the forward's 220 bytes: NVIDIA and most desktop drivers take 256; lavapipe takes
    /// Vulkan's minimum, 128). On the H200 a storage-buffer block was reloaded, bounds-checked, on
    /// every tile (causal D=64 180.9 → 192.1 TFLOP/s as push constants). `VKFLEX_PUSH_PARAMS=0`
    /// turns it off.
    static func pushesParams(_ device: Device, tuning: AttentionTuning, bytes: Int = AttentionParams.byteCount) -> Bool {
        device.capabilities.maxPushConstantsSize >= bytes && tuning.pushParams
    }

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
    init?(D: Int, device: Device, queryBlock: Int? = nil, dense: Bool = false, forced: String?) {
        self.init(D: D, sharedMemory: device.capabilities.maxSharedMemory, queryBlock: queryBlock, dense: dense,
                  typedOperands: device.cooperativeMatrixAPI == .khr, forced: forced)
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
          forced: String? = nil) {
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


extension AttentionPlan {
    /// A cooperative-matrix plan from its parts, without a device (the tests compile every variant
    /// on lavapipe, which cannot run them).
    static func coopmat(D: Int, tiles: CoopmatTiles, rawMax: Bool, exp16: Bool, narrowK: Bool = false, exactRowSums: Bool = false,
                        exactTanh: Bool = false, floatIndices: Bool = true,
                        typedOperands: Bool = false, maxScores: Bool = false, kvLengths: Bool = false, sinks: Bool = false,
                        pushParams: Bool = false, dtype: DType = .float16) -> AttentionPlan {
        AttentionPlan(pass: .forward, kernel: .coopmatNV, dtype: dtype, D: D, Dv: D, tiles: .coopmat(tiles), rawMax: rawMax, exp16: exp16,
                      narrowK: narrowK, exactRowSums: exactRowSums, exactTanh: exactTanh, floatIndices: floatIndices, typedOperands: typedOperands, maxScores: maxScores,
                      kvLengths: kvLengths, sinks: sinks, pushParams: pushParams, mods: "")
    }

    /// A portable plan from its parts, without a device.
    static func portable(D: Int, Dv: Int, BQ: Int, BKV: Int, WG: Int, dtype: DType, maxScores: Bool = false, pushParams: Bool = false) -> AttentionPlan {
        AttentionPlan(pass: .forward, kernel: .portable, dtype: dtype, D: D, Dv: Dv, tiles: .portable(BQ: BQ, BKV: BKV, WG: WG),
                      maxScores: maxScores, pushParams: pushParams, mods: "")
    }
}
