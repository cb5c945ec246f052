import Foundation
import XCTest
@testable import VKFlex
import VKFlexSPIRV

/// The backward pass against the float64 reference: score-mods (through their symbolic
/// derivative), masks with partial and empty blocks, GQA, odd sizes, dLSE, every dtype.
final class BackwardTests: FlexTestCase {
    struct Case {
        var name: String
        var B = 1, Hq = 2, Hkv = 2, Lq = 40, Lkv = 40, D = 16, Dv = 16
        var dtype: DType = .float32
        var score: ScoreMod? = nil
        var mask: MaskMod? = nil
        var blockSize: BlockSize = 16
        var gradLSE = false
        /// The dQ and dK/dV passes' kernel (nil: the planner's).
        var kernel: FlexKernel? = nil
    }

    func check(_ c: Case, line: UInt = #line) throws {
        let q = try device.tensor(randn(c.B * c.Hq * c.Lq * c.D), shape: [c.B, c.Hq, c.Lq, c.D], dtype: c.dtype)
        let k = try device.tensor(randn(c.B * c.Hkv * c.Lkv * c.D), shape: [c.B, c.Hkv, c.Lkv, c.D], dtype: c.dtype)
        let v = try device.tensor(randn(c.B * c.Hkv * c.Lkv * c.Dv), shape: [c.B, c.Hkv, c.Lkv, c.Dv], dtype: c.dtype)
        let dO = try device.tensor(randn(c.B * c.Hq * c.Lq * c.Dv), shape: [c.B, c.Hq, c.Lq, c.Dv], dtype: c.dtype)
        let dLSE = c.gradLSE ? try device.tensor(randn(c.B * c.Hq * c.Lq), shape: [c.B, c.Hq, c.Lq]) : nil
        let bm = try c.mask.map { try createBlockMask($0, B: 1, H: 1, qLen: c.Lq, kvLen: c.Lkv, device: device, blockSize: c.blockSize) }
        let gqa = c.Hq != c.Hkv
        let fwd = try flexAttention(q, k, v, scoreMod: c.score, blockMask: bm, enableGQA: gqa, returnLSE: true, options: FlexOptions(kernel: .portable))
        let g = try flexAttentionBackward(q, k, v, output: fwd.output, lse: fwd.lse!, gradOutput: dO, gradLSE: dLSE,
                                          scoreMod: c.score, blockMask: bm, enableGQA: gqa, options: FlexOptions(kernel: c.kernel))
        if let forced = c.kernel { XCTAssertEqual(g.kernel, forced, c.name, line: line) }
        let ref = try flexAttentionBackwardReference(q, k, v, gradOutput: dO, gradLSE: dLSE, scoreMod: c.score, blockMask: bm, enableGQA: gqa)
        let tol = c.dtype == .float32 ? 1e-4 : c.dtype == .float16 ? 5e-3 : 2e-2
        for (name, t, r) in [("dq", g.dq, ref.dq), ("dk", g.dk, ref.dk), ("dv", g.dv, ref.dv)] {
            XCTAssertEqual(t.dtype, c.dtype, "\(c.name) \(name)", line: line)
            let got = try t.toArray()
            XCTAssertFalse(got.contains { !$0.isFinite }, "\(c.name) \(name): non-finite", line: line)
            XCTAssertLessThanOrEqual(relativeL2Error(got, r), tol, "\(c.name) \(name)", line: line)
        }
    }

    func testGradientsMatchTheReference() throws {
        let slopes = try device.tensor([0.5, 0.25, 0.125, 0.0625], shape: [4], name: "slope")
        let docs = try device.tensor((0..<70).map { Int32($0 / 25) }, shape: [70], name: "doc")
        let causal = MaskMod { _, _, q, kv in q >= kv }
        let cases = [
            Case(name: "dense"),
            Case(name: "causal soft-cap GQA", Hq: 4, Hkv: 2, Lq: 70, Lkv: 70, score: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, mask: causal, blockSize: 32),
            Case(name: "ALiBi document", Hq: 4, Hkv: 4, Lq: 70, Lkv: 70, score: ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) },
                 mask: MaskMod { _, _, q, kv in (docs[q] == docs[kv]) & (q >= kv) }),
            Case(name: "odd sizes, empty rows, dLSE", B: 2, Lq: 33, Lkv: 50, D: 13, Dv: 7, mask: MaskMod { _, _, q, kv in kv <= q - 5 }, gradLSE: true),
            Case(name: "where and abs in the score-mod", score: ScoreMod { s, _, _, q, kv in select(q >= kv, s * 2, abs(s) - 1) }),
            Case(name: "float16 causal", Lq: 64, Lkv: 64, D: 32, Dv: 32, dtype: .float16, mask: causal, blockSize: 32),
            Case(name: "bfloat16", Hq: 4, Hkv: 1, Lq: 48, Lkv: 40, dtype: .bfloat16, score: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }),
            // 66,000 rows: more than the Δ pass's 4,096 workgroups of 16 rows, so they stride.
            Case(name: "many rows, dLSE", Lq: 33_000, Lkv: 20, D: 4, Dv: 4, mask: MaskMod { _, _, q, kv in kv <= q % 23 }, gradLSE: true),
        ]
        for c in cases { try check(c) }
    }

    func testBadInputsAreCleanErrors() throws {
        let q = try device.tensor(randn(2 * 8 * 4), shape: [1, 2, 8, 4])
        let lse = try device.empty(shape: [1, 2, 8], dtype: .float32)
        let wrong = try device.tensor(randn(2 * 8 * 3), shape: [1, 2, 8, 3])
        XCTAssertThrowsError(try flexAttentionBackward(q, q, q, output: q, lse: lse, gradOutput: wrong)) {
            XCTAssertTrue("\($0)".contains("gradOutput has shape [1, 2, 8, 3]; it must be [1, 2, 8, 4]"), "\($0)")
        }
        let h = try device.tensor(randn(2 * 8 * 4), shape: [1, 2, 8, 4], dtype: .float16)
        XCTAssertThrowsError(try flexAttentionBackward(q, q, q, output: q, lse: lse, gradOutput: h)) {
            XCTAssertTrue("\($0)".contains("gradOutput is float16; it must be float32"), "\($0)")
        }
    }
}

