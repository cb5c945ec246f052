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
