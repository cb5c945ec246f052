import Foundation
import VKFlexVulkan

// The coopmat-generic kernel's part of the plan: its tiles, from the device's enumerated matrix
// shapes, subgroup size and shared memory alone, and why it cannot run a call.

/// Tiles of flex_attention_fwd_generic.comp: the matrix shape (M×N×K, fp16 × fp16 + fp32), the
/// subgroup size it is built for, subgroups per workgroup (each owns M query rows) and keys per
/// step.
struct GenericTiles: Hashable, Sendable, CustomStringConvertible {
    var M: Int, N: Int, K: Int
    var SG: Int, NSG: Int, BKV: Int
    /// The products as scalar loops (no cooperative matrices on the device): the kernel's own code
    /// runs as on a GPU with them, slowly.
    var emulated: Bool
    /// The coopmat-nv backward passes (flex_attention_bwd_nv.comp): the owned rows' operands stay
    /// in shared memory instead of registers (`OWN_SHARED`).
    var ownShared = false
    /// Each step's rows are loaded while the step before computes: the coopmat-nv backward passes'
    /// `PREFETCH`; coopmat-generic's `GEN_PREFETCH` (two K/V buffers).
    var prefetch = false
    /// coopmat-generic's pipeline with one K/V buffer (`GEN_NBUF=1`): the next step's rows wait in
    /// registers for a second barrier instead of going into a second shared buffer.
    var singleBuffer = false
    /// coopmat-generic's softmax on the scores in their accumulators, through an index matrix
    /// (`GEN_REGSM`), the score tile only where a row's maximum moves; else every step's scores go
    /// through the score tile.
    var registerSoftmax = false
    /// The coopmat-nv dK/dV pass in two dispatches, dV then dK (`DKV`), and which half a pipeline
    /// is (0: both in one).
    var splitDKV = false, dkvHalf = 0
    /// Row blocks of M rows each subgroup owns: the coopmat-nv backward passes' `RPW`,
    /// coopmat-generic's forward's `GEN_RPW` (its register softmax, or emulated).
    var rpw = 1
    /// Split-KV decoding on NVIDIA's layout (flex_attention_decode_nv.comp): K and V loaded
    /// straight into matrices, the softmax in registers; `prefetch` its `DEC_PREFETCH`.
    var nvDecode = false
    /// The NVIDIA-layout split-KV kernel's K and V loaded word by word into the registers of the
    /// matrices (`DEC_REGLOAD`), and the next step's as this one's are consumed (`DEC_PREFETCH=2`).
    var nvRegisters = false, nvRotate = false
    /// `DEC_KLINES` (`VKFLEX_DECODE_KLINES=1`): K's words loaded eight lanes a row, then shuffled.
    var nvKLines = false
    /// Its step loop left to the driver to unroll (`DEC_DONT_UNROLL=0`).
    var nvDriverUnroll = false
    /// Its 16-key chunks a step (`DEC_CHUNKS`), and with two, whether the device's B operand has
    /// the transposed layout (``CooperativeMatrixLayout/nvidiaMMAB``, `DEC_B_T`; else
    /// ``CooperativeMatrixLayout/nvidiaMMA``), which the planner measures for that case only.
    var nvChunks = 1, nvBTransposed = false
    /// coopmat-generic's matrix code with software matrices in a scrambled element order
    /// (`VKF_MM_SOFT`, flex_mm.glsl), on a device without cooperative matrices: the code path a GPU
    /// runs (register softmax, row blocks, pipeline, the backward's matrix passes), tested where no
    /// element order is given.
    var soft = false

    var BQ: Int { M * NSG * rpw }
    var WG: Int { SG * NSG }

    /// Mirrors the shared arrays of flex_attention_fwd_generic.comp: K and V tiles (two of each
    /// with `prefetch`) and P (fp16, rows padded by 8), the score tile (fp32, rows of BKV + 4; O
    /// crosses it a fragment at a time), and in emulation Q (and, for bfloat16, P as float32:
    /// flex_mm.glsl's HALF_T).
    static func sharedBytes(D: Int, Dv: Int, M: Int, NSG: Int, BKV: Int, emulated: Bool, bf16: Bool = false, prefetch: Bool = false,
                            singleBuffer: Bool = false, rpw: Int = 1) -> Int {
        let bq = M * NSG * rpw
        let halves = (prefetch && !singleBuffer ? 2 : 1) * (BKV * (D + 8) + BKV * (Dv + 8)) + (emulated ? bq * (D + 8) : 0)   // units of 8 halves for K, V, Q
        return 2 * halves + (emulated && bf16 ? 4 : 2) * bq * (BKV + 8) + 4 * bq * (BKV + 4)
    }

    var description: String { "\(M)x\(N)x\(K) sg\(SG) \(NSG)x\(BKV)" + (emulated ? " emulated" : "") + (ownShared ? " owned in shared" : "") + (prefetch ? singleBuffer ? " prefetch, one buffer" : " prefetch" : "") + (registerSoftmax ? " register softmax" : "") + (splitDKV ? " dK/dV split" : "") + (rpw > 1 ? " \(rpw) row blocks a subgroup" : "") + (nvDecode ? " nvidia layout" : "") + (nvRegisters ? " register loads" : "") + (nvRotate ? " rotating" : "") + (nvChunks > 1 ? " \(nvChunks) chunks a step" : "") + (nvKLines ? " K by lines" : "") + (soft ? " software matrices" : "") }
}

extension AttentionPlanner {
    /// The shape a scalar emulation of the generic kernel computes in (any will do; this one is the
    /// shape AMD and NVIDIA list).
    static let emulatedShape = CooperativeMatrixShape(m: 16, n: 16, k: 16, a: "float16", b: "float16", c: "float32", result: "float32")
    /// The shapes software matrices (`VKFLEX_GENERIC_MATRICES=software`) offer: AMD's and NVIDIA's
    /// 16×16×16 first, then Intel's (8×16×16 on Xe2, 8×8×16 on Arc) and NVIDIA's 16×8×16, each
    /// forced with `VKFLEX_COOPMAT_SHAPE`.
    static let softShapes = [(16, 16, 16), (8, 16, 16), (8, 8, 16), (16, 8, 16)].map {
        CooperativeMatrixShape(m: $0.0, n: $0.1, k: $0.2, a: "float16", b: "float16", c: "float32", result: "float32")
    }