extension BackwardTests {
    /// Long rows and long key columns: on lavapipe the dQ pass splits each row's keys and the
    /// dK/dV pass each key's rows (its loop cap), summed afterwards; the gradients still match.
    func testLongRowsAndColumns() throws {
        for (Lq, Lkv) in [(3, 30_000), (25_000, 3)] {
            let D = 64   // 30k keys at D = 64 took lavapipe past its cap before the splits
            let q = try device.tensor(randn(Lq * D), shape: [1, 1, Lq, D])
            let k = try device.tensor(randn(Lkv * D), shape: [1, 1, Lkv, D])
            let v = try device.tensor(randn(Lkv * D), shape: [1, 1, Lkv, D])
            let dO = try device.tensor(randn(Lq * D), shape: [1, 1, Lq, D])
            let fwd = try flexAttention(q, k, v, returnLSE: true)
            let g = try fwd.backward(gradOutput: dO)
            let ref = try flexAttentionBackwardReference(q, k, v, gradOutput: dO)
            for (name, t, r) in [("dq", g.dq, ref.dq), ("dk", g.dk, ref.dk), ("dv", g.dv, ref.dv)] {
                XCTAssertLessThan(relativeL2Error(try t.toArray(), r), 1e-4, "\(Lq)x\(Lkv) \(name)")
            }
        }
    }
}

