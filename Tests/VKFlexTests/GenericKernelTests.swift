import Foundation
import XCTest
@testable import VKFlex
import VKFlexSPIRV

/// coopmat-generic: the kernel that assumes no vendor's matrix layout nor subgroup size. Lavapipe
/// has no cooperative matrices, so forced there it runs with its two products as scalar loops over
/// the same shared tiles: the staging, the walk, the mods, the shared-memory softmax
/// (flex_softmax.glsl, at lavapipe's subgroup size), O and the outputs are the GPU's code. The
/// cooperative-matrix form is compiled (and rewritten for the KHR extension) for the shapes AMD,
/// Intel and NVIDIA list; it runs on the H200 (`vkflex selftest --kernel all`).
extension AttentionTests {
    func testGenericKernelMatchesTheReference() throws {
        let causal = MaskMod { _, _, q, kv in q >= kv }
        let softcap = ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }
        let cases: [(String, Case)] = [
            ("dense D=64", Case(B: 2, Hq: 2, Hkv: 2, Lq: 70, Lkv: 70, D: 64, Dv: 64, dtype: .float16)),
            ("causal soft-cap, odd lengths", Case(B: 1, Hq: 2, Hkv: 2, Lq: 45, Lkv: 45, D: 32, Dv: 32, dtype: .float16, score: softcap, mask: causal)),
            ("GQA, Lq != Lkv, D != Dv", Case(B: 1, Hq: 4, Hkv: 2, Lq: 19, Lkv: 83, D: 16, Dv: 48, dtype: .float16)),
            ("sliding window, 16-row blocks", Case(B: 1, Hq: 1, Hkv: 1, Lq: 100, Lkv: 100, D: 32, Dv: 32, dtype: .float16,
                                                  mask: MaskMod { _, _, q, kv in (q >= kv) & (q - kv < 20) }, blockSize: 16)),
            // Scores that rise along the keys: the running maximum is raised lazily (by more than 8
            // log2 units at a time), slowly (P grows towards 2^8 between raises) and at every tile.
            ("rising scores, slowly", Case(B: 1, Hq: 1, Hkv: 1, Lq: 40, Lkv: 200, D: 32, Dv: 32, dtype: .float16,
                                           score: ScoreMod { s, _, _, _, kv in s + 0.05 * kv })),
            ("rising scores, fast", Case(B: 1, Hq: 1, Hkv: 1, Lq: 40, Lkv: 200, D: 32, Dv: 32, dtype: .float16,
                                         score: ScoreMod { s, _, _, _, kv in s + 0.5 * kv })),
            // bfloat16 operands: P rounded to bfloat16 for P·V (emulated as the matrices see it).
            ("bfloat16 causal soft-cap, GQA, odd lengths", Case(B: 1, Hq: 4, Hkv: 2, Lq: 45, Lkv: 61, D: 32, Dv: 32, dtype: .bfloat16,
                                                                score: softcap, mask: causal)),
            ("bfloat16 dense D=64 Dv=16", Case(B: 2, Hq: 2, Hkv: 2, Lq: 70, Lkv: 70, D: 64, Dv: 16, dtype: .bfloat16)),
        ]
        for (name, var c) in cases {
            c.kernel = .coopmatGeneric
            try check(c, "coopmat-generic " + name)
        }
    }

    func testGenericKernelOptionsAndRules() throws {
        let (B, H, L, D) = (2, 2, 37, 32)
        let q = try device.tensor(randn(B * H * L * D), shape: [B, H, L, D], dtype: .float16)
        let k = try device.tensor(randn(B * H * L * D), shape: [B, H, L, D], dtype: .float16)
        let v = try device.tensor(randn(B * H * L * D), shape: [B, H, L, D], dtype: .float16)
        let lens = try device.tensor([Int32(30), 5], shape: [B])
        let sinks = try device.tensor([Float(0.5), -1], shape: [H])
        let generic = FlexOptions(kernel: .coopmatGeneric)
        let r = try flexAttention(q, k, v, kvLengths: lens, sinks: sinks, returnLSE: true, returnMaxScores: true, options: generic)
        let ref = try flexAttentionReference(q, k, v, kvLengths: [30, 5], sinks: [0.5, -1])
        XCTAssertLessThan(relativeL2Error(try r.output.toArray(), ref.output), 2e-3)
        XCTAssertLessThan(zip(try r.lse!.toArray(), ref.lse).map { abs(Double($0) - $1) }.max()!, 2e-2)
        XCTAssertLessThan(zip(try r.maxScores!.toArray(), ref.maxScores).map { abs(Double($0) - $1) }.max()!, 2e-2)
        // Strided views (no 16-byte loads: each unit gathered half by half) and an offset view.
        let qs = try device.tensor(randn(B * L * H * D), shape: [B, L, H, D], dtype: .float16).permuted(0, 2, 1, 3)
        let ks = try device.tensor(randn(B * L * H * D), shape: [B, L, H, D], dtype: .float16).permuted(0, 2, 1, 3)
        let s = try flexAttention(qs, ks, v, scoreMod: ScoreMod { s, _, _, q, kv in s - 0.01 * abs(q - kv) }, options: generic)
        let sref = try flexAttentionReference(qs, ks, v, scoreMod: ScoreMod { s, _, _, q, kv in s - 0.01 * abs(q - kv) })
        XCTAssertLessThan(relativeL2Error(try s.output.toArray(), sref.output), 2e-3, "strided")
        // A NaN score on an unmasked pair makes its row NaN (and its LSE), and no other.
        let nanAt = try ScoreMod(parsing: "where((q_idx == 9) & (kv_idx == 4), nan, score)")
        let n = try flexAttention(q, k, v, scoreMod: nanAt, returnLSE: true, options: generic)
        let o = try n.output.toArray(), l = try n.lse!.toArray()
        for bh in 0..<(B * H) {
            for row in 0..<L {
                let isNaN = o[((bh * L) + row) * D..<((bh * L) + row + 1) * D].contains { $0.isNaN }
                XCTAssertEqual(isNaN, row == 9, "batch-head \(bh) row \(row)")
                XCTAssertEqual(l[bh * L + row].isNaN, row == 9)
            }
        }
        // float32 inputs are not narrowed: a clear error.
        let q32 = try device.tensor(randn(L * D), shape: [1, 1, L, D])
        XCTAssertThrowsError(try flexAttention(q32, q32, q32, options: generic)) { error in
            XCTAssertTrue("\(error)".contains("coopmat-generic: float16 and bfloat16 inputs only (got float32)"), "\(error)")
        }
        XCTAssertEqual(FlexKernel(name: "coopmat-generic"), .coopmatGeneric)
        for bad in ["16x16", "axbxc", "0x16x16"] {
            XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_COOPMAT_SHAPE": bad])) { XCTAssertTrue("\($0)".contains("VKFLEX_COOPMAT_SHAPE"), "\($0)") }
        }
    }

    /// The software pipeline (`VKFLEX_GENERIC_TILES=NSGxBKVxp`: the next step's K and V in registers
    /// while a step computes, two shared buffers, one barrier a step; `xp1`: one buffer, two
    /// barriers a step) on lavapipe: full and partial
    /// blocks, a block size that is not a multiple of the step, key lengths, GQA, a key split.
    func testGenericKernelSoftwarePipeline() throws {
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_GENERIC_TILES": "4x32xp"]).genericTiles.map { [$0.nsg, $0.bkv, $0.prefetch ? 1 : 0] }, [4, 32, 1])
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_GENERIC_TILES": "2X16"]).genericTiles.map { [$0.nsg, $0.bkv, $0.prefetch ? 1 : 0] }, [2, 16, 0])
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_GENERIC_TILES": "4x16xp1"]).genericTiles.map { [$0.nsg, $0.bkv, $0.prefetch ? 1 : 0, $0.singleBuffer ? 1 : 0] }, [4, 16, 1, 1])
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_GENERIC_TILES": "4x16xr2"]).genericTiles.map { [$0.nsg, $0.bkv, $0.prefetch ? 1 : 0, $0.rpw] }, [4, 16, 0, 2])
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_GENERIC_TILES": "2x32xp1xr4"]).genericTiles.map { [$0.nsg, $0.bkv, $0.singleBuffer ? 1 : 0, $0.rpw] }, [2, 32, 1, 4])
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_GENERIC_TILES": "4x32xp"]).genericTiles?.rpw, 1)
        for bad in ["4", "3x32", "4x20", "4x32xq", "4x256", "4x32xpx", "4x32xp2", "4x16xr1", "4x16xr3", "4x16xr2xp", "4x16xr2xr2"] {
            XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_GENERIC_TILES": bad])) {
                XCTAssertTrue("\($0)".contains("VKFLEX_GENERIC_TILES=\(bad): use NSGxBKV[xp|xp1]"), "\($0)")
            }
        }
        let generic = FlexOptions(kernel: .coopmatGeneric)
        let causal = MaskMod { _, _, q, kv in q >= kv }
        // Two buffers, one subgroup; one buffer (a second barrier a step), two subgroups; two row
        // blocks a subgroup (GEN_RPW) with the pipeline, on one case (lavapipe compiles the
        // emulated kernel of twice the rows a lane in ~15 s).
        for tiles in ["1x16xp", "2x16xp1", "1x16xpxr2"] {
            let d = try device(with: ["VKFLEX_GENERIC_TILES": tiles])
            for (name, B, Hq, Hkv, Lq, Lkv, D, mask, bs, lens) in [
                ("causal, 24-key blocks, odd lengths", 1, 2, 2, 50, 61, 32, causal, 24, nil),
                ("GQA sliding window, key lengths", 2, 4, 2, 40, 70, 16, MaskMod { _, _, q, kv in abs(q - kv) < 20 }, 16, [Int32(70), 33]),
                ("dense, 1 query row, 900 keys (split)", 1, 2, 1, 1, 900, 32, nil, 32, nil),
            ] as [(String, Int, Int, Int, Int, Int, Int, MaskMod?, Int, [Int32]?)] where !tiles.hasSuffix("r2") || D == 16 {
                try checkGeneric(on: d, B: B, Hq: Hq, Hkv: Hkv, Lq: Lq, Lkv: Lkv, D: D, mask: mask, blockSize: bs, kvLengths: lens, "\(tiles) \(name)")
            }
        }
        // Tiles that do not fit say which variable asked for them.
        let big = try device(with: ["VKFLEX_GENERIC_TILES": "8x128xp"])
        let q = try big.tensor(randn(64 * 64), shape: [1, 1, 64, 64], dtype: .float16)
        XCTAssertThrowsError(try flexAttention(q, q, q, options: generic)) { XCTAssertTrue("\($0)".contains("VKFLEX_GENERIC_TILES=8x128xp: 8 subgroups"), "\($0)") }
    }

    /// coopmat-generic forced on `d`, float16, against the float64 reference: output and LSE.
    func checkGeneric(on d: Device, B: Int, Hq: Int, Hkv: Int, Lq: Int, Lkv: Int, D: Int, mask: MaskMod?, blockSize bs: Int, kvLengths lens: [Int32]?,
                      _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let q = try d.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: .float16)
        let k = try d.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: .float16)
        let v = try d.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: .float16)
        let bm = try mask.map { try createBlockMask($0, B: 1, H: 1, qLen: Lq, kvLen: Lkv, device: d, blockSize: BlockSize(q: bs, kv: bs)) }
        let kl = try lens.map { try d.tensor($0, shape: [B]) }
        let r = try flexAttention(q, k, v, blockMask: bm, enableGQA: Hq != Hkv, kvLengths: kl, returnLSE: true, options: FlexOptions(kernel: .coopmatGeneric))
        XCTAssertEqual(r.kernel, .coopmatGeneric, what, file: file, line: line)
        let ref = try flexAttentionReference(q, k, v, blockMask: bm, enableGQA: Hq != Hkv, kvLengths: lens?.map(Int.init))
        XCTAssertLessThan(relativeL2Error(try r.output.toArray(), ref.output), 2e-3, what, file: file, line: line)
        // The row sums add float32 P where the call returns the LSE (sums of the fp16 P put it ~1e-4 off).
        XCTAssertLessThan(zip(try r.lse!.toArray(), ref.lse).map { $1 == -.infinity ? ($0 == -.infinity ? 0 : 1) : abs(Double($0) - $1) }.max()!, 2e-5,
                          "LSE: " + what, file: file, line: line)
    }

    /// Long key ranges through the emulated kernel: its scalar products count against lavapipe's
    /// loop cap, so the planner splits its keys too (and merges the partials).
    func testGenericKernelOnLongKeyRanges() throws {
        var c = Case(B: 1, Hq: 1, Hkv: 1, Lq: 9, Lkv: 20_000, D: 32, Dv: 32, dtype: .float16, mask: MaskMod { _, _, _, kv in kv % 5 != 2 },
                     blockSize: 512)
        c.kernel = .coopmatGeneric
        try check(c, "coopmat-generic, 20,000 keys")
    }

    /// The planner for the subgroup sizes and matrix shapes other vendors list (from their documents:
    /// docs/performance.md): the tiles exist, divide what they must, and fit the shared memory.
    func testGenericTilesForOtherVendors() throws {
        func shape(_ m: Int, _ n: Int, _ k: Int) -> CooperativeMatrixShape {
            CooperativeMatrixShape(m: m, n: n, k: k, a: "float16", b: "float16", c: "float32", result: "float32")
        }
        let devices: [(String, Int, [CooperativeMatrixShape], Int)] = [
            ("NVIDIA", 32, [shape(16, 16, 16), shape(16, 8, 16), shape(16, 8, 8)], 48 << 10),
            ("AMD RDNA3 wave32", 32, [shape(16, 16, 16)], 64 << 10),
            ("AMD RDNA3 wave64", 64, [shape(16, 16, 16)], 64 << 10),
            ("Intel Xe2", 16, [shape(8, 16, 16)], 64 << 10),
            ("Intel Arc", 8, [shape(8, 8, 16)], 64 << 10),
            ("a 16-lane 16x16x16 device", 16, [shape(16, 16, 16)], 32 << 10),
        ]
        for (name, sg, shapes, shared) in devices {
            for (D, Dv) in [(64, 64), (128, 128), (32, 64), (256, 256)] {
                guard let t = AttentionPlanner.genericTiles(D: D, Dv: Dv, subgroupSize: sg, shapes: shapes, sharedMemory: shared, maxInvocations: 1024) else {
                    XCTAssertEqual(D, 256, "\(name) D=\(D)/\(Dv): no tiles"); continue
                }
                XCTAssertEqual(t.SG, sg)
                XCTAssertTrue(shapes.contains { $0.m == t.M && $0.n == t.N && $0.k == t.K }, "\(name): \(t)")
                XCTAssertEqual(D % t.K, 0); XCTAssertEqual(Dv % t.N, 0)
                XCTAssertEqual(t.BKV % t.M, 0); XCTAssertEqual(t.BKV % t.N, 0); XCTAssertEqual(t.BKV % t.K, 0)
                XCTAssertEqual(t.BKV % max(1, sg / t.M), 0); XCTAssertEqual(Dv % max(1, sg / t.M), 0)
                XCTAssertGreaterThanOrEqual(t.BQ, 16, "\(name): \(t)")
                XCTAssertLessThanOrEqual(GenericTiles.sharedBytes(D: D, Dv: Dv, M: t.M, NSG: t.NSG, BKV: t.BKV, emulated: false, prefetch: t.prefetch), shared - 256)
            }
        }
        // NVIDIA: one K/V buffer and 16 keys a step, the smallest shared memory (several
        // workgroups an SM, measured faster there); emulated, never the pipeline.
        let nv = [shape(16, 16, 16)]
        XCTAssertEqual(AttentionPlanner.genericTiles(D: 64, Dv: 64, subgroupSize: 32, shapes: nv, sharedMemory: 48 << 10, maxInvocations: 1024)?.description, "16x16x16 sg32 4x16")
        XCTAssertEqual(AttentionPlanner.genericTiles(D: 128, Dv: 128, subgroupSize: 32, shapes: nv, sharedMemory: 48 << 10, maxInvocations: 1024)?.description, "16x16x16 sg32 4x16")
        XCTAssertEqual(AttentionPlanner.genericTiles(D: 64, Dv: 64, subgroupSize: 8, shapes: [], sharedMemory: 32 << 10, maxInvocations: 1024, emulated: true)?.prefetch, false)
        // A forced shape the device does not list, a subgroup size that is not a power of two: none.
        XCTAssertNil(AttentionPlanner.genericTiles(D: 64, Dv: 64, subgroupSize: 32, shapes: [shape(16, 16, 16)], sharedMemory: 48 << 10,
                                                   maxInvocations: 1024, forcedShape: (16, 8, 16)))
        XCTAssertNil(AttentionPlanner.genericTiles(D: 64, Dv: 64, subgroupSize: 24, shapes: [shape(16, 16, 16)], sharedMemory: 48 << 10, maxInvocations: 1024))
    }

    /// The cooperative-matrix form compiles, and rewrites for VK_KHR_cooperative_matrix, for every
    /// shape and subgroup size above (lavapipe cannot run it).
    func testGenericKernelCompilesForEveryShape() throws {
        let mods = try SplicedMods(score: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, mask: MaskMod { _, _, q, kv in q >= kv },
                                   firstBinding: AttentionBinding.firstCapture, errorBinding: AttentionBinding.errors.rawValue, device: device)
        var library = ShaderLibrary.standard
        library.files.merge(mods.includes) { _, new in new }
        // Each plan compiled, rewritten for the KHR extension (and retyped for bfloat16) as a device with it gets it.
        func compileForKHR(_ plan: AttentionPlan, subgroupSize sg: Int, _ what: String) throws {
            let spirv = try ShaderCompiler.shared.compile(try plan.source(), library: library)
            let khr = try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: sg)
            XCTAssertFalse(CooperativeMatrixKHRRewriter.usesNVCooperativeMatrix(khr), what)
            if plan.bfloat16Operands { try assertBFloat16Operands(try BFloat16Retyper.retype(khr), what) }
        }
        let shapes = [(16, 16, 16, 32), (16, 16, 16, 64), (8, 16, 16, 16), (8, 8, 16, 8), (16, 8, 16, 32)]
        var compiled = 0
        for (m, n, k, sg) in shapes {
            let shape = CooperativeMatrixShape(m: m, n: n, k: k, a: "float16", b: "float16", c: "float32", result: "float32")
            for (D, Dv) in [(64, 64), (128, 128), (32, 96)] {
                guard let t = AttentionPlanner.genericTiles(D: D, Dv: Dv, subgroupSize: sg, shapes: [shape], sharedMemory: 48 << 10, maxInvocations: 1024) else {
                    return XCTFail("\(m)x\(n)x\(k) sg \(sg) D=\(D)/\(Dv): no tiles")
                }
                // bfloat16 (its shapes are the fp16 ones on NVIDIA and AMD) on the first shape.
                for (pass, dtype) in [(AttentionPlan.Pass.forward, DType.float16), (.forwardPartial, .float16)]
                    + (sg == 32 && m == 16 && n == 16 ? [(.forward, .bfloat16), (.forwardPartial, .bfloat16)] : []) {
                    let plan = AttentionPlan(pass: pass, kernel: .coopmatGeneric, dtype: dtype, D: D, Dv: Dv, tiles: .generic(t),
                                             typedOperands: true, maxScores: pass == .forward, kvLengths: true, sinks: pass == .forward,
                                             pushParams: pass == .forward, mods: mods.glsl.source)
                    try compileForKHR(plan, subgroupSize: sg, "D=\(D)/\(Dv) \(pass)")
                    compiled += 1
                }
                // The software pipeline (GEN_PREFETCH: two K/V buffers, the next step in registers).
                var pt = t
                pt.prefetch = true
                let plan = AttentionPlan(pass: .forward, kernel: .coopmatGeneric, dtype: .float16, D: D, Dv: Dv, tiles: .generic(pt),
                                         typedOperands: true, kvLengths: true, pushParams: true, mods: mods.glsl.source)
                try compileForKHR(plan, subgroupSize: sg, "D=\(D)/\(Dv) prefetch")
                compiled += 1
                // ... with one K/V buffer (GEN_NBUF=1).
                pt.singleBuffer = true
                let plan1 = AttentionPlan(pass: .forward, kernel: .coopmatGeneric, dtype: .float16, D: D, Dv: Dv, tiles: .generic(pt),
                                          typedOperands: true, kvLengths: true, pushParams: true, mods: mods.glsl.source)
                XCTAssertTrue(try plan1.source().defines.contains { $0.name == "GEN_NBUF" && $0.value == "1" })
                try compileForKHR(plan1, subgroupSize: sg, "D=\(D)/\(Dv) prefetch, one buffer")
                compiled += 1
                // The register softmax (GEN_REGSM: element-wise through an index matrix), with and without the pipeline.
                var rt = t
                rt.registerSoftmax = true
                for (pass, dtype, prefetch) in [(AttentionPlan.Pass.forward, DType.float16, false), (.forwardPartial, .float16, true)]
                    + (sg == 32 && m == 16 && n == 16 ? [(.forward, .bfloat16, true)] : []) {
                    rt.prefetch = prefetch
                    // The forward as where it returns the LSE: float32 row sums (float16), both sums
                    // (bfloat16); the exact tanh too, which the planner gives the portable and split-KV kernels only.
                    let plan = AttentionPlan(pass: pass, kernel: .coopmatGeneric, dtype: dtype, D: D, Dv: Dv, tiles: .generic(rt),
                                             exactRowSums: pass == .forward, bothRowSums: dtype == .bfloat16, exactTanh: dtype == .bfloat16,
                                             typedOperands: true, maxScores: pass == .forward, kvLengths: true, sinks: pass == .forward,
                                             pushParams: true, mods: mods.glsl.source)
                    XCTAssertTrue(try plan.source().defines.contains { $0.name == "GEN_REGSM" && $0.value == "1" })
                    XCTAssertTrue(try plan.source().defines.contains { $0.name == "MM_EXACT_SUMS" && $0.value == (dtype == .bfloat16 ? "2" : pass == .forward ? "1" : "0") })
                    try compileForKHR(plan, subgroupSize: sg, "D=\(D)/\(Dv) \(pass) \(dtype) register softmax")
                    compiled += 1
                }
                // Two row blocks a subgroup (GEN_RPW, VKFLEX_GENERIC_TILES=...xr2): each K and V
                // fragment feeds two products; the register softmax, with and without the pipeline.
                guard var r2 = AttentionPlanner.genericTiles(D: D, Dv: Dv, subgroupSize: sg, shapes: [shape], sharedMemory: 48 << 10, maxInvocations: 1024,
                                                             forced: (t.NSG, t.BKV, false, false, 2)) else {
                    return XCTFail("\(m)x\(n)x\(k) sg \(sg) D=\(D)/\(Dv): no tiles of two row blocks")
                }
                XCTAssertEqual(r2.BQ, 2 * t.BQ)
                r2.registerSoftmax = true
                for (pass, prefetch) in [(AttentionPlan.Pass.forward, false), (.forwardPartial, true)] {
                    r2.prefetch = prefetch
                    let plan = AttentionPlan(pass: pass, kernel: .coopmatGeneric, dtype: .float16, D: D, Dv: Dv, tiles: .generic(r2),
                                             typedOperands: true, maxScores: pass == .forward, kvLengths: true, sinks: pass == .forward,
                                             pushParams: true, mods: mods.glsl.source)
                    XCTAssertTrue(try plan.source().defines.contains { $0.name == "GEN_RPW" && $0.value == "2" })
                    try compileForKHR(plan, subgroupSize: sg, "D=\(D)/\(Dv) \(pass) two row blocks")
                    compiled += 1
                }
            }
        }
        XCTAssertEqual(compiled, 129)
        // The split-KV matrix kernel, through the same shapes and subgroup sizes (GQA rows, offsets,
        // paged K/V, max scores).
        var decodes = 0
        for (m, n, k, sg) in shapes {
            let shape = CooperativeMatrixShape(m: m, n: n, k: k, a: "float16", b: "float16", c: "float32", result: "float32")
            for (D, Dv) in [(128, 128), (32, 96)] {
                guard let t = AttentionPlanner.decodeMMTiles(D: D, Dv: Dv, subgroupSize: sg, shapes: [shape], sharedMemory: 48 << 10, maxInvocations: 1024) else {
                    return XCTFail("decode \(m)x\(n)x\(k) sg \(sg) D=\(D)/\(Dv): no tiles")
                }
                for dtype in [DType.float16] + (sg == 32 && m == 16 && n == 16 ? [.bfloat16] : []) {
                    let plan = AttentionPlan(pass: .forwardPartial, kernel: .splitKV, dtype: dtype, D: D, Dv: Dv, tiles: .decodeMM(t), typedOperands: true,
                                             maxScores: true, kvLengths: true, qOffsets: true, paged: true, pushParams: true, mods: mods.glsl.source)
                    try compileForKHR(plan, subgroupSize: sg, "decode \(m)x\(n)x\(k) sg \(sg) D=\(D)/\(Dv) \(dtype)")
                    decodes += 1
                }
            }
        }
        XCTAssertEqual(decodes, 12)
        // Four subgroups a workgroup, each with tiles and a split of its own (VKFLEX_DECODE_TILE=mm16x4).
        let nv = CooperativeMatrixShape(m: 16, n: 16, k: 16, a: "float16", b: "float16", c: "float32", result: "float32")
        let four = try XCTUnwrap(AttentionPlanner.decodeMMTiles(D: 128, Dv: 128, subgroupSize: 32, shapes: [nv], sharedMemory: 48 << 10,
                                                                 maxInvocations: 1024, keys: 16, subgroups: 4))
        let plan4 = AttentionPlan(pass: .forwardPartial, kernel: .splitKV, dtype: .float16, D: 128, Dv: 128, tiles: .decodeMM(four), typedOperands: true,
                                  maxScores: true, kvLengths: true, qOffsets: true, paged: true, pushParams: true, mods: mods.glsl.source)
        try compileForKHR(plan4, subgroupSize: 32, "decode 16x16x16 sg 32 D=128 four subgroups")
        // Each step's K and V loaded a step ahead (VKFLEX_DECODE_TILE=mm16p, mm16x4p), fp16 and bf16.
        for sgs in [1, 4] {
            let pt = try XCTUnwrap(AttentionPlanner.decodeMMTiles(D: 128, Dv: 128, subgroupSize: 32, shapes: [nv], sharedMemory: 48 << 10,
                                                                   maxInvocations: 1024, keys: 16, subgroups: sgs, prefetch: true))
            for dtype in [DType.float16, .bfloat16] {
                let plan = AttentionPlan(pass: .forwardPartial, kernel: .splitKV, dtype: dtype, D: 128, Dv: 128, tiles: .decodeMM(pt), typedOperands: true,
                                         maxScores: true, kvLengths: true, qOffsets: true, paged: true, pushParams: true, mods: mods.glsl.source)
                XCTAssertTrue(try plan.source().defines.contains { $0.name == "DEC_PREFETCH" && $0.value == "1" })
                try compileForKHR(plan, subgroupSize: 32, "decode prefetch \(sgs) subgroups \(dtype)")
            }
        }
    }
}