    /// The coopmat-generic kernel's tiles for head dims D/Dv on a device described by its subgroup
    /// size, its matrix shapes (`VkCooperativeMatrixPropertiesKHR`), shared memory and
    /// invocations; nil when none fits. `bf16`: bfloat16 operands (shapes of bfloat16 A and B).
    ///
    /// Shapes: those of fp16 (bf16) A and B with fp32 C and result whose K divides D and whose N divides
    /// Dv, the larger M·N·K first (16×16×16 on AMD and NVIDIA; Intel lists 8×16×16 on Xe2 and
    /// 8×8×16 on Arc), `forcedShape` alone when given. Then four subgroups where they fit (each
    /// owns M query rows), else two, else one (eight where M = 8, to keep 32+ rows a workgroup);
    /// one K/V buffer (the software pipeline, `prefetch`, only when forced) and 16 keys a step
    /// (32 in emulation), else the other (rounded up to what M, N and K divide): the smallest
    /// shared memory, so that several workgroups share a compute unit. `forced`
    /// (`VKFLEX_GENERIC_TILES`) fixes subgroups, keys and pipeline. Measured on NVIDIA only
    /// (docs/performance.md): a first choice, not a tuned one.
    static func genericTiles(D: Int, Dv: Int, subgroupSize sg: Int, shapes: [CooperativeMatrixShape], sharedMemory: Int,
                             maxInvocations: Int, forcedShape: (m: Int, n: Int, k: Int)? = nil, emulated: Bool = false,
                             bf16: Bool = false, forced: (nsg: Int, bkv: Int, prefetch: Bool, singleBuffer: Bool, rpw: Int)? = nil,
                             soft: Bool = false) -> GenericTiles? {
        guard sg > 0, sg & (sg - 1) == 0 else { return nil }   // lanes share rows in power-of-two clusters
        let budget = sharedMemory - 256
        // Software matrices: each lane holds M·N / SG elements of C (and of A and B), in pairs.
        for shape in usableShapes(shapes, emulated: emulated, forced: forcedShape, bf16: bf16, where: { D % $0.k == 0 && Dv % $0.n == 0 })
        where !soft || softShapeFits(shape, subgroupSize: sg) {
            // A row's columns, and each fragment of O's (N of them: O crosses the score tile a
            // fragment at a time), split evenly over the lanes that share the row.
            let rpw = forced?.rpw ?? 1
            let tpr = max(1, sg / (shape.m * rpw))
            guard Dv % tpr == 0, shape.n % tpr == 0 else { continue }
            let step = lcm(lcm(shape.m, shape.n), shape.k)
            let groups = forced.map { [$0.nsg] } ?? (shape.m <= 8 ? [8, 4, 2, 1] : [4, 2, 1])
            for nsg in groups where nsg * sg <= maxInvocations {
                // An SM of an H100 holds its workgroups' shared memory in ~48 KiB: 4x16 without
                // the pipeline's second buffer (12.5 KiB at D = 64, three workgroups an SM) beat
                // 4x32 with it (32 KiB, one) on 7 of 8 seed cases, causal 33.9 -> 50.4 TFLOP/s
                // (VKFLEX_RESIDENCY, docs/performance.md). Emulation keeps 32 keys (fewer steps).
                for prefetch in forced.map({ [$0.prefetch] }) ?? [false] {
                    for want in forced.map({ [$0.bkv] }) ?? (emulated ? [32, 16] : [16, 32]) {
                        let bkv = (want + step - 1) / step * step
                        guard bkv % tpr == 0, forced == nil || bkv == want,
                              GenericTiles.sharedBytes(D: D, Dv: Dv, M: shape.m, NSG: nsg, BKV: bkv, emulated: emulated, bf16: bf16, prefetch: prefetch,
                                                       singleBuffer: forced?.singleBuffer ?? false, rpw: rpw)
                                + (soft ? softScratchBytes(shape, subgroups: nsg) : 0) <= budget
                        else { continue }
                        var t = GenericTiles(M: shape.m, N: shape.n, K: shape.k, SG: sg, NSG: nsg, BKV: bkv, emulated: emulated, prefetch: prefetch)
                        t.singleBuffer = prefetch && (forced?.singleBuffer ?? false)
                        t.rpw = rpw
                        t.soft = soft
                        return t
                    }
                }
            }
        }
        return nil
    }

    /// The shapes the generic kernels compute in, best first: fp16 (`bf16`: bfloat16) A and B,
    /// fp32 C and result, M a power of two, N and K whole 16-byte units, `fits` (the head dims
    /// they divide), `forced` alone when given; the largest M·N·K first.
    private static func usableShapes(_ shapes: [CooperativeMatrixShape], emulated: Bool, forced: (m: Int, n: Int, k: Int)?, bf16: Bool,
                                     where fits: (CooperativeMatrixShape) -> Bool) -> [CooperativeMatrixShape] {
        let operand = bf16 ? "bfloat16" : "float16"
        return (emulated ? [emulatedShape] : shapes).filter { s in
            (emulated || s.a == operand && s.b == operand) && s.c == "float32" && s.result == "float32"
                && s.m > 0 && s.m & (s.m - 1) == 0 && s.k % 8 == 0 && s.n % 8 == 0 && fits(s)
                && (forced.map { f in f.m == s.m && f.n == s.n && f.k == s.k } ?? true)
        }.sorted { ($0.m * $0.n * $0.k, $0.m) > ($1.m * $1.n * $1.k, $1.m) }
    }

    /// The generic kernel's tiles on `device` (emulated where it has no cooperative matrices), with
    /// `VKFLEX_COOPMAT_SHAPE` applied.
    static func genericTiles(D: Int, Dv: Int, dtype: DType, device: Device, tuning: AttentionTuning) -> GenericTiles? {
        let caps = device.capabilities
        let soft = softMatrices(device, tuning)
        if soft && dtype != .float16 { return nil }   // genericProblem says why
        var t = genericTiles(D: D, Dv: Dv, subgroupSize: caps.subgroupSize, shapes: soft ? softShapes : device.cooperativeMatrixShapes,
                             sharedMemory: caps.maxSharedMemory, maxInvocations: caps.maxWorkgroupInvocations,
                             forcedShape: tuning.coopmatShape, emulated: device.cooperativeMatrixAPI == nil && !soft, bf16: dtype == .bfloat16,
                             forced: tuning.genericTiles, soft: soft)
        // Emulated there are no accumulators: the products are loops over the score tile.
        if let e = t?.emulated, !e { t?.registerSoftmax = tuning.genericRegisterSoftmax ?? genericRegisterSoftmaxByDefault }
        // Row blocks past the first need the register softmax where the products are matrices
        // (the shared softmax's O round trip takes one block): genericProblem says so.
        if let t, !t.emulated, t.rpw > 1, !t.registerSoftmax { return nil }
        return t
    }