extension BackwardTests {
    /// A forward result differentiates itself: the same gradients as the functional call.
    func testAResultDifferentiatesItself() throws {
        let q = try device.tensor(randn(2 * 30 * 16), shape: [1, 2, 30, 16])
        let dO = try device.tensor(randn(2 * 30 * 16), shape: [1, 2, 30, 16])
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 30, kvLen: 30, device: device, blockSize: 16)
        let softcap = ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }
        let forward = try flexAttention(q, q, q, scoreMod: softcap, blockMask: causal, returnLSE: true)
        let a = try forward.backward(gradOutput: dO)
        let b = try flexAttentionBackward(q, q, q, output: forward.output, lse: forward.lse!, gradOutput: dO, scoreMod: softcap, blockMask: causal)
        XCTAssertEqual(try a.dq.toArray(), try b.dq.toArray())
        XCTAssertEqual(try a.dv.toArray(), try b.dv.toArray())
        XCTAssertThrowsError(try flexAttention(q, q, q).backward(gradOutput: dO)) { XCTAssertTrue("\($0)".contains("returnLSE: true"), "\($0)") }
    }

    /// `out:` writes dQ, dK and dV into the caller's tensors — new ones holding NaN, or one
    /// micro-batch's rows of larger tensors, whose other rows stay as they were — with the values a
    /// call without it gives; tensors it cannot write are refused by name.
    func testGradientsIntoTheCallersTensors() throws {
        let (B, H, S, D) = (2, 2, 40, 16), n = B * H * S * D
        let q = try device.tensor(randn(n), shape: [B, H, S, D], name: "q")
        let k = try device.tensor(randn(n), shape: [B, H, S, D], name: "k")
        let v = try device.tensor(randn(n), shape: [B, H, S, D], name: "v")
        let dO = try device.tensor(randn(n), shape: [B, H, S, D], name: "dO")
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: S, kvLen: S, device: device, blockSize: 16)
        let forward = try flexAttention(q, k, v, blockMask: causal, returnLSE: true)
        let fresh = try forward.backward(gradOutput: dO)
        let expected = try [fresh.dq, fresh.dk, fresh.dv].map { try $0.toArray() }

        let nan = [Float](repeating: .nan, count: n)
        let mine = FlexGradients(dq: try device.tensor(nan, shape: [B, H, S, D]), dk: try device.tensor(nan, shape: [B, H, S, D]),
                                 dv: try device.tensor(nan, shape: [B, H, S, D]))
        let into = try forward.backward(gradOutput: dO, out: mine)
        XCTAssertEqual([into.dq.id, into.dk.id, into.dv.id], [mine.dq.id, mine.dk.id, mine.dv.id], "the result holds the caller's tensors")
        XCTAssertEqual(try [mine.dq, mine.dk, mine.dv].map { try $0.toArray() }, expected)

        // The second of two micro-batches' rows of [2B, H, S, D] gradients.
        let sevens = [Float](repeating: 7, count: 2 * n)
        let whole = try (0..<3).map { _ in try device.tensor(sevens, shape: [2 * B, H, S, D]) }
        let rows = try whole.map { try $0.asStrided(shape: [B, H, S, D], strides: $0.strides, byteOffset: n * 4) }
        _ = try forward.backward(gradOutput: dO, out: FlexGradients(dq: rows[0], dk: rows[1], dv: rows[2]))
        for (t, e) in zip(whole, expected) {
            let all = try t.toArray()
            XCTAssertEqual(Array(all[..<n]), Array(sevens[..<n]), "the first micro-batch's rows are untouched")
            XCTAssertEqual(Array(all[n...]), e)
        }

        func refused(_ out: FlexGradients, _ fragment: String, line: UInt = #line) {
            XCTAssertThrowsError(try forward.backward(gradOutput: dO, out: out), line: line) {
                XCTAssertTrue("\($0)".contains(fragment), "\($0)", line: line)
            }
        }
        let ok = try device.empty(shape: [B, H, S, D], dtype: .float32)
        refused(FlexGradients(dq: try device.empty(shape: [B, H, S, D + 1], dtype: .float32), dk: ok, dv: ok), "out: dq has shape [2, 2, 40, 17]; it must be [2, 2, 40, 16]")
        refused(FlexGradients(dq: try device.empty(shape: [B, H, S, D], dtype: .float16), dk: ok, dv: ok), "out: dq is float16; it must be float32")
        let other = try device.empty(shape: [B, H, S, D], dtype: .float32)
        refused(FlexGradients(dq: other, dk: try device.empty(shape: [B, S, H, D], dtype: .float32).permuted(0, 2, 1, 3), dv: ok), "out: dk is a strided view")
        refused(FlexGradients(dq: other, dk: ok, dv: ok), "out: dk and dv share memory")
        refused(FlexGradients(dq: other, dk: ok, dv: q), "out: dv shares memory with the input q")

        // No query rows: dK and dV are zeros, written into the caller's views alone (their
        // neighbours keep their 7s; a call's own tensors are zeros too), float16, 15 elements.
        let q0 = try device.empty(shape: [1, 1, 0, 3], dtype: .float16)
        let k0 = try device.tensor(randn(5 * 3), shape: [1, 1, 5, 3], dtype: .float16)
        let lse0 = try device.empty(shape: [1, 1, 0], dtype: .float32)
        func backward0(_ out: FlexGradients?) throws -> FlexGradients {
            try flexAttentionBackward(q0, k0, k0, output: q0, lse: lse0, gradOutput: q0, out: out)
        }
        let big = try (0..<2).map { _ in try device.tensor([Float](repeating: 7, count: 32), shape: [32], dtype: .float16) }
        let halves = try big.map { try $0.asStrided(shape: [1, 1, 5, 3], strides: [15, 15, 3, 1], byteOffset: 32) }
        let dq0 = try device.empty(shape: [1, 1, 0, 3], dtype: .float16)
        _ = try backward0(FlexGradients(dq: dq0, dk: halves[0], dv: halves[1]))
        for t in big { XCTAssertEqual(try t.toArray(), [Float](repeating: 7, count: 16) + [Float](repeating: 0, count: 15) + [7]) }
        let own = try backward0(nil)
        XCTAssertEqual(try own.dk.toArray() + own.dv.toArray(), [Float](repeating: 0, count: 30))
    }
}

extension BackwardTests {
    /// The backward with per-batch key lengths and sinks: dQ, dK, dV and the sinks' gradient
    /// against the float64 reference, whose dsink is itself checked by central differences of the
    /// float64 forward (loss = Σ O·dO + Σ LSE·dLSE).
    func testKeyLengthsAndSinks() throws {
        let (B, Hq, Hkv, L, D) = (2, 4, 2, 30, 8)
        let q = try device.tensor(randn(B * Hq * L * D), shape: [B, Hq, L, D])
        let k = try device.tensor(randn(B * Hkv * L * D), shape: [B, Hkv, L, D])
        let v = try device.tensor(randn(B * Hkv * L * D), shape: [B, Hkv, L, D])
        let dO = try device.tensor(randn(B * Hq * L * D), shape: [B, Hq, L, D])
        let dLSE = try device.tensor(randn(B * Hq * L), shape: [B, Hq, L])
        let sinkValues: [Float] = [0.3, -1.2, 1.7, 0.0]
        let sinks = try device.tensor(sinkValues, shape: [Hq], name: "sinks")
        let lens: [Int32] = [30, 11]
        let lengths = try device.tensor(lens, shape: [B])
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv - 3 }, B: 1, H: 1, qLen: L, kvLen: L, device: device, blockSize: 8)
        let fwd = try flexAttention(q, k, v, blockMask: causal, enableGQA: true, kvLengths: lengths, sinks: sinks, returnLSE: true)
        let g = try fwd.backward(gradOutput: dO, gradLSE: dLSE)
        let ref = try flexAttentionBackwardReference(q, k, v, gradOutput: dO, gradLSE: dLSE, blockMask: causal, enableGQA: true,
                                                     kvLengths: lens.map(Int.init), sinks: sinkValues)
        for (name, t, r) in [("dq", g.dq, ref.dq), ("dk", g.dk, ref.dk), ("dv", g.dv, ref.dv), ("dsinks", g.dsinks!, ref.dsinks)] {
            XCTAssertLessThan(relativeL2Error(try t.toArray(), r), 1e-4, name)
        }
        // Keys past a batch's length get no gradient.
        let dk = try g.dk.toArray()
        XCTAssertTrue((0..<Hkv).allSatisfy { h in ((11 * D)..<(L * D)).allSatisfy { dk[((1 * Hkv + h) * L) * D + $0] == 0 } })
        // dsink by central differences of the float64 forward.
        let dOv = try dO.toArray().map(Double.init), dLv = try dLSE.toArray().map(Double.init)
        func loss(_ s: [Float]) throws -> Double {
            let f = try flexAttentionReference(q, k, v, blockMask: causal, enableGQA: true, kvLengths: lens.map(Int.init), sinks: s)
            return zip(f.output, dOv).reduce(0) { $0 + $1.0 * $1.1 } + zip(f.lse, dLv).reduce(0) { $0 + $1.0 * $1.1 }
        }
        for h in 0..<Hq {
            var up = sinkValues, down = sinkValues
            up[h] += 1e-3; down[h] -= 1e-3
            let numeric = (try loss(up) - loss(down)) / (Double(up[h]) - Double(down[h]))
            XCTAssertEqual(ref.dsinks[h], numeric, accuracy: 1e-3 * max(1, abs(numeric)), "head \(h)")
        }
    }
}

