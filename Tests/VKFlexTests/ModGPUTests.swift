import Foundation
import XCTest
@testable import VKFlex

/// Every test expression's GLSL compiles on lavapipe, and evaluating it on the GPU over an index
/// grid matches the CPU interpreter: exactly where the graph is int/bool throughout, within a
/// mixed tolerance for float graphs.
final class ModGPUTests: FlexTestCase {
    func captures() throws -> [String: Tensor] {
        [
            "doc": try device.tensor((0..<16).map { Int32($0 / 5) }, shape: [16], name: "doc"),
            "document_id": try device.tensor((0..<64).map { Int32($0 < 16 ? 0 : $0 < 40 ? 1 : 2) }, shape: [64], name: "document_id"),
            "lut": try device.tensor([3, 0, 4, 1, 2], shape: [5], name: "lut"),
            "slope": try device.tensor([0.5, 0.25, 0.125], shape: [3], name: "slope"),
            "alibi_bias": try device.tensor([0.5, 0.25, 0.125, 0.0625], shape: [4], name: "alibi_bias"),
            "tab": try device.tensor((0..<12).map { Float($0) * 0.5 - 2 }, shape: [4, 3], name: "tab"),
            "bounds": try device.tensor([0, 0, 1, 1, 2, 2], shape: [6], name: "bounds"),
            "intervals": try device.tensor([0, 5, 2, 9, 7, 13], shape: [3, 2], name: "intervals"),
            "offsets": try device.tensor([0, 10, 40, 64], shape: [4], name: "offsets"),
            "seq_idx": try device.tensor((0..<64).map { Int32($0 < 10 ? 0 : $0 < 40 ? 1 : 2) }, shape: [64], name: "seq_idx"),
            "image_boundaries": try device.tensor((0..<9).map { Int32($0 / 3) }, shape: [9], name: "image_boundaries"),
        ]
    }

    static let masks = [
        "True", "q_idx >= kv_idx", "(q_idx >= kv_idx) & (q_idx - kv_idx <= 8)", "(kv_idx <= 20) | (q_idx >= kv_idx)",
        "(q_idx >= kv_idx) & (document_id[q_idx] == document_id[kv_idx])",
        "(abs(q_idx // 8 - kv_idx // 8) <= 2) & (abs(q_idx % 8 - kv_idx % 8) <= 2)",
        "(abs(clamp(q_idx // 8, 1, 6) - kv_idx // 8) <= 1) & (abs(clamp(q_idx % 8, 1, 6) - kv_idx % 8) <= 1)",
        "(q_idx - offsets[seq_idx[q_idx]] >= kv_idx - offsets[seq_idx[kv_idx]]) & (seq_idx[q_idx] == seq_idx[kv_idx])",
        "(q_idx >= intervals[image_boundaries[kv_idx % 9], 0]) & (q_idx < intervals[image_boundaries[kv_idx % 9]][1])",
        "lut[lut[q_idx % 5] % 5] == kv_idx % 5", "(-q_idx) // 2 == kv_idx // -2", "(q_idx - 7) % -3 == kv_idx % 3 - 2",
        "(q_idx * 100000 * 100000) % 7 == kv_idx % 7", "(~q_idx & 7) == (kv_idx & 7)", "((q_idx ^ kv_idx) < 4) ^ (b == 1)",
        "~(q_idx >= kv_idx) | (kv_idx == 0)", "where(h > 0, q_idx >= kv_idx, q_idx <= kv_idx)", "2 ** (q_idx % 4) > kv_idx",
        "minimum(q_idx, kv_idx) * 2 == maximum(q_idx - 3, 0) + (b | h)",
        // Python's floor division and modulo for every sign, constant and computed divisors.
        "(q_idx - kv_idx) // 7 == (kv_idx - q_idx) % 5 - 2", "(q_idx - 6) // (kv_idx - 19) == (q_idx - 6) % (kv_idx - 19) + 1",
        "((q_idx - 6) * 3) % -4 == (kv_idx - 5) // -3", "((-2147483647 - 1 + q_idx * 0) // (kv_idx * 0 - 1)) < q_idx - 1000",
        "((-2147483647 - 1 + q_idx) % (kv_idx - 12)) == (kv_idx % 3) - 2", "(-2147483647 - 1 + kv_idx) // (q_idx + 1) < -100000",
    ]