    /// Whether coopmat-generic takes the register softmax (`GEN_REGSM`) unless
    /// `VKFLEX_GENERIC_SOFTMAX` says. H100, 2026-12-06 (seed suite, TFLOP/s, registers against
    /// shared): full D=64 53.1 / 50.1, D=128 51.4 / 49.3, causal D=64 54.4 / 49.7, D=128 54.9 /
    /// 49.5; its selftests passed through both extensions.
    static let genericRegisterSoftmaxByDefault = true

    /// Why a cooperative-matrix kernel (`kernel`, for the message) cannot take `dtype` on `device`
    /// (float16 needs fp16 arithmetic; bfloat16 needs bfloat16 cooperative matrices, unless the
    /// products are emulated), or nil.
    static func matrixDTypeProblem(_ dtype: DType, device: Device, kernel: String) -> String? {
        let caps = device.capabilities
        switch dtype {
        case .float16:
            return device.enabledFeatures.shaderFloat16 ? nil : "\(caps.name) has no float16 arithmetic (shaderFloat16)"
        case .bfloat16:
            if device.cooperativeMatrixAPI == nil || device.enabledFeatures.bfloat16CooperativeMatrix { return nil }
            if caps.bfloat16CooperativeMatrix {
                return "bfloat16 cooperative matrices are off on \(caps.name) (VKFLEX_BF16_COOPMAT=0, or a validation layer older than 1.4.321 is loaded)"
            }
            return "\(caps.name) has no bfloat16 cooperative matrices (VK_KHR_shader_bfloat16 with KHR cooperative matrices)"
        default:
            return "\(kernel): float16 and bfloat16 inputs only (got \(dtype.rawValue))"
        }
    }

    /// What `VKFLEX_COOPMAT_SHAPE` or the device's shapes lack for a call no tiles fit.
    private static func noShapeProblem(_ s: AttentionShape, device: Device, tuning: AttentionTuning, what: String) -> String {
        let caps = device.capabilities
        let operand = s.dtype == .bfloat16 ? "bfloat16" : "float16"
        if let f = tuning.coopmatShape, device.cooperativeMatrixAPI != nil,
           !device.cooperativeMatrixShapes.contains(where: { $0.m == f.m && $0.n == f.n && $0.k == f.k && $0.a == operand && $0.result == "float32" }) {
            return "VKFLEX_COOPMAT_SHAPE=\(f.m)x\(f.n)x\(f.k) is not a \(operand) -> float32 shape \(caps.name) lists (\(device.cooperativeMatrixShapes.map(\.description).joined(separator: ", ")))"
        }
        return "no \(operand) -> float32 cooperative-matrix shape of \(caps.name) divides head dims \(s.D)/\(s.Dv) with \(what) that fit \(caps.maxSharedMemory) bytes of shared memory"
    }

    /// Why coopmat-generic cannot run this call on `device`, or nil when it can.
    static func genericProblem(_ s: AttentionShape, device: Device, tuning: AttentionTuning) -> String? {
        let caps = device.capabilities
        if let problem = matrixDTypeProblem(s.dtype, device: device, kernel: "coopmat-generic") { return problem }
        if caps.subgroupSize & (caps.subgroupSize - 1) != 0 { return "coopmat-generic needs a power-of-two subgroup size (\(caps.name): \(caps.subgroupSize))" }
        guard let t = genericTiles(D: s.D, Dv: s.Dv, dtype: s.dtype, device: device, tuning: tuning) else {
            if softMatrices(device, tuning), s.dtype != .float16 { return softDTypeProblem(s.dtype) }
            if let f = tuning.genericTiles, f.rpw > 1, tuning.genericRegisterSoftmax == false, device.cooperativeMatrixAPI != nil {
                return "VKFLEX_GENERIC_TILES=\(device.environment["VKFLEX_GENERIC_TILES"] ?? ""): \(f.rpw) row blocks a subgroup take the register softmax, not VKFLEX_GENERIC_SOFTMAX=shared"
            }
            if let f = tuning.genericTiles, genericTiles(D: s.D, Dv: s.Dv, dtype: s.dtype, device: device, tuning: AttentionTuning(coopmatShape: tuning.coopmatShape)) != nil {
                return "VKFLEX_GENERIC_TILES=\(device.environment["VKFLEX_GENERIC_TILES"] ?? "\(f.nsg)x\(f.bkv)"): \(f.nsg) subgroups of \(caps.subgroupSize) lanes with \(f.bkv) keys a step do not fit \(caps.name) (\(caps.maxSharedMemory) bytes of shared memory, \(caps.maxWorkgroupInvocations) invocations) at head dims \(s.D)/\(s.Dv), or the keys are not a multiple of the matrix shape's sides"
            }
            return noShapeProblem(s, device: device, tuning: tuning, what: "tiles")
        }
        if t.SG > t.M, !caps.subgroupOperations.contains("clustered") {
            return "\(caps.name) has no clustered subgroup operations, which coopmat-generic's row reductions use"
        }
        if !t.emulated, !caps.subgroupOperations.contains("vote") {
            return "\(caps.name) has no subgroup vote operations, which coopmat-generic's lazy rescaling uses"
        }
        return nil
    }

    // MARK: Split-KV decoding through matrices (flex_attention_decode_mm.comp)