extension BackwardTests {
    /// `prepareFlexAttention(..., backward: true)` builds the backward's pipelines: the call after
    /// it compiles nothing.
    func testPrepareBuildsTheBackwardAheadOfTime() throws {
        let q = try device.tensor(randn(2 * 24 * 12), shape: [1, 2, 24, 12])
        let mod = ScoreMod { s, _, _, q, kv in s * 0.5 + (q - kv) * 0.01 }   // a mod no other test builds
        try prepareFlexAttention(q, q, q, scoreMod: mod, backward: true)
        let before = ShaderCompiler.shared.compilations
        let fwd = try flexAttention(q, q, q, scoreMod: mod, returnLSE: true)
        _ = try fwd.backward(gradOutput: q).dq.toArray()
        XCTAssertEqual(ShaderCompiler.shared.compilations, before, "no compile after prepare")
        // The matrix passes, forced the same way in both calls.
        let h = try device.tensor(randn(2 * 24 * 16), shape: [1, 2, 24, 16], dtype: .float16)
        let generic = FlexOptions(kernel: .coopmatGeneric)
        try prepareFlexAttention(h, h, h, scoreMod: mod, backward: true, options: generic)
        let afterPrepare = ShaderCompiler.shared.compilations
        let g = try flexAttention(h, h, h, scoreMod: mod, returnLSE: true, options: generic).backward(gradOutput: h, options: generic)
        _ = try g.dq.toArray()
        XCTAssertEqual(g.kernel, .coopmatGeneric)
        XCTAssertEqual(ShaderCompiler.shared.compilations, afterPrepare, "no compile after prepare (matrix passes)")
    }
}

extension BackwardTests {
    /// Strided inputs (permuted views of [B, L, H, D] buffers) and a per-head BlockMask under GQA
    /// (each query head of a group walks its own transposed block lists).
    func testStridedInputsAndPerHeadMasksUnderGQA() throws {
        let (B, Hq, Hkv, L, D) = (2, 4, 2, 48, 8)
        func view(_ H: Int) throws -> Tensor {
            try device.tensor(randn(B * L * H * D), shape: [B, L, H, D]).permuted(0, 2, 1, 3)
        }
        let q = try view(Hq), k = try view(Hkv), v = try view(Hkv), dO = try view(Hq)
        // Head h keeps keys within a window of 4 + 8h: a different block structure per head.
        let window = MaskMod { _, h, q, kv in (q >= kv) & (q - kv <= h * 8 + 4) }
        let mask = try createBlockMask(window, B: 1, H: Hq, qLen: L, kvLen: L, device: device, blockSize: 8)
        let fwd = try flexAttention(q, k, v, blockMask: mask, enableGQA: true, returnLSE: true)
        let g = try fwd.backward(gradOutput: dO)
        let ref = try flexAttentionBackwardReference(q, k, v, gradOutput: dO, blockMask: mask, enableGQA: true)
        for (name, t, r) in [("dq", g.dq, ref.dq), ("dk", g.dk, ref.dk), ("dv", g.dv, ref.dv)] {
            XCTAssertLessThan(relativeL2Error(try t.toArray(), r), 1e-4, name)
        }
    }
}

