import Foundation
import XCTest
@testable import VKFlexExpr

final class DerivativeTests: XCTestCase {
    /// Every function and operator, differentiated symbolically, against central differences.
    func testDerivativesMatchFiniteDifferences() throws {
        let bias = HostTensor(name: "bias", float32: [0.5, -1.25, 2], shape: [3])
        let cases = [
            "score", "score + 3", "2 - score", "score * score", "score / 3", "3 / score", "-score",
            "score ** 3", "score ** 2.5", "2.0 ** score", "score ** score",
            "score % 0.7", "score // 2", "exp(score)", "exp2(score)", "log(score)", "log2(score)", "sqrt(score)",
            "tanh(score)", "sin(score)", "cos(score)", "tan(score)", "sigmoid(score)", "abs(score)", "floor(score)",
            "clamp(score, 0.5, 1.5)", "clamp(score, 1, score * 2)", "minimum(score, 1.2)", "maximum(score, score * score)",
            "where(score > 1, score * 2, exp(score))", "20 * tanh(score / 20)", "score + bias[h] * (kv_idx - q_idx)",
            "score * where(q_idx >= kv_idx, 1.0, 0.0)", "sigmoid(score * bias[kv_idx]) * score",
        ]
        for text in cases {
            let g = try ScoreMod(parsing: text, captures: ["bias": bias]).graph
            let dg = g.derivative()
            XCTAssertFalse(dg.uses(.score) && !g.uses(.score))
            let f = try Interpreter(g), df = try Interpreter(dg)
            for score in [0.37, 0.9, 1.31, 1.77, 2.6] {
                for (q, kv, h) in [(3, 1, 0), (1, 2, 2)] {
                    let eps = 1e-6
                    let num = (f.float(score: score + eps, b: 0, h: h, q: q, kv: kv) - f.float(score: score - eps, b: 0, h: h, q: q, kv: kv)) / (2 * eps)
                    let sym = df.float(score: score, b: 0, h: h, q: q, kv: kv)
                    XCTAssertEqual(sym, num, accuracy: 1e-5 * max(1, abs(num)), "d/dscore \(text) at \(score): \(dg.text)")
                }
            }
        }
    }

    func testPyTorchConventionsAtKinks() throws {
        func d(_ text: String, at score: Double) throws -> Double {
            try Interpreter(ScoreMod(parsing: text).graph.derivative()).float(score: score, b: 0, h: 0, q: 0, kv: 0)
        }
        XCTAssertEqual(try d("abs(score)", at: 0), 0)
        XCTAssertEqual(try d("maximum(score, 1.0)", at: 1), 0.5)
        XCTAssertEqual(try d("clamp(score, 0.0, 1.0)", at: 1), 1)
        XCTAssertEqual(try d("clamp(score, 0.0, 1.0)", at: 1.5), 0)
    }

    func testSimplification() throws {
        XCTAssertEqual(ScoreMod.identity.graph.derivative(), .float(1))
        XCTAssertEqual(try ScoreMod(parsing: "score + q_idx * 2").graph.derivative(), .float(1))
        XCTAssertEqual(try ScoreMod(parsing: "score * 3.0").graph.derivative(), .float(3))
        XCTAssertEqual(try ScoreMod(parsing: "q_idx * 2.0").graph.derivative(), .float(0))
    }
}