    /// The split-KV matrix kernel's tiles: one subgroup of `sg` lanes a workgroup, M rows (the
    /// shape's M), keys a step 32 else 16 (16 where emulated; rounded up to what M, N and K divide, and at least M:
    /// Q passes through the K tile), the largest shape first (as ``genericTiles(D:Dv:subgroupSize:shapes:sharedMemory:maxInvocations:forcedShape:emulated:bf16:)``);
    /// nil when none fits. Shared memory as the generic forward's with one subgroup.
    static func decodeMMTiles(D: Int, Dv: Int, subgroupSize sg: Int, shapes: [CooperativeMatrixShape], sharedMemory: Int,
                              maxInvocations: Int, forcedShape: (m: Int, n: Int, k: Int)? = nil, emulated: Bool = false,
                              bf16: Bool = false, keys: Int? = nil, subgroups: Int = 1, prefetch: Bool = false) -> GenericTiles? {
        guard sg > 0, sg & (sg - 1) == 0, subgroups >= 1, sg * subgroups <= maxInvocations else { return nil }
        for shape in usableShapes(shapes, emulated: emulated, forced: forcedShape, bf16: bf16, where: { D % $0.k == 0 && Dv % $0.n == 0 }) {
            // A row's columns, and each fragment of O's (N of them: O crosses the score tile a
            // fragment at a time), split evenly over the lanes that share the row.
            let tpr = max(1, sg / shape.m)
            guard Dv % tpr == 0, shape.n % tpr == 0 else { continue }
            let step = lcm(lcm(shape.m, shape.n), shape.k)
            // Emulated (lavapipe), 16 keys a step: the softmax's unrolled loop over a lane's columns
            // inlines the mods once per column, and compiling that took 4.5-11 s a variant at 32.
            for want in keys.map { [$0] } ?? (emulated ? [16] : [32, 16]) {
                let bkv = (max(want, shape.m) + step - 1) / step * step
                guard bkv % tpr == 0 else { continue }
                // Each subgroup has tiles of its own (it walks a split of its own).
                if subgroups * GenericTiles.sharedBytes(D: D, Dv: Dv, M: shape.m, NSG: 1, BKV: bkv, emulated: emulated, bf16: bf16) <= sharedMemory - 256 {
                    return GenericTiles(M: shape.m, N: shape.n, K: shape.k, SG: sg, NSG: subgroups, BKV: bkv, emulated: emulated, prefetch: prefetch)
                }
            }
        }
        return nil
    }

    static func decodeMMTiles(_ s: AttentionShape, device: Device, tuning: AttentionTuning) -> GenericTiles? {
        let caps = device.capabilities
        return decodeMMTiles(D: s.D, Dv: s.Dv, subgroupSize: caps.subgroupSize, shapes: device.cooperativeMatrixShapes,
                             sharedMemory: caps.maxSharedMemory, maxInvocations: caps.maxWorkgroupInvocations,
                             forcedShape: tuning.coopmatShape, emulated: device.cooperativeMatrixAPI == nil, bf16: s.dtype == .bfloat16,
                             keys: tuning.decodeMMKeys, subgroups: tuning.decodeMMSubgroups ?? 1, prefetch: tuning.decodeMMPrefetch)
    }

    /// Why the split-KV matrix kernel cannot run this call on `device` (beyond what every split-KV
    /// call needs), or nil when it can.
    static func decodeMMProblem(_ s: AttentionShape, device: Device) -> String? {
        let caps = device.capabilities
        let tuning = (try? AttentionTuning.of(device)) ?? AttentionTuning()
        if let problem = matrixDTypeProblem(s.dtype, device: device, kernel: "the split-KV matrix kernel") { return problem }
        if caps.subgroupSize & (caps.subgroupSize - 1) != 0 { return "it needs a power-of-two subgroup size (\(caps.name): \(caps.subgroupSize))" }
        guard let t = decodeMMTiles(s, device: device, tuning: tuning) else { return noShapeProblem(s, device: device, tuning: tuning, what: "tiles") }
        if t.SG > t.M, !caps.subgroupOperations.contains("clustered") { return "\(caps.name) has no clustered subgroup operations, which its row reductions use" }
        if !t.emulated, !caps.subgroupOperations.contains("vote") { return "\(caps.name) has no subgroup vote operations, which its lazy rescaling uses" }
        return nil
    }

    // MARK: Split-KV decoding on NVIDIA's layout (flex_attention_decode_nv.comp)

    /// The NVIDIA-layout split-KV kernel's tiles: 16 rows and 16 keys a chunk, `chunks` chunks a
    /// step (default `VKFLEX_DECODE_TILE`'s), one subgroup of 32 (or `VKFLEX_DECODE_TILE=nvxS`'s S,
    /// each walking a split of its own); with one chunk the next step's K and V loaded while one
    /// computes (`nvs`: not), with two both chunks' loads issued at the step's start instead.
    static func decodeNVTiles(_ tuning: AttentionTuning, chunks: Int? = nil) -> GenericTiles {
        let chunks = chunks ?? tuning.decodeNVChunks
        var t = GenericTiles(M: 16, N: 16, K: 16, SG: 32, NSG: tuning.decodeNV?.nsg ?? 1, BKV: 16, emulated: false,
                             prefetch: tuning.decodeNV?.prefetch ?? (chunks == 1))
        t.nvDecode = true
        t.nvRegisters = tuning.decodeNV?.registers ?? false
        t.nvRotate = tuning.decodeNV?.rotate ?? false
        t.nvDriverUnroll = tuning.decodeDriverUnroll ?? false
        t.nvChunks = chunks
        t.nvKLines = tuning.decodeKLines
        return t
    }

