import Foundation
import XCTest
@testable import VKFlex

/// coopmat-generic's cooperative-matrix code — what a GPU runs: the register softmax through the
/// index matrix, row blocks, the software pipeline, the shared-memory softmax's O round trip, the
/// backward's matrix passes — on
/// lavapipe, with software matrices (`VKFLEX_GENERIC_MATRICES=software`, flex_mm.glsl's
/// `VKF_MM_SOFT`) whose elements lie across the lanes in a scrambled order, a different one for A,
/// B and C. A kernel that assumed an element order, or that A and C share one, fails here.
extension AttentionTests {
    func testGenericKernelWithSoftwareMatrices() throws {
        XCTAssertTrue(try AttentionTuning.parse(["VKFLEX_GENERIC_MATRICES": "software"]).genericSoftMatrices)
        XCTAssertFalse(try AttentionTuning.parse(["VKFLEX_GENERIC_MATRICES": "Device"]).genericSoftMatrices)
        XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_GENERIC_MATRICES": "scalar"])) {
            XCTAssertTrue("\($0)".contains("VKFLEX_GENERIC_MATRICES=scalar: use software"), "\($0)")
        }
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_GENERIC_LSE_SUMS": "Both"]).genericLSESums, 2)
        XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_GENERIC_LSE_SUMS": "fp16"])) {
            XCTAssertTrue("\($0)".contains("VKFLEX_GENERIC_LSE_SUMS=fp16: use float32"), "\($0)")
        }
        let generic = FlexOptions(kernel: .coopmatGeneric)
        let causal = MaskMod { _, _, q, kv in q >= kv }
        // Each configuration compiles one pipeline (lavapipe: 10-35 s each), so one case each, the
        // default's two: partial blocks and odd lengths, GQA with key lengths and a sliding window.
        // (A two-buffer pipeline with one subgroup compiled in ~50 s: the emulated test has it.)
        let configs: [([String: String], String)] = [
            ([:], "register softmax, 16x16x16"),
            (["VKFLEX_GENERIC_SOFTMAX": "shared"], "shared softmax"),
            // With bfloat16's row sums (no software bfloat16): products with ones for O, float32 sums for the LSE.
            (["VKFLEX_GENERIC_TILES": "2x16xp1xr2", "VKFLEX_GENERIC_LSE_SUMS": "both"], "two row blocks a subgroup, one-buffer pipeline, both row sums"),
            (["VKFLEX_COOPMAT_SHAPE": "8x16x16"], "Intel Xe2's 8x16x16"),
            (["VKFLEX_COOPMAT_SHAPE": "8x8x16", "VKFLEX_GENERIC_TILES": "2x16"], "Intel Arc's 8x8x16, two subgroups"),
        ]
        for (i, (env, what)) in configs.enumerated() {
            let d = try device(with: env.merging(["VKFLEX_GENERIC_MATRICES": "software"]) { a, _ in a })
            let tiles = try XCTUnwrap(AttentionPlanner.genericTiles(D: 32, Dv: 32, dtype: .float16, device: d, tuning: try AttentionTuning.of(d)))
            XCTAssertTrue(tiles.soft && !tiles.emulated, "\(what): \(tiles)")
            if let shape = env["VKFLEX_COOPMAT_SHAPE"] { XCTAssertEqual("\(tiles.M)x\(tiles.N)x\(tiles.K)", shape) }
            for (name, B, Hq, Hkv, Lq, Lkv, D, mask, bs, lens) in [
                ("causal, 24-key blocks, odd lengths", 1, 2, 2, 45, 61, 32, causal, 24, nil),
                ("GQA sliding window, key lengths, D=16", 2, 4, 2, 40, 70, 16, MaskMod { _, _, q, kv in abs(q - kv) < 20 }, 16, [Int32(70), 33]),
            ] as [(String, Int, Int, Int, Int, Int, Int, MaskMod?, Int, [Int32]?)] where i == 0 || D == 32 {
                try checkGeneric(on: d, B: B, Hq: Hq, Hkv: Hkv, Lq: Lq, Lkv: Lkv, D: D, mask: mask, blockSize: bs, kvLengths: lens, "\(what): \(name)")
            }
        }
        // The backward's matrix passes (flex_attention_bwd_mm.comp: dQ, then dK and dV), causal GQA
        // with lengths that leave every tile part-empty, against the float64 reference.
        let d = try device(with: ["VKFLEX_GENERIC_MATRICES": "software"])
        let tiles = try XCTUnwrap(AttentionPlanner.backwardMMTiles(D: 32, Dv: 32, dtype: .float16, device: d, tuning: try AttentionTuning.of(d)))
        XCTAssertTrue(tiles.soft && !tiles.emulated, "\(tiles)")
        let (B, Hq, Hkv, Lq, Lkv, D) = (1, 4, 2, 45, 61, 32)
        let q = try d.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: .float16)
        let k = try d.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: .float16)
        let v = try d.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: .float16)
        let dO = try d.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: .float16)
        let bm = try createBlockMask(MaskMod { _, _, q, kv in q + 16 >= kv }, B: 1, H: 1, qLen: Lq, kvLen: Lkv, device: d, blockSize: 32)
        let fwd = try flexAttention(q, k, v, blockMask: bm, enableGQA: true, returnLSE: true, options: FlexOptions(kernel: .portable))
        let g = try flexAttentionBackward(q, k, v, output: fwd.output, lse: fwd.lse!, gradOutput: dO, blockMask: bm, enableGQA: true, options: generic)
        XCTAssertEqual(g.kernel, .coopmatGeneric)
        let ref = try flexAttentionBackwardReference(q, k, v, gradOutput: dO, blockMask: bm, enableGQA: true)
        for (name, t, r) in [("dq", g.dq, ref.dq), ("dk", g.dk, ref.dk), ("dv", g.dv, ref.dv)] {
            XCTAssertLessThanOrEqual(relativeL2Error(try t.toArray(), r), 5e-3, "backward \(name)")
        }
        // Software matrices take float16 only: bfloat16 says so.
        let qb = try d.tensor(randn(32 * 32), shape: [1, 1, 32, 32], dtype: .bfloat16)
        XCTAssertThrowsError(try flexAttention(qb, qb, qb, options: generic)) {
            XCTAssertTrue("\($0)".contains("VKFLEX_GENERIC_MATRICES=software: software matrices take float16 inputs only (got bfloat16)"), "\($0)")
        }
    }
}