/// The dQ and dK/dV passes through cooperative matrices (flex_attention_bwd_mm.comp), with no
/// assumption about element order or subgroup size. Lavapipe has no cooperative matrices: forced
/// there, the passes run their products as scalar loops over the same shared tiles, and the rest
/// of the kernel (staging, walks, P and dS, the gradients' bookkeeping and splits) as on a GPU.
extension BackwardTests {
    func testMatrixPassesMatchTheReference() throws {
        let causal = MaskMod { _, _, q, kv in q >= kv }
        let cases = [
            Case(name: "mm dense D=32", Lq: 45, Lkv: 45, D: 32, Dv: 32, dtype: .float16),
            Case(name: "mm causal soft-cap GQA", Hq: 4, Hkv: 2, Lq: 70, Lkv: 70, D: 16, Dv: 16, dtype: .float16,
                 score: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, mask: causal, blockSize: 32),
            Case(name: "mm Lq != Lkv, D != Dv, empty rows, dLSE", B: 2, Lq: 33, Lkv: 50, D: 16, Dv: 32, dtype: .float16,
                 mask: MaskMod { _, _, q, kv in kv <= q - 5 }, gradLSE: true),
            Case(name: "mm D=64 sliding window", Hq: 1, Hkv: 1, Lq: 80, Lkv: 80, D: 64, Dv: 64, dtype: .float16,
                 mask: MaskMod { _, _, q, kv in (q >= kv) & (q - kv < 24) }, blockSize: 16),
            // A GQA group of 4 heads over 128-row blocks: under lavapipe's loop cap one block's
            // work for the whole group did not fit a split; splits share out (head, block) units.
            Case(name: "mm GQA group of 4, 128-row blocks", Hq: 8, Hkv: 2, Lq: 256, Lkv: 256, D: 64, Dv: 64, dtype: .float16,
                 score: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, mask: causal, blockSize: 128),
            // bfloat16 operands (P and dS rounded to bfloat16 in the emulation, as the matrices take them).
            Case(name: "mm bfloat16 causal soft-cap GQA", Hq: 4, Hkv: 2, Lq: 50, Lkv: 61, D: 32, Dv: 16, dtype: .bfloat16,
                 score: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, mask: causal),
        ]
        for var c in cases {
            c.kernel = .coopmatGeneric
            try check(c)
        }
    }

    func testMatrixPassesOnLongRowsAndTheirRules() throws {
        // Long rows: the emulated passes' loops count against lavapipe's cap, so they split too.
        let (Lq, Lkv, D) = (3, 6_000, 32)
        let q = try device.tensor(randn(Lq * D), shape: [1, 1, Lq, D], dtype: .float16)
        let k = try device.tensor(randn(Lkv * D), shape: [1, 1, Lkv, D], dtype: .float16)
        let v = try device.tensor(randn(Lkv * D), shape: [1, 1, Lkv, D], dtype: .float16)
        let dO = try device.tensor(randn(Lq * D), shape: [1, 1, Lq, D], dtype: .float16)
        let fwd = try flexAttention(q, k, v, returnLSE: true, options: FlexOptions(kernel: .portable))
        let g = try flexAttentionBackward(q, k, v, output: fwd.output, lse: fwd.lse!, gradOutput: dO, options: FlexOptions(kernel: .coopmatGeneric))
        let ref = try flexAttentionBackwardReference(q, k, v, gradOutput: dO)
        for (name, t, r) in [("dq", g.dq, ref.dq), ("dk", g.dk, ref.dk), ("dv", g.dv, ref.dv)] {
            XCTAssertLessThanOrEqual(relativeL2Error(try t.toArray(), r), 5e-3, name)
        }
        // float32 is never narrowed; forward-only kernels are named.
        let q32 = try device.tensor(randn(8 * 16), shape: [1, 1, 8, 16])
        let f32 = try flexAttention(q32, q32, q32, returnLSE: true)
        XCTAssertThrowsError(try flexAttentionBackward(q32, q32, q32, output: f32.output, lse: f32.lse!, gradOutput: q32,
                                                       options: FlexOptions(kernel: .coopmatGeneric))) {
            XCTAssertTrue("\($0)".contains("float16 and bfloat16 inputs only (got float32)"), "\($0)")
        }
        XCTAssertThrowsError(try flexAttentionBackward(q32, q32, q32, output: f32.output, lse: f32.lse!, gradOutput: q32,
                                                       options: FlexOptions(kernel: .splitKV))) {
            XCTAssertTrue("\($0)".contains("the backward runs the portable, coopmat-nv or coopmat-generic kernel"), "\($0)")
        }
        XCTAssertEqual(try flexAttentionBackward(q32, q32, q32, output: f32.output, lse: f32.lse!, gradOutput: q32).kernel, .portable,
                       "lavapipe: no cooperative matrices, the portable passes")
    }

    /// A soft-capped causal backward's splice and the shader library that compiles its passes.
    func softCapCausalLibrary() throws -> (SplicedMods, ShaderLibrary) {
        let mods = try SplicedMods(score: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, mask: MaskMod { _, _, q, kv in q >= kv },
                                   firstBinding: BackwardBinding.firstCapture, errorBinding: BackwardBinding.errors.rawValue, device: device)
        var library = ShaderLibrary.standard
        library.files.merge(mods.includes) { _, new in new }
        library.files[BackwardParams.includeName] = BackwardParams.glsl
        return (mods, library)
    }

