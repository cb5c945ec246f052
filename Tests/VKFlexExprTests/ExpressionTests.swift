import Foundation
import XCTest
@testable import VKFlexExpr

final class ExpressionTests: XCTestCase {
    func testTextFormGivesTheSameGraphAsTheClosure() throws {
        for seed in Seeds.all {
            if let s = seed.score, let t = seed.scoreText {
                let parsed = try ScoreMod(parsing: t, captures: seed.captures)
                XCTAssertEqual(parsed.graph, s.graph, "\(seed.name): \(parsed.graph.text) vs \(s.graph.text)")
                XCTAssertNoThrow(try s.check(), seed.name)
            }
            if let m = seed.mask, let t = seed.maskText {
                let parsed = try MaskMod(parsing: t, captures: seed.captures)
                XCTAssertEqual(parsed.graph, m.graph, "\(seed.name): \(parsed.graph.text) vs \(m.graph.text)")
                XCTAssertNoThrow(try m.check(), seed.name)
            }
        }
    }

    func testPrintedTextParsesBackToTheSameGraph() throws {
        for seed in Seeds.all {
            if let s = seed.score { XCTAssertEqual(try ScoreMod(parsing: s.graph.text, captures: seed.captures).graph, s.graph, seed.name) }
            if let m = seed.mask { XCTAssertEqual(try MaskMod(parsing: m.graph.text, captures: seed.captures).graph, m.graph, seed.name) }
        }
    }

    func testPythonPrecedence() throws {
        // a >= b & c means a >= (b & c)
        XCTAssertEqual(try MaskMod(parsing: "q_idx >= kv_idx & 3").graph,
                       .binary(.ge, .arg(.q), .binary(.and, .arg(.kv), .int(3))))
        // -2 ** 2 == -(2 ** 2); 2 ** 3 ** 2 == 2 ** (3 ** 2)
        XCTAssertEqual(try ScoreMod(parsing: "-2 ** 2").graph, .unary(.neg, .binary(.pow, .int(2), .int(2))))
        XCTAssertEqual(try ScoreMod(parsing: "2 ** 3 ** 2").graph, .binary(.pow, .int(2), .binary(.pow, .int(3), .int(2))))
        // * binds tighter than +, | looser than ^ looser than &
        XCTAssertEqual(try ScoreMod(parsing: "1 + 2 * 3").graph, .binary(.add, .int(1), .binary(.mul, .int(2), .int(3))))
        XCTAssertEqual(try ScoreMod(parsing: "1 | 2 ^ 3 & 4").graph,
                       .binary(.or, .int(1), .binary(.xor, .int(2), .binary(.and, .int(3), .int(4)))))
        XCTAssertEqual(try ScoreMod(parsing: "score - 1 - 2").graph, .binary(.sub, .binary(.sub, .arg(.score), .int(1)), .int(2)))
        XCTAssertEqual(try ScoreMod(parsing: "-inf").graph, .float(-.infinity))
        XCTAssertEqual(try ScoreMod(parsing: "torch.where(q > kv, score, -torch.inf)").graph,
                       try ScoreMod(parsing: "where(q_idx > kv_idx, score, -inf)").graph)
        XCTAssertEqual(try MaskMod(parsing: "(q_idx - kv_idx).abs() <= 2").graph, try MaskMod(parsing: "abs(q_idx - kv_idx) <= 2").graph)
        XCTAssertEqual(try MaskMod(parsing: "q_idx.clamp(1, 6) == kv_idx").graph, try MaskMod(parsing: "clamp(q_idx, 1, 6) == kv_idx").graph)
    }

