import Foundation
import XCTest
@testable import VKFlex

/// Every failure the public API reports is a `FlexError`, in the case a caller would switch on.
final class ErrorTests: FlexTestCase {
    func caseName(_ error: Error) -> String {
        guard let e = error as? FlexError else { return "not a FlexError: \(type(of: error))" }
        switch e {
        case .invalidArgument: return "invalidArgument"
        case .expression: return "expression"
        case .vulkan: return "vulkan"
        case .noDevice: return "noDevice"
        case .unsupported: return "unsupported"
        case .limitExceeded: return "limitExceeded"
        case .shaderCompile: return "shaderCompile"
        case .modFailed: return "modFailed"
        case .file: return "file"
        }
    }

    func expect(_ expected: String, _ fragment: String = "", line: UInt = #line, _ body: () throws -> Void) {
        XCTAssertThrowsError(try body(), line: line) { error in
            XCTAssertEqual(caseName(error), expected, "\(error)", line: line)
            if !fragment.isEmpty { XCTAssertTrue("\(error)".contains(fragment), "\(error)", line: line) }
            XCTAssertEqual((error as? LocalizedError)?.errorDescription, "\(error)", line: line)
        }
    }

    func testEachKindOfFailureIsAFlexError() throws {
        let q = try device.tensor(randn(1 * 2 * 8 * 4), shape: [1, 2, 8, 4])
        let k1 = try device.tensor(randn(1 * 1 * 8 * 4), shape: [1, 1, 8, 4])
        expect("invalidArgument", "enableGQA") { _ = try flexAttention(q, k1, k1) }
        expect("invalidArgument", "negative") { _ = try device.empty(shape: [-1], dtype: .float32) }
        expect("expression", "^") { _ = try ScoreMod(parsing: "score + nope") }
        expect("expression", "indices must be ints") {
            let t = try device.tensor([1, 2], shape: [2])
            _ = try flexAttention(q, q, q, scoreMod: ScoreMod { s, _, _, qi, _ in s + t[qi / 2] })
        }
        expect("limitExceeded") { _ = try device.makeBuffer(bytes: device.capabilities.maxMemoryAllocation + 1) }
        expect("shaderCompile", "undeclared") {
            _ = try ShaderCompiler.shared.compile(ShaderSource(name: "bad", text: "#version 450\nlayout(local_size_x = 1) in;\nvoid main() { float x = nope; }\n"))
        }
        let table = try device.tensor([0, 1], shape: [2], name: "short_table")
        let r = try flexAttention(q, q, q, scoreMod: ScoreMod { s, _, _, qi, _ in s + table[qi] })
        expect("modFailed", "short_table") { _ = try r.output.toArray() }
        // The backward splices the same mod (and its derivative): reading any gradient reports it.
        let dO = try device.tensor(randn(1 * 2 * 8 * 4), shape: [1, 2, 8, 4])
        let lse = try flexAttention(q, q, q, returnLSE: true).lse!
        let g = try flexAttentionBackward(q, q, q, output: r.output, lse: lse, gradOutput: dO,
                                          scoreMod: ScoreMod { s, _, _, qi, _ in s + table[qi] })
        for t in [g.dq, g.dk, g.dv] { expect("modFailed", "short_table") { _ = try t.toArray() } }
        expect("file", "no such file") { _ = try NPYArray(contentsOf: URL(fileURLWithPath: "/nonexistent/x.npy")) }
        expect("noDevice") { _ = try Device(selector: "no-such-gpu-anywhere", options: .init(validation: false)) }
        expect("invalidArgument", "block size") { _ = try BlockSize(parsing: "axb") }
    }

    func testErrorsSwitchAndCompare() {
        let e = FlexError.vulkan(call: "vkQueueSubmit", result: -4)
        XCTAssertEqual(e.message, "vkQueueSubmit failed: VK_ERROR_DEVICE_LOST (-4)")
        XCTAssertEqual(FlexError("bad"), .invalidArgument("bad"))
        let expr = ExpressionError("unknown name 'x'", role: "score_mod", text: "score + x", position: 8)
        XCTAssertEqual("\(FlexError.expression(expr))", "score_mod: score + x\n                   ^ unknown name 'x'")
    }
}