    /// The matrix passes' cooperative-matrix form compiles and rewrites for the KHR extension for
    /// the shapes and subgroup sizes other vendors list (lavapipe cannot run it).
    func testMatrixPassesCompileForEveryShape() throws {
        let (mods, library) = try softCapCausalLibrary()
        var compiled = 0
        for (m, n, k, sg) in [(16, 16, 16, 32), (16, 16, 16, 64), (8, 16, 16, 16), (8, 8, 16, 8)] {
            let shape = CooperativeMatrixShape(m: m, n: n, k: k, a: "float16", b: "float16", c: "float32", result: "float32")
            for (D, Dv) in [(64, 64), (128, 128), (32, 64)] {
                guard let t = AttentionPlanner.backwardMMTiles(D: D, Dv: Dv, subgroupSize: sg, shapes: [shape], sharedMemory: 48 << 10,
                                                              maxInvocations: 1024) else {
                    return XCTFail("\(m)x\(n)x\(k) sg \(sg) D=\(D)/\(Dv): no backward tiles")
                }
                for (pass, dtype) in [(1, DType.float16), (2, .float16)] + (sg == 32 ? [(1, .bfloat16), (2, .bfloat16)] : []) {
                    let plan = AttentionPlan(pass: .backward(pass), kernel: .coopmatGeneric, dtype: dtype, D: D, Dv: Dv, tiles: .generic(t),
                                             typedOperands: true, pushParams: pass == 1, mods: mods.glsl.source)
                    let spirv = try ShaderCompiler.shared.compile(try plan.source(), library: library)
                    let khr = try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: sg)
                    XCTAssertFalse(CooperativeMatrixKHRRewriter.usesNVCooperativeMatrix(khr))
                    if plan.bfloat16Operands { try assertBFloat16Operands(try BFloat16Retyper.retype(khr), "pass \(pass) D=\(D)/\(Dv)") }
                    compiled += 1
                }
            }
        }
        XCTAssertEqual(compiled, 30)
    }

    /// The portable passes as a GPU gets them (`VKF_UNROLL_ACC`: accumulator loops unrolled) compile
    /// for every dtype and the head dims whose accumulator counts differ most (lavapipe, a CPU
    /// device, runs the loops as loops: the other backward tests).
    func testPortablePassesCompileUnrolledForGPUs() throws {
        let (mods, library) = try softCapCausalLibrary()
        for dtype in [DType.float32, .float16, .bfloat16] {
            for (D, Dv) in [(16, 16), (64, 64), (256, 96)] {
                for pass in [1, 2] {
                    var plan = AttentionPlan(pass: .backward(pass), kernel: .portable, dtype: dtype, D: D, Dv: Dv, tiles: .backward(BQ: 16, BKV: 16, WG: 128),
                                             pushParams: true, mods: mods.glsl.source)
                    plan.unrollAccumulators = true
                    let source = try plan.source()
                    XCTAssertTrue(source.defines.contains { $0.name == "VKF_UNROLL_ACC" && $0.value == "1" })
                    XCTAssertFalse(try ShaderCompiler.shared.compile(source, library: library).isEmpty, "pass \(pass) D=\(D)/\(Dv) \(dtype)")
                }
            }
        }
    }

    /// The coopmat-nv passes (flex_attention_bwd_nv.comp, NVIDIA's layout) compile, and rewrite
    /// for the KHR extension (bfloat16 retyped), for the head dims and tiles the planner gives
    /// (lavapipe cannot run them: `vkflex selftest` on an NVIDIA GPU does); and the planner's rules.
    func testNVPassesCompileAndTheirRules() throws {
        let (mods, library) = try softCapCausalLibrary()
        var compiled = 0
        for (D, forced) in [(16, nil), (64, nil), (96, nil), (128, nil), (128, BackwardNVTiles(nsg: 4, step: 16, ownShared: true)),
                            (128, BackwardNVTiles(nsg: 2, step: 32, prefetch: true)), (64, BackwardNVTiles(nsg: 8, step: 64)),
                            (128, BackwardNVTiles(nsg: 4, step: 64, prefetch: true, splitDKV: true)),
                            (64, BackwardNVTiles(nsg: 4, step: 32, prefetch: true, rpw: 2)), (48, BackwardNVTiles(nsg: 2, step: 48, ownShared: true, rpw: 2)),
                            (128, BackwardNVTiles(nsg: 4, step: 32, prefetch: true, splitDKV: true, rpw: 2))] {
            guard let t = AttentionPlanner.backwardNVTiles(D: D, sharedMemory: 48 << 10, pass: 2, forced: forced) else { return XCTFail("D=\(D): no coopmat-nv backward tiles") }
            XCTAssertEqual(t.BQ, 16 * (forced?.rpw ?? 1) * (forced?.nsg ?? 8), "D=\(D): subgroups of 16 rows, or 32")
            XCTAssertEqual(t.BKV, forced?.step ?? (D <= 64 ? 64 : 32), "D=\(D)")
            XCTAssertEqual(t.prefetch, forced?.prefetch ?? true, "D=\(D): the next step prefetched")
            // With the dK/dV pass split: its dV half (pass 2) and dK half (6).
            let passes = t.splitDKV ? [(1, DType.float16), (2, .float16), (6, .float16), (2, .bfloat16), (6, .bfloat16)]
                                    : [(1, DType.float16), (2, .float16), (1, .bfloat16), (2, .bfloat16)]
            for (pass, dtype) in passes {
                for typed in [false, true] where typed || dtype == .float16 {
                    var tiles = t
                    if t.splitDKV, pass != 1 { tiles.dkvHalf = pass == 6 ? 2 : 1 }
                    let plan = AttentionPlan(pass: .backward(pass == 6 ? 2 : pass), kernel: .coopmatNV, dtype: dtype, D: D, Dv: D, tiles: .generic(tiles),
                                             typedOperands: typed, pushParams: pass == 1, mods: mods.glsl.source)
                    XCTAssertEqual(try plan.source().name, "flex_attention_bwd_nv")
                    let spirv = try ShaderCompiler.shared.compile(try plan.source(), library: library)
                    XCTAssertTrue(CooperativeMatrixKHRRewriter.usesNVCooperativeMatrix(spirv))
                    if typed {
                        let khr = try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: 32)
                        XCTAssertFalse(CooperativeMatrixKHRRewriter.usesNVCooperativeMatrix(khr))
                        try CooperativeMatrixKHRRewriter.verify(khr)
                        if plan.bfloat16Operands { try assertBFloat16Operands(try BFloat16Retyper.retype(khr), "nv pass \(pass) D=\(D)") }
                    }
                    compiled += 1
                }
            }
        }
        XCTAssertEqual(compiled, 50 + 6 + 6 + 8)
        // A captured ALiBi slope: read once per head (vkf_prologue), in both passes, for NV and KHR.
        let slopes = try device.tensor([0.5, 0.25, 0.125, 0.0625], shape: [4], name: "slopes")
        let alibi = try SplicedMods(score: ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }, mask: MaskMod { _, _, q, kv in q >= kv },
                                    firstBinding: BackwardBinding.firstCapture, errorBinding: BackwardBinding.errors.rawValue, device: device)
        XCTAssertTrue(alibi.glsl.source.contains("void vkf_prologue(int b, int h)"))
        var alibiLibrary = library
        alibiLibrary.files.merge(alibi.includes) { _, new in new }
        for D in [64, 128] {
            for pass in [1, 2] {
                let t = try XCTUnwrap(AttentionPlanner.backwardNVTiles(D: D, sharedMemory: 48 << 10, pass: pass))
                let plan = AttentionPlan(pass: .backward(pass), kernel: .coopmatNV, dtype: .float16, D: D, Dv: D, tiles: .generic(t),
                                         typedOperands: true, pushParams: pass == 1, mods: alibi.glsl.source)
                let spirv = try ShaderCompiler.shared.compile(try plan.source(), library: alibiLibrary)
                try CooperativeMatrixKHRRewriter.verify(try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: 32))
            }
        }
        // A document mask (captured ids read at q_idx and at kv_idx): each owned row's and staged
        // column's id loaded once (VKF_HAS_MASK_RC), in both passes, one and two row blocks.
        let ids = try device.tensor([Int32](repeating: 0, count: 64), shape: [64], name: "doc")
        let document = try SplicedMods(score: nil, mask: MaskMod { _, _, q, kv in (ids[q] == ids[kv]) & (q >= kv) },
                                       firstBinding: BackwardBinding.firstCapture, errorBinding: BackwardBinding.errors.rawValue, device: device)
        XCTAssertTrue(document.glsl.source.contains("#define VKF_HAS_MASK_RC 1"))
        var documentLibrary = library
        documentLibrary.files.merge(document.includes) { _, new in new }
        for (D, rpw) in [(64, 1), (64, 2), (128, 1)] {
            var forced = BackwardNVTiles(nsg: 4, step: 32, prefetch: true)
            forced.rpw = rpw
            let t = try XCTUnwrap(AttentionPlanner.backwardNVTiles(D: D, sharedMemory: 48 << 10, forced: rpw == 1 ? nil : forced))
            for pass in [1, 2] {
                let plan = AttentionPlan(pass: .backward(pass), kernel: .coopmatNV, dtype: .float16, D: D, Dv: D, tiles: .generic(t),
                                         typedOperands: pass == 2, pushParams: pass == 1, mods: document.glsl.source)
                let spirv = try ShaderCompiler.shared.compile(try plan.source(), library: documentLibrary)
                if pass == 2 { try CooperativeMatrixKHRRewriter.verify(try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: 32)) }
            }
        }
        // Tiles that do not fit are refused, by name where forced; lavapipe has no cooperative matrices.
        XCTAssertNil(AttentionPlanner.backwardNVTiles(D: 128, sharedMemory: 48 << 10, forced: BackwardNVTiles(nsg: 8, step: 128)))
        XCTAssertNil(AttentionPlanner.backwardNVTiles(D: 128, sharedMemory: 48 << 10, forced: BackwardNVTiles(nsg: 4, step: 32, ownShared: true)))
        XCTAssertNotNil(AttentionPlanner.backwardNVTiles(D: 128, sharedMemory: 48 << 10, forced: BackwardNVTiles(nsg: 2, step: 64)))
        // Blocks smaller than the tiles: the workgroup and the step shrink to the block.
        for (D, rows, nsg, step) in [(64, 64, 4, 64), (64, 32, 2, 32), (128, 16, 1, 16), (128, 64, 4, 64), (64, 128, 8, 64), (64, 48, 3, 48)] {
            let t = AttentionPlanner.backwardNVTiles(D: D, sharedMemory: 48 << 10, blockRows: rows)
            XCTAssertEqual([t?.NSG, t?.BKV], [nsg, step], "D=\(D), blocks of \(rows)")
        }
        // Above D = 64 the passes differ: the dQ pass 64 rows a step without prefetch, the dK/dV pass 32 with it.
        for (D, pass, step, prefetch) in [(64, 1, 64, true), (64, 2, 64, true), (128, 1, 64, false), (128, 2, 32, true), (96, 1, 64, false), (96, 2, 32, true)] {
            let t = try XCTUnwrap(AttentionPlanner.backwardNVTiles(D: D, sharedMemory: 48 << 10, pass: pass))
            XCTAssertEqual([t.NSG, t.BKV], [8, step], "D=\(D), pass \(pass)")
            XCTAssertEqual(t.prefetch, prefetch, "D=\(D), pass \(pass)")
        }
        // The owned rows pass through the staging area a step at a time, so the default tiles leave
        // room for two workgroups in the ~48 KiB an NVIDIA SM's workgroups share.
        XCTAssertEqual(AttentionPlanner.backwardNVSharedBytes(D: 128, nsg: 8, step: 32), 2 * 32 * 17 * 16 + 12 * 32)
        XCTAssertLessThanOrEqual(AttentionPlanner.backwardNVSharedBytes(D: 64, nsg: 8, step: 64), 24 << 10)
        // The dK/dV pass's tiles apart from the dQ pass's: the split is the dK/dV pass's alone.
        XCTAssertEqual(AttentionPlanner.backwardNVTiles(D: 64, sharedMemory: 48 << 10, pass: 1, forced: BackwardNVTiles(nsg: 4, step: 64, splitDKV: true))?.splitDKV, false)
        XCTAssertEqual(AttentionPlanner.backwardNVSharedBytes(D: 64, nsg: 4, step: 32, ownShared: true, rpw: 2), 2 * (32 + 128) * 9 * 16 + 12 * 32)
        for bad in ["4x40", "4x16xq", "9x16", "4", "4x16x", "4x16xss", "4x64xkk", "4x16/", "/4x16", "4x16/4x16/4x16", "4x16xrr", "x:4x16", "0:4x16", "128:", "64:128:4x16", "64:4x16,64:4x32", "4x16,", "4x16,4x32"] {
            XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_BWD_TILES": bad])) {
                XCTAssertTrue("\($0)".contains("VKFLEX_BWD_TILES=\(bad): use NSGxSTEP[xFLAGS]"), "\($0)")
            }
        }
        for (given, read) in [("2x32", "2x32"), ("4x16xs", "4x16xs"), ("8x64xp", "8x64xp"), ("4x16xps", "4x16xsp"), ("4x64xkp", "4x64xpk"),
                              ("4x32xrp", "4x32xpr"), ("8x64xp/4x32xpr", "8x64xp/4x32xpr")] {
            let tuning = try AttentionTuning.parse(["VKFLEX_BWD_TILES": given])
            XCTAssertEqual([tuning.backwardTiles(pass: 1, D: 64), tuning.backwardTiles(pass: 2, D: 64)].map { "\($0!)" }.joined(separator: "/"),
                           read.contains("/") ? read : read + "/" + read)
        }
        // A head dim first: those calls only; the others keep the planner's tiles.
        let only128 = try AttentionTuning.parse(["VKFLEX_BWD_TILES": "128:8x64xp/8x32"])
        XCTAssertEqual(only128.backwardTiles(pass: 1, D: 128)?.description, "8x64xp")
        XCTAssertEqual(only128.backwardTiles(pass: 2, D: 128)?.description, "8x32")
        XCTAssertNil(only128.backwardTiles(pass: 1, D: 64))
        XCTAssertNil(only128.backwardTiles(pass: 2, D: 64))
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_BWD_TILES": "4x32"]).backwardTiles(pass: 2, D: 64)?.description, "4x32")
        // Entries for several head dims, and one for the rest.
        let each = try AttentionTuning.parse(["VKFLEX_BWD_TILES": "64:8x64/8x128xp,128:8x64/8x32xp,4x16"])
        XCTAssertEqual(each.backwardTiles(pass: 1, D: 64)?.description, "8x64")
        XCTAssertEqual(each.backwardTiles(pass: 2, D: 64)?.description, "8x128xp")
        XCTAssertEqual(each.backwardTiles(pass: 2, D: 128)?.description, "8x32xp")
        XCTAssertEqual(each.backwardTiles(pass: 2, D: 96)?.description, "4x16")
        // The dQ and dK/dV passes side by side (the default) or with a barrier between them: the same bits.
        XCTAssertTrue(try AttentionTuning.parse([:]).backwardOverlap)
        XCTAssertFalse(try AttentionTuning.parse(["VKFLEX_BWD_OVERLAP": "0"]).backwardOverlap)
        XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_BWD_OVERLAP": "yes"])) {
            XCTAssertTrue("\($0)".contains("VKFLEX_BWD_OVERLAP=yes: use 1"), "\($0)")
        }
        let serial = try device(with: ["VKFLEX_BWD_OVERLAP": "0"])
        var grads: [[Float]] = []
        let values = randn(2 * 48 * 16)
        for dev in [device!, serial] {
            let x = try dev.tensor(values, shape: [1, 2, 48, 16])
            let f = try flexAttention(x, x, x, returnLSE: true)
            let g = try flexAttentionBackward(x, x, x, output: f.output, lse: f.lse!, gradOutput: x)
            grads.append(try g.dq.toArray() + g.dk.toArray() + g.dv.toArray())
        }
        XCTAssertEqual(grads[0], grads[1])
        let q = try device.tensor(randn(8 * 16), shape: [1, 1, 8, 16], dtype: .float16)
        let f = try flexAttention(q, q, q, returnLSE: true, options: FlexOptions(kernel: .portable))
        XCTAssertThrowsError(try flexAttentionBackward(q, q, q, output: f.output, lse: f.lse!, gradOutput: q, options: FlexOptions(kernel: .coopmatNV))) {
            XCTAssertTrue("\($0)".contains("has no VK_NV_cooperative_matrix or VK_KHR_cooperative_matrix"), "\($0)")
        }
    }
}