    /// Why the NVIDIA-layout split-KV kernel cannot run this call on `device`, or nil: the
    /// coopmat-nv conditions (NVIDIA's measured layout, subgroups of 32, 16×16×16 float16 or
    /// bfloat16 matrices), head dims multiples of 16 up to 128 (Q, O and two steps of K and V live
    /// in registers), and the inputs' layout the host found (``decodeNVInputs``). With `registers`
    /// (`DEC_REGLOAD`) also B operands in the layout that kernel writes them in
    /// (``CooperativeMatrixLayout/nvidiaMMAB``).
    static func decodeNVProblem(_ s: AttentionShape, device: Device, registers: Bool = false, chunks: Int = 1) -> String? {
        let caps = device.capabilities
        guard let inputs = decodeNVInputs else { return "the NVIDIA-layout split-KV kernel needs K and V rows it may read 16 at a time" }
        if let problem = inputs.problem { return problem }
        if device.cooperativeMatrixAPI == nil { return "\(caps.name) has no VK_NV_cooperative_matrix or VK_KHR_cooperative_matrix" }
        if s.dtype != .float16 && s.dtype != .bfloat16 { return "the NVIDIA-layout split-KV kernel takes float16 and bfloat16 inputs" }
        if s.D % 16 != 0 || s.Dv % 16 != 0 || s.D > 128 || s.Dv > 128 {
            return "the NVIDIA-layout split-KV kernel takes head dims that are multiples of 16 up to 128 (got \(s.D)/\(s.Dv))"
        }
        if let problem = nvidiaLayoutProblem(s.dtype, device: device, kernel: "the NVIDIA-layout split-KV kernel") { return problem }
        // Words become 16-bit floats by a bitcast, which SPIR-V's bfloat16 may not go through.
        if registers && s.dtype != .float16 { return "the word-by-word loads (VKFLEX_DECODE_TILE=nvr) take float16 inputs" }
        if chunks > 1, let layout = CooperativeMatrixLayout.of(device),
           ![CooperativeMatrixLayout.nvidiaMMA, CooperativeMatrixLayout.nvidiaMMAB].contains(s.dtype == .bfloat16 ? layout.bfloat16B : layout.float16B) {
            return "\(device.capabilities.name) lays out B operands in a way two chunks a step (VKFLEX_DECODE_TILE=nv2) are not written for"
        }
        if registers, let layout = CooperativeMatrixLayout.of(device),
           layout.float16B != CooperativeMatrixLayout.nvidiaMMAB {
            return "\(device.capabilities.name) lays out B operands in a way the word-by-word loads (VKFLEX_DECODE_TILE=nvr) are not written for"
        }
        return nil
    }

    /// What the host found of a split-KV call's K and V for the NVIDIA-layout kernel: nil problem
    /// when every 16-key step it walks lies in memory it may read with 16-byte matrix loads.
    struct DecodeNVInputs: Sendable { var problem: String? }

    /// Set by the forward for the duration of planning a split-KV call (``decodeNVInputs(k:v:Lkv:kvBlockSize:pageSize:)``).
    @TaskLocal static var decodeNVInputs: DecodeNVInputs?

    /// Whether K and V allow the NVIDIA-layout kernel's 16-row matrix loads: rows contiguous (unit
    /// inner stride) and 8-aligned, KV blocks of a multiple of 16 keys (a step never crosses one),
    /// and 16-key steps that stay inside memory the call owns — a cache of a multiple of 16 rows,
    /// or pages of a multiple of 16 keys.
    static func decodeNVInputs(k: Tensor, v: Tensor, Lkv: Int, kvBlockSize: Int?, pageSize: Int?) -> DecodeNVInputs {
        for t in [k, v] where t.strides[3] != 1 || t.byteOffset % 16 != 0 || !t.strides[0..<3].allSatisfy({ $0 % 8 == 0 }) {
            return DecodeNVInputs(problem: "\(t.name)'s rows are not contiguous and 16-byte aligned")
        }
        if let bs = kvBlockSize, bs % 16 != 0 { return DecodeNVInputs(problem: "KV blocks of \(bs) keys (a multiple of 16 needed)") }
        if let ps = pageSize {
            if ps % 16 != 0 { return DecodeNVInputs(problem: "pages of \(ps) keys (a multiple of 16 needed)") }
        } else if Lkv % 16 != 0 {
            return DecodeNVInputs(problem: "a cache of \(Lkv) keys (a multiple of 16 needed)")
        }
        return DecodeNVInputs(problem: nil)
    }

    /// Whether the planner takes the NVIDIA-layout split-KV kernel by itself (where
    /// ``decodeNVProblem(_:device:)`` finds nothing against it): for 8 or more rows (query heads ×
    /// query rows) per KV head — speculative decoding, multi-query attention. (With `nvrh`'s word
    /// loads, 2026-12-06 22:05, `decode_dense_4k` took 62.5 µs of kernel against the scalar
    /// kernel's 62.1 at 21:43 on the same machine start: still no gain for 4 rows.) On an H100
    /// (2026-12-06 16:21, `VKFLEX_DECODE_TILE=t vkflex bench --suite decode --no-check`, µs
    /// contiguous / paged) it ran `specdec_4_of_8k` (4 heads × 4 rows a KV head) in 180.1 / 173.6
    /// against the scalar kernel's 539.4 / 581.4 and `decode_mqa_32k` (16 heads × 1 row) in
    /// 184.7 / 180.4 against 204.9 / 220.2, but `decode_dense_4k` (4 heads × 1 row) in 100.5
    /// against 68.4: with 4 rows of its 16 the matrix kernel loses.
    static func decodeNVByDefault(_ s: AttentionShape) -> Bool {
        s.Hq / max(1, s.Hkv) * s.Lq >= 8
    }