extension XCTestCase {
    /// What a bfloat16 build of a generic kernel must hand the driver: one 16-bit float, encoded
    /// BFloat16KHR; the bfloat16 capabilities and extension, no Float16; bfloat16 only in A and B
    /// operands (accumulators stay float32); still a valid KHR module by the rewriter's checks.
    /// `operandsOnly: false`: a kernel that also converts an accumulator to a 16-bit matrix to
    /// store it (coopmat-nv's output) has bfloat16 accumulators too.
    func assertBFloat16Operands(_ words: [UInt32], _ what: String, operandsOnly: Bool = true,
                                file: StaticString = #filePath, line: UInt = #line) throws {
        var capabilities = Set<UInt32>(), extensions: [String] = [], floats16: [[UInt32]] = [], constants: [UInt32: UInt32] = [:]
        var matrices: [(component: UInt32, use: UInt32)] = []
        var words16 = Set<UInt32>()
        var i = 5
        while i < words.count {
            let count = Int(words[i] >> 16), op = words[i] & 0xffff, w = Array(words[(i + 1)..<(i + count)])
            switch op {
            case 17: capabilities.insert(w[0])
            case 10:
                var bytes: [UInt8] = []
                for x in w { for shift: UInt32 in [0, 8, 16, 24] { bytes.append(UInt8(truncatingIfNeeded: x >> shift)) } }
                extensions.append(String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self))
            case 22 where w[1] == 16: floats16.append(w); words16.insert(w[0])
            case 43 where w.count == 3: constants[w[1]] = w[2]
            case 4456: matrices.append((w[1], constants[w[5]] ?? 99))
            default: break
            }
            i += count
        }
        XCTAssertEqual(floats16.count, 1, "\(what): one 16-bit float type", file: file, line: line)
        XCTAssertEqual(floats16.first?.count, 3, "\(what): the 16-bit float carries an encoding", file: file, line: line)
        XCTAssertEqual(floats16.first?.last, 0, "\(what): encoded BFloat16KHR", file: file, line: line)
        XCTAssertTrue(capabilities.isSuperset(of: [5116, 5118]), "\(what): \(capabilities)", file: file, line: line)
        XCTAssertFalse(capabilities.contains(9), "\(what): Float16 dropped", file: file, line: line)
        XCTAssertTrue(extensions.contains("SPV_KHR_bfloat16"), "\(what): \(extensions)", file: file, line: line)
        let operands = matrices.filter { words16.contains($0.component) }
        XCTAssertFalse(operands.isEmpty, "\(what): bfloat16 matrices", file: file, line: line)
        XCTAssertTrue(operands.contains { $0.use == 0 } && operands.contains { $0.use == 1 }, "\(what): bfloat16 A and B operands", file: file, line: line)
        if operandsOnly { XCTAssertTrue(operands.allSatisfy { $0.use <= 1 }, "\(what): bfloat16 only in A and B operands", file: file, line: line) }
        try CooperativeMatrixKHRRewriter.verify(words)
    }
}