    static let scores = [
        "score", "where(q_idx >= kv_idx, score, -inf)", "score + alibi_bias[h] * (q_idx - kv_idx)",
        "score + (q_idx - kv_idx) * exp2(-((h + 1) * 8.0 / 4))", "20 * tanh(score / 20)", "score / (kv_idx + 1)",
        "score * (q_idx / (kv_idx + 1))", "where((q_idx & 1) == 0, score, -score)", "abs(score) ** 0.5 + 2 ** (q_idx % 5)",
        "sigmoid(score) * tanh(score * 3)", "log(abs(score) + 1) + log2(q_idx + 1)", "sqrt(q_idx * 1.0 + kv_idx)",
        "sin(score) + cos(q_idx) + tan(b)", "minimum(score, 0.5) + maximum(q_idx, kv_idx)",
        "clamp(score, -1, 1) * clamp(q_idx - kv_idx, -3, 3)", "floor(score * 3) / 3", "where(q_idx > kv_idx, 1, 2.5) * score",
        "tab[q_idx % 4, kv_idx % 3] + score", "tab[-1, -2] * score + tab[q_idx % 4 - 4, 0]", "score * 2 ** -1.5 - 3 ** 2 ** 2 % 7",
        "-2 ** 2 + score % 0.75 + score // 0.5", "exp(score - 3) + q_idx // 3 * 1.5", "(q_idx - kv_idx) * 1e-3 + score * 2.5e1",
        "score * score * slope[h % 3]", "(-score) ** 3 + maximum(score, score * score)", "q_idx - kv_idx",
        "tanh(score * 4) + tanh(q_idx * 1e4 - score) + tanh(score * -1e30)", "2 * tanh(q_idx * 100000 * 100000 * 1e-9) + score",
        "tanh(q_idx * 2e38) + score",
    ]

    /// GLSL leaves `%` of negative ints undefined (and NVIDIA's driver differs from lavapipe), so
    /// the generated code must never divide or take a remainder of signed ints: the SPIR-V of a
    /// mod full of `//` and `%` holds no OpSDiv, OpSRem or OpSMod.
    func testIntegerDivisionNeverUsesSignedOperations() throws {
        let mask = try MaskMod(parsing: "((q_idx - kv_idx) // 7 == (kv_idx - q_idx) % 5) | ((q_idx - 3) // (kv_idx - 4) == q_idx % (kv_idx - 9))")
        let score = try ScoreMod(parsing: "score + ((q_idx - kv_idx) // 7) * 0.01 + ((q_idx - kv_idx) % 5) * 0.1")
        let mods = try SplicedMods(score: score, mask: mask, firstBinding: 5, errorBinding: 4, device: device)
        var library = ShaderLibrary.standard
        library.files.merge(mods.includes) { _, new in new }
        let words = try ShaderCompiler.shared.compile(ShaderSource(name: "mod_eval", text: try library.text("mod_eval.comp")), library: library)
        var opcodes = Set<UInt32>()
        var i = 5
        while i < words.count { opcodes.insert(words[i] & 0xFFFF); i += max(1, Int(words[i] >> 16)) }
        XCTAssertTrue(opcodes.contains(134) || opcodes.contains(137), "the helpers divide magnitudes as uint (OpUDiv/OpUMod)")
        for (op, name) in [(135, "OpSDiv"), (138, "OpSRem"), (139, "OpSMod")] {
            XCTAssertFalse(opcodes.contains(UInt32(op)), "\(name) in the generated SPIR-V: its result for negative operands is up to the driver")
        }
    }