    func testParseErrorsPointAtTheProblem() {
        func error(_ text: String, mask: Bool = false, _ captures: [String: HostTensor] = [:]) -> ExpressionError? {
            do {
                if mask { _ = try MaskMod(parsing: text, captures: captures) } else { _ = try ScoreMod(parsing: text, captures: captures) }
                return nil
            } catch FlexError.expression(let e) { return e } catch { XCTFail("\(text): \(error) is not FlexError.expression"); return nil }
        }
        let doc = HostTensor(name: "doc", int32: [0, 1], shape: [2])
        let cases: [(String, Bool, Int, String)] = [
            ("score + foo", false, 8, "unknown name 'foo'"),
            ("score * (q_idx - ", false, 17, "ends too early"),
            ("0 <= q_idx - kv_idx <= 4", true, 20, "chained comparisons"),
            ("score + (q_idx >= kv_idx)", false, 6, "needs numbers, got a bool"),
            ("where(q_idx, score, 0)", false, 6, "condition of where(...) must be a bool"),
            ("score > 0", true, 0, "score is not available in a mask_mod"),
            ("doc[q_idx / 2] == 0", true, 4, "indices must be ints"),
            ("doc[q_idx, kv_idx] == 0", true, 3, "has 1 dimension"),
            ("tanh(score, 2)", false, 0, "takes 1 argument, got 2"),
            ("where(q_idx > 0, score)", false, 0, "takes 3 arguments"),
            ("q_idx + kv_idx", true, 0, "must give a condition"),
            ("q_idx >= kv_idx", false, 0, "must give a number"),
            ("(q_idx > 0) and (kv_idx > 0)", true, 12, "'and' does not work on tensors"),
            ("q_idx >= kv_idx)", true, 15, "unexpected ')'"),
            ("score $ 2", false, 6, "unexpected character"),
            ("~score", false, 0, "~ needs a bool or an int"),
            ("doc[0] == 0", true, 0, ""),
        ]
        for (text, mask, pos, message) in cases {
            guard let e = error(text, mask: mask, ["doc": doc]) else {
                if message.isEmpty { continue }
                XCTFail("\(text) parsed"); continue
            }
            XCTAssertFalse(message.isEmpty, "\(text) failed: \(e)")
            XCTAssertTrue(e.message.contains(message), "\(text): \(e.message)")
            XCTAssertEqual(e.position, pos, "\(text): \(e)")
            XCTAssertTrue(e.description.contains("^"), e.description)
        }
    }

    func testCapturesShadowAliasesAndArgumentNamesAreRefused() throws {
        let head = HostTensor(name: "head", float32: [0.5, 0.25], shape: [2])
        let batch = HostTensor(name: "batch", float32: [1, 2], shape: [2])
        let tok = HostTensor(name: "q", float32: [3, 4, 5], shape: [3])
        let mod = try ScoreMod(parsing: "score + q[q_idx] + batch[b] + head[h]", captures: ["head": head, "batch": batch, "q": tok])
        let eval = try Interpreter(mod.graph)
        XCTAssertEqual(eval.float(score: 1, b: 1, h: 0, q: 2, kv: 0), 1 + 5 + 2 + 0.5)
        // Without the capture, the alias still means the argument.
        XCTAssertEqual(try ScoreMod(parsing: "score + head").graph, try ScoreMod(parsing: "score + h").graph)
        for name in ["h", "q_idx", "score", "inf", "exp"] {
            XCTAssertThrowsError(try ScoreMod(parsing: "score", captures: [name: head])) { error in
                XCTAssertTrue("\(error)".contains("cannot be named '\(name)'"), "\(error)")
            }
        }
    }

    func testSwiftTypeErrorsSurfaceAtCheck() {
        let doc = HostTensor(name: "doc", int32: [0, 1], shape: [2])
        let badIndex = MaskMod { _, _, q, _ in doc[q / 2] == 0 }
        XCTAssertThrowsError(try badIndex.check()) { XCTAssertTrue("\($0)".contains("indices must be ints"), "\($0)") }
        let bitNotFloat = ScoreMod { s, _, _, _, _ in ~s }
        XCTAssertThrowsError(try bitNotFloat.check()) { XCTAssertTrue("\($0)".contains("~ needs"), "\($0)") }
        let rank = MaskMod { _, _, q, kv in doc[q, kv] == 0 }
        XCTAssertThrowsError(try rank.check()) { XCTAssertTrue("\($0)".contains("has 1 dimension"), "\($0)") }
        let huge = ScoreMod { s, _, _, _, _ in s + Num(Int(Int32.max) + 1) }
        XCTAssertThrowsError(try huge.check())
        let fine = ScoreMod { s, _, _, q, _ in s + floorDiv(q, 2) }
        XCTAssertNoThrow(try fine.check())
    }

    func testCombinators() throws {
        let causal = MaskMod { _, _, q, kv in q >= kv }
        let window = MaskMod { _, _, q, kv in q - kv <= 4 }
        XCTAssertEqual(andMasks(causal, window).graph, .binary(.and, causal.graph, window.graph))
        XCTAssertEqual(orMasks(causal, window).graph, .binary(.or, causal.graph, window.graph))
        XCTAssertTrue(noopMask.isNoop)
        XCTAssertEqual(andMasks().graph, .bool(true))
        XCTAssertTrue(ScoreMod.identity.isIdentity)
    }

    func testStructuralQueries() {
        let doc = HostTensor(name: "doc", int32: [0, 1], shape: [2])
        let m = MaskMod { b, _, q, kv in (doc[q] == doc[kv]) & (b == 0) }
        XCTAssertEqual(m.graph.captures.map(\.name), ["doc"])
        XCTAssertTrue(m.graph.uses(.b))
        XCTAssertFalse(m.graph.uses(.h))
        XCTAssertTrue(m.graph.isExact)
        XCTAssertFalse(ScoreMod { s, _, _, _, _ in s * 2 }.graph.isExact)
    }
}
