import Foundation
import XCTest
@testable import VKFlex

final class AttentionTests: FlexTestCase {
    struct Case {
        var B = 1, Hq = 2, Hkv = 2, Lq = 70, Lkv = 70, D = 32, Dv = 32
        var dtype: DType = .float32
        var score: ScoreMod? = nil
        var mask: MaskMod? = nil
        var maskB = 1, maskH = 1
        var blockSize: BlockSize = 32
        var scale: Double? = nil
    }

    /// Runs a case on the device and against the float64 reference; checks output, LSE and that
    /// every element was written (the output is poisoned with NaN first).
    @discardableResult
    func check(_ c: Case, _ name: String, file: StaticString = #filePath, line: UInt = #line) throws -> (Double, Double) {
        let q = try device.tensor(randn(c.B * c.Hq * c.Lq * c.D), shape: [c.B, c.Hq, c.Lq, c.D], dtype: c.dtype, name: "q")
        let k = try device.tensor(randn(c.B * c.Hkv * c.Lkv * c.D), shape: [c.B, c.Hkv, c.Lkv, c.D], dtype: c.dtype, name: "k")
        let v = try device.tensor(randn(c.B * c.Hkv * c.Lkv * c.Dv), shape: [c.B, c.Hkv, c.Lkv, c.Dv], dtype: c.dtype, name: "v")
        let mask = try c.mask.map { try createBlockMask($0, B: c.maskB, H: c.maskH, qLen: c.Lq, kvLen: c.Lkv, device: device, blockSize: c.blockSize) }
        let out = try device.tensor([Float](repeating: .nan, count: c.B * c.Hq * c.Lq * c.Dv), shape: [c.B, c.Hq, c.Lq, c.Dv], dtype: c.dtype)
        let r = try flexAttention(q, k, v, scoreMod: c.score, blockMask: mask, scale: c.scale, enableGQA: c.Hq != c.Hkv, returnLSE: true, out: out)
        let ref = try flexAttentionReference(q, k, v, scoreMod: c.score, blockMask: mask, scale: c.scale, enableGQA: c.Hq != c.Hkv)
        let o = try r.output.toArray(), l = try r.lse!.toArray()
        XCTAssertFalse(o.contains { $0.isNaN }, "\(name): NaN in the output (unwritten or computed)", file: file, line: line)
        let err = relativeL2Error(o, ref.output)
        let tol = c.dtype == .float32 ? 1e-4 : 2e-3
        XCTAssertLessThanOrEqual(err, tol, "\(name): relative L2 error \(err)", file: file, line: line)
        var lseErr = 0.0
        for (a, b) in zip(l, ref.lse) {
            if b == -.infinity { XCTAssertEqual(a, -.infinity, "\(name): masked row LSE", file: file, line: line); continue }
            lseErr = max(lseErr, abs(Double(a) - b))
        }
        XCTAssertLessThanOrEqual(lseErr, c.dtype == .float32 ? 1e-3 : 2e-2, "\(name): LSE error \(lseErr)", file: file, line: line)
        // Fully masked rows are exactly zero.
        for (row, b) in ref.lse.enumerated() where b == -.infinity {
            XCTAssertTrue(o[(row * c.Dv)..<((row + 1) * c.Dv)].allSatisfy { $0 == 0 }, "\(name): masked row \(row) not zero", file: file, line: line)
        }
        return (err, lseErr)
    }

    func testDenseAttention() throws {
        try check(Case(), "dense")
        try check(Case(Lq: 1, Lkv: 1, D: 1, Dv: 1), "1x1, D=1")
    }

    func testCausal() throws {
        try check(Case(mask: MaskMod { _, _, q, kv in q >= kv }), "causal")
    }
}