    func testGeneratedCodeMatchesTheInterpreter() throws {
        let caps = try captures()
        let (B, H, Q, KV) = (2, 3, 13, 11)
        let n = B * H * Q * KV
        let scores = randn(n, scale: 2)
        for text in Self.masks {
            let mask = try MaskMod(parsing: text, captures: caps)
            let gpu = try ModEvaluator.evaluate(score: nil, mask: mask, B: B, H: H, Q: Q, KV: KV, scores: scores, device: device)
            let cpu = try Interpreter(mask.graph)
            var i = 0, bad = 0
            for b in 0..<B { for h in 0..<H { for q in 0..<Q { for kv in 0..<KV {
                if gpu.mask[i] != cpu.bool(b: b, h: h, q: q, kv: kv) { bad += 1 }
                i += 1
            }}}}
            XCTAssertEqual(bad, 0, "\(text): \(bad) of \(n) differ")
            XCTAssertNil(cpu.error)
        }
        for text in Self.scores {
            let mod = try ScoreMod(parsing: text, captures: caps)
            let gpu = try ModEvaluator.evaluate(score: mod, mask: nil, B: B, H: H, Q: Q, KV: KV, scores: scores, device: device)
            let cpu = try Interpreter(mod.graph, precision: .float32)
            let grad = try Interpreter(mod.graph.derivative(), precision: .float32)
            var i = 0, bad = 0, badGrad = 0
            func close(_ a: Float, _ b: Double) -> Bool {
                if a.isNaN || b.isNaN { return a.isNaN && b.isNaN }
                if a.isInfinite || b.isInfinite { return Double(a) == b }
                return abs(Double(a) - b) <= 1e-4 * (1 + abs(b))
            }
            for b in 0..<B { for h in 0..<H { for q in 0..<Q { for kv in 0..<KV {
                let s = Double(scores[i])
                if !close(gpu.scores[i], cpu.float(score: s, b: b, h: h, q: q, kv: kv)) {
                    bad += 1
                    if bad < 3 { XCTFail("\(text) at \(b),\(h),\(q),\(kv) score \(s): GPU \(gpu.scores[i]) CPU \(cpu.float(score: s, b: b, h: h, q: q, kv: kv))") }
                }
                if !close(gpu.gradients[i], grad.float(score: s, b: b, h: h, q: q, kv: kv)) { badGrad += 1 }
                i += 1
            }}}}
            XCTAssertEqual(bad, 0, "\(text)")
            XCTAssertEqual(badGrad, 0, "d/dscore \(text)")
            // The log2 forms the attention kernels take (score_mod_l2, score_mod_l2f): score_mod
            // times log2(e), with the factor folded into the mod's constants where it distributes.
            for form in [ModEvaluator.ScoreForm.log2, .log2FloatIndices] {
                let l2 = try ModEvaluator.evaluate(score: mod, mask: nil, B: B, H: H, Q: Q, KV: KV, scores: scores, form: form, device: device)
                var i = 0, bad = 0
                for b in 0..<B { for h in 0..<H { for q in 0..<Q { for kv in 0..<KV {
                    let expected = cpu.float(score: Double(scores[i]), b: b, h: h, q: q, kv: kv) * 1.4426950408889634
                    if !close(l2.scores[i], expected) {
                        bad += 1
                        if bad < 3 { XCTFail("\(text), \(form) at \(b),\(h),\(q),\(kv): GPU \(l2.scores[i]) CPU \(expected)") }
                    }
                    i += 1
                }}}}
                XCTAssertEqual(bad, 0, "\(text), \(form)")
            }
        }
    }

    /// The exact tanh (`VKF_EXACT_TANH`, forward calls that return the LSE) is within a few float
    /// roundings of float64's tanh everywhere, small arguments included, in the plain and the
    /// folded log2 form of a soft-cap; the fast one is ~1e-7 absolute, so its relative error at
    /// small arguments is orders larger (what put a soft-capped LSE at 2-3x PyTorch's error).
    func testExactTanhIsWithinAFewRoundings() throws {
        let (B, H, Q, KV) = (1, 1, 64, 64)
        // Magnitudes from 1e-6 to 40, both signs, and 0: each side of the polynomial's bound.
        let scores: [Float] = (0..<(Q * KV)).map { i in
            i == 0 ? 0 : Float((i % 2 == 0 ? 1.0 : -1.0) * 1e-6 * pow(4e7, Double(i) / Double(Q * KV)))
        }
        func worst(_ text: String, exact: Bool, form: ModEvaluator.ScoreForm, factor: Double) throws -> Double {
            let mod = try ScoreMod(parsing: text)
            let r = try ModEvaluator.evaluate(score: mod, mask: nil, B: B, H: H, Q: Q, KV: KV, scores: scores, form: form, exactTanh: exact, device: device)
            var worst = 0.0
            for (i, s) in scores.enumerated() {
                let expected = 20 * Foundation.tanh(Double(s) / 20) * factor
                let err = expected == 0 ? abs(Double(r.scores[i])) : abs(Double(r.scores[i]) / expected - 1)
                worst = max(worst, err)
            }
            return worst
        }
        for (form, factor) in [(ModEvaluator.ScoreForm.plain, 1.0), (.log2, 1.4426950408889634)] {
            let exact = try worst("20 * tanh(score / 20)", exact: true, form: form, factor: factor)
            XCTAssertLessThan(exact, 6e-7, "exact tanh, \(form): worst relative error \(exact)")
            let fast = try worst("20 * tanh(score / 20)", exact: false, form: form, factor: factor)
            XCTAssertGreaterThan(fast, 1e-3, "the fast tanh at small arguments (\(form)): \(fast)")
        }
        // Saturation and symmetry: ±1 at large arguments, never NaN there; NaN stays NaN.
        let mod = try ScoreMod(parsing: "tanh(score)")
        let big: [Float] = [0, 16, -16, 1e4, -1e4, 3e38, -3e38, .infinity, -.infinity, 0.55, -0.55, 0.5499999, .nan]
        let r = try ModEvaluator.evaluate(score: mod, mask: nil, B: 1, H: 1, Q: 1, KV: big.count, scores: big, exactTanh: true, device: device)
        for (s, t) in zip(big, r.scores) {
            if s.isNaN { XCTAssertTrue(t.isNaN, "tanh(nan) is \(t)"); continue }
            XCTAssertEqual(Double(t), Foundation.tanh(Double(s)), accuracy: 2e-7 * max(1, abs(Foundation.tanh(Double(s)))), "tanh(\(s))")
        }
    }