    /// The key splits a split-KV call asks for, before ``decodeSplits(wanted:kvBlocks:partialBytesPerSplit:subgroups:)``
    /// caps them, for `workgroups` (batch, KV head, row chunk) workgroups of `workgroupSize`
    /// invocations with `subgroups` splits each.
    ///
    /// The NVIDIA-layout kernel (`nvidiaLayout`) takes one wave: as many splits as
    /// ``decodeNVResidentPerComputeUnit`` subgroups a compute unit hold, never more — a few
    /// workgroups past a wave run as a second one. H100, 2026-12-06 (`VKFLEX_DECODE_SPLITS`,
    /// `nv2`, µs contiguous): `specdec_4_of_8k` 148.2 at 16 splits (1,024 subgroups), 209.7 at
    /// 24, 167.9 at the 32 the four-wave rule below gave; `decode_mqa_32k` 106.0 at 132 (1,056),
    /// 107.5 at 66, 163.6 at 256 — its merge of 256 splits alone took 65 µs.
    /// The others: one wave too, of ``decodeResidentPerComputeUnit`` workgroups of 128 invocations
    /// a compute unit (as many subgroups in smaller workgroups), rounded down where the rule
    /// before rounded up: `decode_dense_32k`'s 64 workgroups took 9 splits, 576 workgroups where an
    /// H100 holds 528, and ran at 1.84 TB/s (583 µs) where `decode_long_128k`'s 528 ran at 2.57
    /// (docs/performance.md, sixteenth session); now 8. `waves` (`VKFLEX_DECODE_WAVES`) sets the
    /// older rule for every kernel: about `waves` workgroups of 128 invocations a compute unit,
    /// rounded up.
    ///
    /// With `kvBlocks` (the key blocks a row's splits share), the NVIDIA-layout kernel takes half a
    /// wave where a whole one would give each split fewer than ``decodeNVMinBlocksPerSplit``
    /// blocks: an SM got through the same bytes a microsecond with four subgroups as with eight,
    /// so the half wave saves each split's fixed cost (Q, the walk's start, its partial) and half
    /// the merge (H100, `decode_mqa_32k`, `nvrh`, kernel + merge µs: 73.9 + 6.6 at 66 splits of 4
    /// blocks, 76.3 + 7.2 at 99, 83.8 + 7.8 at the wave's 132 of 2; docs/performance.md,
    /// twenty-fifth session). Speculative decoding's 16 splits walk 4 blocks each and stay.
    static func decodeWantedSplits(workgroups: Int, computeUnits: Int, workgroupSize: Int, subgroups: Int,
                                   nvidiaLayout: Bool, waves: Int?, kvBlocks: Int? = nil) -> Int {
        let perWave = max(1, 128 / workgroupSize)
        guard let waves else {
            let resident = nvidiaLayout ? decodeNVResidentPerComputeUnit : decodeResidentPerComputeUnit * perWave
            let wave = max(1, resident * computeUnits / max(1, workgroups))
            if nvidiaLayout, let kvBlocks, wave > 1, (kvBlocks + wave - 1) / wave < decodeNVMinBlocksPerSplit {
                return (wave + 1) / 2
            }
            return wave * (nvidiaLayout ? 1 : subgroups)
        }
        return (waves * perWave * computeUnits + workgroups - 1) / workgroups * subgroups
    }

    /// Key blocks below which a split of the NVIDIA-layout kernel's full wave is too short to pay
    /// for itself (``decodeWantedSplits(workgroups:computeUnits:workgroupSize:subgroups:nvidiaLayout:waves:kvBlocks:)``).
    static let decodeNVMinBlocksPerSplit = 4

    /// Workgroups of 128 invocations of the scalar split-KV kernel a compute unit runs at once: its
    /// 128 registers a lane fill an NVIDIA SM's 65,536 with four (the residency probe counted 3.1-3.7
    /// on an H100, time-weighted, docs/performance.md).
    static let decodeResidentPerComputeUnit = 4

    /// One-subgroup workgroups of the NVIDIA-layout split-KV kernel an SM runs at once: its 242-255
    /// registers a lane leave room for eight subgroups in an SM's 65,536 (the residency probe
    /// counted 7.4-7.9 on an H100, docs/performance.md). `nvrh`'s 196 would leave room for ten,
    /// but ten a compute unit ran slower (H100, 2026-12-06: `specdec_4_of_8k` 166.0 µs of kernel at
    /// 20 splits, 1,280 subgroups, against 127.2 at 16), so eight it is for every variant.
    static let decodeNVResidentPerComputeUnit = 8

    /// A split-KV call's key splits: `wanted` (``decodeWantedSplits(workgroups:computeUnits:workgroupSize:subgroups:nvidiaLayout:waves:kvBlocks:)``),
    /// at most one per KV block, whole workgroups of `subgroups` splits, and few enough that the
    /// partials (`partialBytesPerSplit` each) stay within the buffers the device pools: a larger
    /// scratch is a new allocation per call (``Device/maxPooledBufferBytes``).
    static func decodeSplits(wanted: Int, kvBlocks: Int, partialBytesPerSplit: Int, subgroups: Int) -> Int {
        let pooled = Device.maxPooledBufferBytes / max(1, partialBytesPerSplit) / subgroups * subgroups
        return max(1, min(kvBlocks, wanted, max(subgroups, pooled)))
    }

    /// Off until a GPU run measures the matrix kernel faster than the scalar one on its cases. Its
    /// first run (H100, 2026-12-06) was 4x slower — `specdec_4_of_8k` 2.28 against 0.55 ms — because
    /// its staging stored each K/V unit right after loading it (one memory latency per unit);
    /// with staging in rounds (`MM_STAGE`) it was still 1.7-2.2x slower (0.93 against 0.55 ms,
    /// `decode_mqa_32k` 0.46 against 0.21: the same GPU, later that day), and its time did not
    /// fall with more workgroups a compute unit (docs/performance.md, eleventh session).
    /// `VKFLEX_DECODE_TILE=mm` runs it meanwhile.
    static let decodeMMMeasuredFaster = false

    /// Whether split-KV decoding takes the matrix kernel by itself: on a device with cooperative
    /// matrices (never emulated: on a CPU device the scalar kernel is the fast one), for 16-bit
    /// inputs with at least 8 rows per KV head (query heads of a group × query rows: speculative
    /// decoding — the scalar kernel's arithmetic grows with its rows, and a 16-row tile of it runs
    /// out of registers: docs/performance.md), where its tiles fit, and after its first-call check
    /// against the scalar kernel (``GenericKernelCheck/decodePasses(D:Dv:dtype:device:)``) on every
    /// device — NVIDIA's included — and only once ``decodeMMMeasuredFaster`` says so.
    static func decodeMMByDefault(_ s: AttentionShape, device: Device, tuning: AttentionTuning) -> Bool {
        guard decodeMMMeasuredFaster, device.cooperativeMatrixAPI != nil, s.Hq / s.Hkv * s.Lq >= 8,
              decodeMMProblem(s, device: device) == nil else { return false }
        return GenericKernelCheck.decodePasses(D: s.D, Dv: s.Dv, dtype: s.dtype, device: device)
    }

    // MARK: The backward's matrix passes (flex_attention_bwd_mm.comp)

