import Foundation
import XCTest
@testable import VKFlexExpr

final class InterpreterTests: XCTestCase {
    func eval(_ text: String, score: Double = 0, b: Int = 0, h: Int = 0, q: Int = 0, kv: Int = 0,
              _ caps: [String: HostTensor] = [:]) throws -> Double {
        try Interpreter(ScoreMod(parsing: text, captures: caps).graph).float(score: score, b: b, h: h, q: q, kv: kv)
    }

    func testPythonIntegerSemantics() throws {
        XCTAssertEqual(try eval("q_idx // 3", q: -7), -3)   // floor, not truncation
        XCTAssertEqual(try eval("q_idx % 3", q: -7), 2)     // sign of the divisor
        XCTAssertEqual(try eval("q_idx % -3", q: 7), -2)
        XCTAssertEqual(try eval("q_idx // -2", q: 7), -4)
        XCTAssertEqual(try eval("q_idx / 2", q: 7), 3.5)    // true division
        XCTAssertEqual(try eval("2 ** 10"), 1024)
        XCTAssertEqual(try eval("q_idx * 65536 * 65536", q: 3), 0, "int32 wraps")
        XCTAssertEqual(try eval("~q_idx", q: 5), -6)
        XCTAssertEqual(try eval("q_idx & 6 | 1", q: 5), 5)
        XCTAssertEqual(try eval("q_idx ^ 3", q: 5), 6)
        XCTAssertEqual(try eval("abs(q_idx - 9)", q: 2), 7)
        XCTAssertEqual(try eval("clamp(q_idx, 2, 5)", q: 9), 5)
        XCTAssertEqual(try eval("minimum(q_idx, kv_idx) + maximum(q_idx, kv_idx) * 10", q: 3, kv: 8), 83)
        XCTAssertEqual(try eval("-7.5 // 2"), -4)
        XCTAssertEqual(try eval("-7.5 % 2"), 0.5)
        XCTAssertEqual(try eval("(-2.0) ** 3"), -8)
        XCTAssertTrue(try eval("(-2.0) ** 0.5").isNaN)
        XCTAssertEqual(try eval("tan(b)", b: 1), Foundation.tan(1))
        XCTAssertEqual(try eval("sigmoid(score)", score: 0), 0.5)
        XCTAssertEqual(try eval("where(q_idx > 2, 1, 2.5)", q: 3), 1)
        XCTAssertEqual(try eval("floor(score)", score: -1.5), -2)
        XCTAssertEqual(try eval("score * 2", score: .infinity), .infinity)
    }

    func testTypesFollowPyTorch() throws {
        func type(_ t: String) throws -> ScalarType { try ScoreMod(parsing: t).graph.type() }
        XCTAssertEqual(try type("q_idx + 1"), .int)
        XCTAssertEqual(try type("q_idx + 1.0"), .float)
        XCTAssertEqual(try type("q_idx / 1"), .float)
        XCTAssertEqual(try type("q_idx // 2"), .int)
        XCTAssertEqual(try type("abs(q_idx)"), .int)
        XCTAssertEqual(try type("floor(q_idx)"), .int)
        XCTAssertEqual(try type("exp(q_idx)"), .float)
        XCTAssertEqual(try type("clamp(q_idx, 0, 2.5)"), .float)
        XCTAssertEqual(try type("where(q_idx > 0, 1, 2)"), .int)
    }

    func testCapturedIndicesWrapOnceAndOutOfRangeIsAnError() throws {
        let t = HostTensor(name: "table", int32: [10, 20, 30, 40], shape: [4])
        let i = try Interpreter(ScoreMod(parsing: "table[q_idx]", captures: ["table": t]).graph)
        XCTAssertEqual(i.float(b: 0, h: 0, q: -1, kv: 0), 40)
        XCTAssertEqual(i.float(b: 0, h: 0, q: -4, kv: 0), 10)
        XCTAssertNil(i.error)
        XCTAssertEqual(i.float(b: 0, h: 0, q: -5, kv: 0), 0)
        XCTAssertEqual(i.error?.message, "index -5 is out of range for table (size 4), even after wrapping negative indices once")
        i.clearError()
        XCTAssertEqual(i.float(b: 0, h: 0, q: 4, kv: 0), 0)
        XCTAssertNotNil(i.error)
        let m = HostTensor(name: "grid", float32: (0..<6).map(Float.init), shape: [2, 3])
        let j = try Interpreter(ScoreMod(parsing: "grid[q_idx, kv_idx]", captures: ["grid": m]).graph)
        XCTAssertEqual(j.float(b: 0, h: 0, q: 1, kv: -1), 5)
        _ = j.float(b: 0, h: 0, q: 1, kv: 3)
        XCTAssertEqual(j.error?.message, "index 3 is out of range for dimension 1 of grid (size 3), even after wrapping negative indices once")
        let div = try Interpreter(ScoreMod(parsing: "q_idx // kv_idx").graph)
        _ = div.float(b: 0, h: 0, q: 1, kv: 0)
        XCTAssertEqual(div.error, .divisionByZero)
    }

    func testFloat32ModeRoundsLikeAGPU() throws {
        let g = try ScoreMod(parsing: "score * 0.1").graph
        let f64 = try Interpreter(g).float(score: 3, b: 0, h: 0, q: 0, kv: 0)
        let f32 = try Interpreter(g, precision: .float32).float(score: 3, b: 0, h: 0, q: 0, kv: 0)
        XCTAssertEqual(f64, 3 * 0.1)
        XCTAssertEqual(f32, Double(Float(3) * Float(0.1)))
        XCTAssertNotEqual(f32, f64)
    }

    func testSeedMasksEvaluate() throws {
        let seeds = Dictionary(uniqueKeysWithValues: Seeds.all.map { ($0.name, $0) })
        let causal = try Interpreter(seeds["causal"]!.mask!.graph)
        XCTAssertTrue(causal.bool(b: 0, h: 0, q: 5, kv: 5))
        XCTAssertFalse(causal.bool(b: 0, h: 0, q: 5, kv: 6))
        let doc = try Interpreter(seeds["document"]!.mask!.graph)
        XCTAssertTrue(doc.bool(b: 0, h: 0, q: 20, kv: 16))
        XCTAssertFalse(doc.bool(b: 0, h: 0, q: 20, kv: 15))
        let flamingo = try Interpreter(seeds["flamingo"]!.mask!.graph)
        // kv 0..2 is image 0 (interval [0, 7)), kv 6..8 image 2 ([7, 12))
        XCTAssertTrue(flamingo.bool(b: 0, h: 0, q: 6, kv: 1))
        XCTAssertFalse(flamingo.bool(b: 0, h: 0, q: 7, kv: 1))
        XCTAssertTrue(flamingo.bool(b: 0, h: 0, q: 11, kv: 7))
        let natten = try Interpreter(seeds["natten"]!.mask!.graph)
        // corner query 0 (x 0, y 0): kernel centre clamped to (1, 1) so (2, 2) = 18 is inside, (3, 0) = 24 is not
        XCTAssertTrue(natten.bool(b: 0, h: 0, q: 0, kv: 18))
        XCTAssertFalse(natten.bool(b: 0, h: 0, q: 0, kv: 24))
        let alibi = try Interpreter(seeds["alibi"]!.score!.graph)
        XCTAssertEqual(alibi.float(score: 1, b: 0, h: 1, q: 5, kv: 3), 1 + Double(Float(Foundation.exp2(-4.0))) * 2, accuracy: 1e-12)
    }
}