    func testSwiftClosuresAndTextBuildTheSamePipeline() throws {
        let docs = try device.tensor([0, 0, 1, 1], shape: [4], name: "docs")
        let closure = MaskMod { _, _, q, kv in (q >= kv) & (docs[q] == docs[kv]) }
        let text = try MaskMod(parsing: "(q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])", captures: ["docs": docs])
        XCTAssertEqual(closure.graph, text.graph)
        let scores = randn(4 * 4)
        let before = device.pipelineBuilds
        let a = try ModEvaluator.evaluate(score: nil, mask: closure, B: 1, H: 1, Q: 4, KV: 4, scores: scores, device: device)
        let b = try ModEvaluator.evaluate(score: nil, mask: text, B: 1, H: 1, Q: 4, KV: 4, scores: scores, device: device)
        XCTAssertEqual(a.mask, b.mask)
        XCTAssertLessThanOrEqual(device.pipelineBuilds - before, 1)
    }

    func testOutOfRangeCaptureIndexFailsWithANamedError() throws {
        let table = try device.tensor([1, 2, 3], shape: [3], name: "table")
        let mod = ScoreMod { s, _, _, q, _ in s + table[q] }
        XCTAssertThrowsError(try ModEvaluator.evaluate(score: mod, mask: nil, B: 1, H: 1, Q: 5, KV: 2, scores: randn(10), device: device)) { error in
            XCTAssertTrue("\(error)".contains("out of range for table (size 3)"), "\(error)")
        }
        // -1 .. -3 wrap once and are fine.
        let wrapped = ScoreMod { s, _, _, q, _ in s * 0 + table[0 - q - 1] }
        let r = try ModEvaluator.evaluate(score: wrapped, mask: nil, B: 1, H: 1, Q: 3, KV: 1, scores: [1, 1, 1], device: device)
        XCTAssertEqual(r.scores, [3, 2, 1])
        let div = try MaskMod(parsing: "q_idx // kv_idx == 0")
        XCTAssertThrowsError(try ModEvaluator.evaluate(score: nil, mask: div, B: 1, H: 1, Q: 2, KV: 2, scores: randn(4), device: device)) { error in
            XCTAssertTrue("\(error)".contains("division or modulo by zero"), "\(error)")
        }
    }

    func testCaptureProblemsAreCleanErrors() throws {
        // 16-bit float captures are read through a float32 copy.
        for dtype in [DType.float16, .bfloat16] {
            let half = try device.tensor([1.5, -2.25], shape: [2], dtype: dtype, name: "half")
            let m = ScoreMod { s, _, _, q, _ in s + half[q] }
            let r = try ModEvaluator.evaluate(score: m, mask: nil, B: 1, H: 1, Q: 2, KV: 1, scores: [0, 0], device: device)
            XCTAssertEqual(r.scores, [1.5, -2.25], "\(dtype)")
        }
        let host = HostTensor(name: "host", int32: [1], shape: [1])
        let hm = MaskMod { _, _, q, _ in host[q] == 1 }
        XCTAssertThrowsError(try ModEvaluator.evaluate(score: nil, mask: hm, B: 1, H: 1, Q: 1, KV: 1, scores: [0], device: device))
    }
}

extension ModGPUTests {
    /// The per-device cache of the mods' GLSL keeps no captured tensor alive, and a second call
    /// with the same mods (another capture of the same shape) reads its own tensor.
    func testTheModsCacheHoldsNoTensorAndReadsEachCallsCaptures() throws {
        let q = try device.tensor(randn(1 * 2 * 16 * 8), shape: [1, 2, 16, 8])
        weak var dropped: Tensor?
        do {
            let bias = try device.tensor([Float](repeating: 0.5, count: 2), shape: [2], name: "bias")
            dropped = bias
            _ = try flexAttention(q, q, q, scoreMod: ScoreMod { s, _, h, _, _ in s + bias[h] }).output.toArray()
            try device.synchronize()
        }
        XCTAssertNil(dropped, "nothing keeps the captured tensor alive once the work is done")
        for value: Float in [0, 3] {
            let bias = try device.tensor([value, -value], shape: [2], name: "bias")
            let mod = ScoreMod { s, _, h, _, _ in s + bias[h] }
            let got = try flexAttention(q, q, q, scoreMod: mod).output.toArray()
            let ref = try flexAttentionReference(q, q, q, scoreMod: mod)
            XCTAssertLessThan(relativeL2Error(got, ref.output), 1e-5, "bias \(value)")
        }
    }
}