    /// Shared memory of flex_attention_bwd_mm.comp: the staged side's two operands (and in
    /// emulation the owned side's), the S / gradient tile (at least D and Dv wide), dP, the fp16
    /// dS and P tiles (float32 in a bfloat16 emulation), the staged rows' LSE and Δ (and in
    /// emulation the gradients).
    static func backwardMMSharedBytes(D: Int, Dv: Int, T: Int, emulated: Bool, bf16: Bool = false) -> Int {
        let units = T * (D / 8 + 1) + T * (Dv / 8 + 1)
        return 16 * units * (emulated ? 2 : 1) + 4 * T * (max(T, D, Dv) + 4) + 4 * T * (T + 4) + (emulated && bf16 ? 4 : 2) * 2 * T * (T + 8) + 8 * T
            + (emulated ? 4 * T * (D + Dv) : 0)
    }

    /// Whether the generic matrix kernels run on software matrices: asked for
    /// (`VKFLEX_GENERIC_MATRICES=software`) on a device without cooperative matrices.
    static func softMatrices(_ device: Device, _ tuning: AttentionTuning) -> Bool {
        tuning.genericSoftMatrices && device.cooperativeMatrixAPI == nil
    }

    static func softDTypeProblem(_ dtype: DType) -> String {
        "VKFLEX_GENERIC_MATRICES=software: software matrices take float16 inputs only (got \(dtype.rawValue))"
    }

    /// Shared memory of software matrices' products (flex_mm.glsl's scratch): an A and a B a subgroup.
    static func softScratchBytes(_ shape: CooperativeMatrixShape, subgroups: Int) -> Int {
        4 * subgroups * (shape.m * shape.k + shape.k * shape.n)
    }

    /// Whether a lane's share of each matrix of `shape` is whole pairs of elements, as software
    /// matrices take them (flex_mm.glsl's `SOFT_CH`).
    static func softShapeFits(_ shape: CooperativeMatrixShape, subgroupSize sg: Int) -> Bool {
        [shape.m * shape.n, shape.m * shape.k, shape.k * shape.n].allSatisfy { $0 % (ForwardKernel.softChunk * sg) == 0 }
    }

    /// The backward matrix passes' tiles: T = M·NSG rows owned per workgroup and staged per step
    /// (query rows and keys alike, so both passes share the portable passes' tile bookkeeping),
    /// four subgroups where they fit, else two, else one; the shapes as for the forward.
    static func backwardMMTiles(D: Int, Dv: Int, subgroupSize sg: Int, shapes: [CooperativeMatrixShape], sharedMemory: Int,
                                maxInvocations: Int, forcedShape: (m: Int, n: Int, k: Int)? = nil, emulated: Bool = false,
                                bf16: Bool = false, soft: Bool = false) -> GenericTiles? {
        guard sg > 0, sg & (sg - 1) == 0 else { return nil }
        let budget = sharedMemory - 256
        // D and Dv are both reduced over (K) and produced (N): dP = dO·Vᵀ, dQ = dS·K, dV = Pᵀ·dO.
        let divides = { (s: CooperativeMatrixShape) in D % s.k == 0 && Dv % s.n == 0 && D % s.n == 0 && Dv % s.k == 0 }
        for shape in usableShapes(shapes, emulated: emulated, forced: forcedShape, bf16: bf16, where: divides)
        where !soft || softShapeFits(shape, subgroupSize: sg) {
            for nsg in (shape.m <= 8 ? [8, 4, 2, 1] : [4, 2, 1]) where nsg * sg <= maxInvocations {
                let t = shape.m * nsg
                // Each lane takes whole elements of the MM×T pair tile and of the MM×D, MM×Dv gradients.
                guard t % shape.n == 0, t % shape.k == 0, (shape.m * t) % sg == 0, (shape.m * D) % sg == 0, (shape.m * Dv) % sg == 0 else { continue }
                if backwardMMSharedBytes(D: D, Dv: Dv, T: t, emulated: emulated, bf16: bf16) + (soft ? softScratchBytes(shape, subgroups: nsg) : 0) <= budget {
                    var tiles = GenericTiles(M: shape.m, N: shape.n, K: shape.k, SG: sg, NSG: nsg, BKV: t, emulated: emulated)
                    tiles.soft = soft
                    return tiles
                }
            }
        }
        return nil
    }

    static func backwardMMTiles(D: Int, Dv: Int, dtype: DType, device: Device, tuning: AttentionTuning) -> GenericTiles? {
        let caps = device.capabilities
        let soft = softMatrices(device, tuning)
        if soft && dtype != .float16 { return nil }   // backwardMMProblem says why
        return backwardMMTiles(D: D, Dv: Dv, subgroupSize: caps.subgroupSize, shapes: soft ? softShapes : device.cooperativeMatrixShapes,
                               sharedMemory: caps.maxSharedMemory, maxInvocations: caps.maxWorkgroupInvocations,
                               forcedShape: tuning.coopmatShape, emulated: device.cooperativeMatrixAPI == nil && !soft, bf16: dtype == .bfloat16, soft: soft)
    }

    /// Why the backward's matrix passes cannot run this call, or nil.
    static func backwardMMProblem(_ s: AttentionShape, device: Device, tuning: AttentionTuning) -> String? {
        if let problem = matrixDTypeProblem(s.dtype, device: device, kernel: "the backward's coopmat-generic passes") { return problem }
        if backwardMMTiles(D: s.D, Dv: s.Dv, dtype: s.dtype, device: device, tuning: tuning) == nil {
            if softMatrices(device, tuning), s.dtype != .float16 { return softDTypeProblem(s.dtype) }
            return noShapeProblem(s, device: device, tuning: tuning, what: "backward tiles")
        }
        return nil
    }

    // MARK: The backward's coopmat-nv passes (flex_attention_bwd_nv.comp)

    /// Shared memory of flex_attention_bwd_nv.comp: the staged rows' two operands, STEP rows of
    /// D + 8 halves each (the owned rows pass through the same area first, STEP rows a round; with
    /// `ownShared` they stay in their own, T + STEP rows) and, in the dK/dV pass, the staged rows'
    /// LSE and Δ. Kept small because on NVIDIA an SM's resident workgroups share about 48 KiB
    /// (measured with `VKFLEX_RESIDENCY`, docs/performance.md).
    /// The block size the backward's matrix passes walk without a BlockMask: their largest tiles
    /// (128 rows), so no workgroup owns a part-empty block (64, the portable passes', left half of
    /// 8-subgroup workgroups idle: dense D = 64 ran at 73 TFLOP/s against 136 with an all-true
    /// BlockMask on an H100, docs/performance.md).
    static let backwardDenseBlock = 128