/// Derivatives by captured tensors' elements: the symbolic one by each load, reverse mode, and
/// central differences of the capture's values, all three at once.
final class CaptureDerivativeTests: XCTestCase {
    func testSymbolicReverseModeAndFiniteDifferencesAgree() throws {
        let biasValues: [Float] = [0.75, -1.25, 2], wValues: [Float] = [0.5, -0.3, 1.1, 0.2]
        let bias = HostTensor(name: "bias", float32: biasValues, shape: [3])
        let w = HostTensor(name: "w", float32: wValues, shape: [2, 2])
        let cases = [
            "score + bias[kv_idx % 3]", "score * bias[h] * bias[h]", "tanh(score * bias[h]) + bias[q_idx - kv_idx + 1]",
            "where(bias[h] > 0.5, score * bias[h], exp(bias[kv_idx % 3]))", "score + w[h % 2, kv_idx % 2] ** 2",
            "clamp(score, bias[1], bias[2])", "minimum(score, bias[0] * 3) + maximum(bias[1], w[1, 0])",
            "score / bias[2] - sqrt(abs(w[0, 0])) * log(bias[2])", "20 * tanh((score + bias[-1] * (kv_idx - q_idx)) / 20)",
            "sigmoid(w[0, 1] * score) * score + floor(bias[0]) + where(bias[1] > 0, 1.0, 0.0)",
        ]
        let ids = [bias.captureInfo.id: (biasValues, 3), w.captureInfo.id: (wValues, 4)]
        for text in cases {
            let g = try ScoreMod(parsing: text, captures: ["bias": bias, "w": w]).graph
            let reverse = try ReverseMode(g)
            for (score, q, kv, h) in [(0.37, 3, 1, 0), (1.31, 1, 2, 1), (2.6, 2, 2, 2)] {
                let point = reverse.evaluate(score: score, b: 0, h: h, q: q, kv: kv)
                // Symbolic: the derivative by each load, added to the element it reads.
                var symbolic: [Int: [Int: Double]] = [:]
                for load in g.floatLoads {
                    guard case .load(let cap, let idx) = load else { continue }
                    var flat = 0
                    for (d, i) in idx.enumerated() {
                        var x = Int(try Interpreter(i).int(b: 0, h: h, q: q, kv: kv, score: score))
                        if x < 0 { x += cap.shape[d] }
                        flat = flat * cap.shape[d] + x
                    }
                    symbolic[cap.id, default: [:]][flat, default: 0] += try Interpreter(g.derivative(withRespectTo: load)).float(score: score, b: 0, h: h, q: q, kv: kv)
                }
                for (id, (values, n)) in ids {
                    for e in 0..<n {
                        var up = values, down = values
                        let eps: Float = 1e-3
                        up[e] += eps; down[e] -= eps
                        let fu = try Interpreter(g, captures: [id: .float32(up)]).float(score: score, b: 0, h: h, q: q, kv: kv)
                        let fd = try Interpreter(g, captures: [id: .float32(down)]).float(score: score, b: 0, h: h, q: q, kv: kv)
                        let numeric = (fu - fd) / Double(up[e] - down[e])
                        let sym = symbolic[id]?[e] ?? 0, rev = point.captures[id]?[e] ?? 0
                        XCTAssertEqual(sym, rev, accuracy: 1e-9 * max(1, abs(rev)), "\(text): symbolic vs reverse mode, element \(e)")
                        XCTAssertEqual(rev, numeric, accuracy: 2e-3 * max(1, abs(numeric)), "\(text): reverse mode vs central differences, element \(e)")
                    }
                }
                let dScore = try Interpreter(g.derivative()).float(score: score, b: 0, h: h, q: q, kv: kv)
                XCTAssertEqual(point.dScore, dScore, accuracy: 1e-9 * max(1, abs(dScore)), "\(text): d/dscore")
            }
        }
    }

    func testEmittedCaptureGradients() throws {
        let rb = HostTensor(name: "rb", float32: [Float](repeating: 0, count: 127), shape: [127])
        let mod = try ScoreMod(parsing: "score + rb[q_idx - kv_idx + 63]", captures: ["rb": rb])
        let out = try GLSLEmitter.emit(scoreMod: mod.graph, maskMod: nil, firstBinding: 30, errorBinding: 29, gradCaptures: [rb.captureInfo])
        XCTAssertEqual(out.captureGradientTerms, 1)
        XCTAssertTrue(out.source.contains("""
        #define VKF_CAP_GRAD_TERMS 1
        int vkf_flat0(int i0) {
            int w0 = i0 < 0 ? i0 + 127 : i0;
            if (w0 < 0 || w0 >= 127) return -1;
            return w0;
        }
        void score_mod_cap_grads(float score, int b, int h, int q_idx, int kv_idx, float g) {
            int t0 = (q_idx - kv_idx);
            int t1 = (t0 + 63);
            VKF_CAP_GRAD_ADD(0, vkf_flat0(t1), 0, g * 1.0);
        }
        """), out.source)
        // Without gradCaptures nothing of it is emitted.
        XCTAssertFalse(try GLSLEmitter.emit(scoreMod: mod.graph, maskMod: nil, firstBinding: 30, errorBinding: 29).source.contains("cap_grads"))
    }
}