    static func backwardNVSharedBytes(D: Int, nsg: Int, step: Int, ownShared: Bool = false, rpw: Int = 1) -> Int {
        2 * (ownShared ? step + 16 * nsg * rpw : step) * (D / 8 + 1) * 16 + 12 * step
    }

    /// The coopmat-nv backward passes' tiles, as ``GenericTiles`` (16×16×16, subgroups of 32, `NSG`
    /// subgroups owning 16 rows each, `BKV` = rows staged per step): eight subgroups (128 rows a
    /// workgroup), 64 rows a step with the next step's rows prefetched up to D = 64; above, the
    /// dK/dV pass 32 rows a step with prefetch, where the owned operands and the dK, dV
    /// accumulators take most of the registers (H100, causal D = 128: 4x32 137.7 TFLOP/s, 8x32xp
    /// 147.5), and the dQ pass 64 without prefetch (full D = 128: 167.2 against 156.5 with
    /// 8x32xp; docs/performance.md).
    /// A workgroup's rows stay inside one block of the BlockMask, so for blocks smaller than 128
    /// (`blockRows`: the smaller of its query and key block sizes) the subgroups and the step
    /// shrink to the block instead of computing empty rows. `VKFLEX_BWD_TILES` overrides them.
    /// `pass`: 1 the dQ pass, 2 the dK/dV pass. Nil when they do not fit the shared memory.
    static func backwardNVTiles(D: Int, sharedMemory: Int, blockRows: Int = backwardDenseBlock, pass: Int = 1, forced: BackwardNVTiles? = nil) -> GenericTiles? {
        let rows = max(16, blockRows / 16 * 16)
        // Above D = 64 the dK/dV pass's accumulators leave room for 32-row steps only; the dQ
        // pass takes 64 without the prefetch's registers (H100, full D = 128: 167.2 TFLOP/s
        // against 156.5 with 8x32xp; docs/performance.md, twenty-fifth session).
        let wide = D <= 64 || pass == 1
        let t = forced ?? BackwardNVTiles(nsg: min(8, rows / 16), step: min(wide ? 64 : 32, rows), prefetch: D <= 64 || pass == 2)
        guard [1, 2].contains(t.rpw),
              backwardNVSharedBytes(D: D, nsg: t.nsg, step: t.step, ownShared: t.ownShared, rpw: t.rpw) <= sharedMemory - 256 else { return nil }
        var tiles = GenericTiles(M: 16, N: 16, K: 16, SG: 32, NSG: t.nsg, BKV: t.step, emulated: false, ownShared: t.ownShared, prefetch: t.prefetch,
                                 splitDKV: pass == 2 && t.splitDKV)
        tiles.rpw = t.rpw
        return tiles
    }

    /// Why the coopmat-nv backward passes cannot run this call on `device`, or nil: the forward
    /// kernel's conditions (NVIDIA's measured layout, subgroups of 32, fp16 or bf16 operands,
    /// D = Dv a multiple of 16), head dims up to 128 (the owned rows and the gradients live in
    /// registers), tiles that fit.
    static func backwardNVProblem(_ s: AttentionShape, device: Device, tuning: AttentionTuning) -> String? {
        if let problem = coopmatProblem(s, device: device, tuning: tuning) { return problem }
        if s.D > 128 { return "the coopmat-nv backward takes head dims up to 128 (got \(s.D))" }
        for (pass, forced) in [(1, tuning.backwardTiles(pass: 1, D: s.D)), (2, tuning.backwardTiles(pass: 2, D: s.D))]
        where backwardNVTiles(D: s.D, sharedMemory: device.capabilities.maxSharedMemory, pass: pass, forced: forced) == nil {
            let what = forced.map { "VKFLEX_BWD_TILES=\($0)" } ?? "the coopmat-nv backward tiles"
            return "\(what) do not fit \(device.capabilities.maxSharedMemory) bytes of shared memory at head dim \(s.D)"
        }
        return nil
    }

    /// The kernel of the backward's dQ and dK/dV passes: the call's option, else `VKFLEX_KERNEL`
    /// where it names `portable`, `coopmat-nv` or `coopmat-generic`, else coopmat-nv where it
    /// applies (NVIDIA), else the generic matrix passes on a device with cooperative matrices once
    /// they matched the portable ones there (``GenericKernelCheck``), else the portable passes.
    ///
    /// - Throws: ``FlexError/unsupported(_:)`` for a forced kernel the backward has not or that
    ///   cannot run the call.
    static func backwardKernel(_ s: AttentionShape, device: Device, forced: FlexKernel?) throws -> FlexKernel {
        let tuning = try AttentionTuning.of(device)
        let source: String
        let chosen: FlexKernel
        if let forced {
            chosen = forced; source = "kernel: .\(forced)"
        } else if let env = tuning.kernel, env != .splitKV {
            chosen = env; source = "VKFLEX_KERNEL=\(env.rawValue)"
        } else {
            // On NVIDIA the passes with P and dS in registers (H100, 2026-12-05: the generic
            // passes ran at 9-12 TFLOP/s, 0.03x PyTorch; docs/performance.md).
            if backwardNVProblem(s, device: device, tuning: tuning) == nil { return .coopmatNV }
            if device.cooperativeMatrixAPI != nil, backwardMMProblem(s, device: device, tuning: tuning) == nil,
               GenericKernelCheck.backwardPasses(D: s.D, Dv: s.Dv, dtype: s.dtype, device: device) {
                return .coopmatGeneric
            }
            return .portable
        }
        switch chosen {
        case .portable: return .portable
        case .coopmatNV:
            if let problem = backwardNVProblem(s, device: device, tuning: tuning) { throw FlexError.unsupported("\(source): \(problem)") }
            return .coopmatNV
        case .coopmatGeneric:
            if let problem = backwardMMProblem(s, device: device, tuning: tuning) { throw FlexError.unsupported("\(source): \(problem)") }
            return .coopmatGeneric
        case .splitKV:
            throw FlexError.unsupported("\(source): the backward runs the portable, coopmat-nv or coopmat-generic kernel")
        }
    }

    private static func lcm(_ a: Int, _ b: Int) -> Int {
        var (x, y) = (a, b)
        while y != 0 { (x, y) = (y, x % y) }
        return a / x * b
    }
}
