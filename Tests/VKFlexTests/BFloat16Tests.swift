import Foundation
import XCTest
@testable import VKFlex

/// bfloat16: PyTorch's rounding on the way in and out, float32 arithmetic in between, never a
/// detour through float16.
final class BFloat16Tests: FlexTestCase {
    /// The nearest bfloat16 by its definition (the two neighbours, ties to the even one), to check
    /// the bit-trick rounding against.
    func nearest(_ x: Float) -> Float {
        if x.isNaN || x.isInfinite { return x }
        let down = Float(bitPattern: x.bitPattern & 0xFFFF_0000)
        let up = Float(bitPattern: (x.bitPattern & 0xFFFF_0000) &+ 0x1_0000)   // one bf16 ulp away from zero
        // Past the largest bfloat16 the next value up is 2^128, which rounds to infinity (IEEE).
        let upValue = up.isInfinite ? (up < 0 ? -0x1p128 : 0x1p128) : Double(up)
        let dd = abs(Double(x) - Double(down)), du = abs(upValue - Double(x))
        if dd < du { return down }
        if du < dd { return up }
        return (down.bitPattern >> 16) & 1 == 0 ? down : up
    }

    func testRoundingIsNearestEvenLikePyTorch() {
        var values: [Float] = [0, -0.0, 1, 1.00390625, 1.01171875, -1.00390625, 3.14159265, 65504, 1e5, 1e-40, -1e-45,
                               Float.greatestFiniteMagnitude, -Float.greatestFiniteMagnitude, 3.3961776e38, .infinity, -.infinity]
        var rng = SystemRandomNumberGenerator()
        values += (0..<20_000).map { _ in Float(bitPattern: UInt32.random(in: 0...UInt32.max, using: &rng)) }.filter { !$0.isNaN }
        for x in values {
            let r = x.roundedToBFloat16, e = nearest(x)
            XCTAssertTrue(r == e || (r.isInfinite && e.isInfinite && r.sign == e.sign) || (r == 0 && e == 0), "\(x): \(r) against \(e)")
        }
        XCTAssertEqual(Float(1.00390625).bfloat16Bits, 0x3F80, "a tie goes to the even neighbour")
        XCTAssertEqual(Float(1.01171875).bfloat16Bits, 0x3F82, "a tie goes to the even neighbour")
        XCTAssertEqual(Float.greatestFiniteMagnitude.roundedToBFloat16, .infinity, "past the largest bfloat16: inf")
        XCTAssertEqual(Float(3.3895314e38).roundedToBFloat16, 3.3895314e38, "the largest bfloat16")
        XCTAssertEqual(Float(3.3961775e38).roundedToBFloat16, .infinity, "halfway past it: a tie, to the even inf")
        let nan = Float(bitPattern: 0xFF80_0001)   // a signalling NaN whose payload is in the low half
        XCTAssertTrue(Float(bfloat16Bits: nan.bfloat16Bits).isNaN, "NaN stays NaN (not inf)")
        XCTAssertEqual(nan.bfloat16Bits & 0x8040, 0x8040, "quiet, sign kept")
    }

    func testTensorsRoundOnTheWayIn() throws {
        let values = randn(1000, scale: 1e4) + [1e30, -1e-30, 1.00390625]
        let t = try device.tensor(values, shape: [values.count], dtype: .bfloat16)
        XCTAssertEqual(t.dtype.size, 2)
        XCTAssertEqual(try t.toArray(), values.map(\.roundedToBFloat16))
    }

    /// The kernel's bfloat16 output is its float32 result rounded to nearest even: the same call on
    /// float32 tensors holding the same (bfloat16-exact) values runs the same arithmetic.
    func testOutputsRoundToNearestEven() throws {
        let (B, H, L, D) = (1, 2, 96, 40)
        let n = B * H * L * D
        let (qv, kv, vv) = (randn(n).map(\.roundedToBFloat16), randn(n).map(\.roundedToBFloat16), randn(n).map(\.roundedToBFloat16))
        func run(_ dtype: DType) throws -> (out: [Float], lse: [Float]) {
            let q = try device.tensor(qv, shape: [B, H, L, D], dtype: dtype), k = try device.tensor(kv, shape: [B, H, L, D], dtype: dtype)
            let v = try device.tensor(vv, shape: [B, H, L, D], dtype: dtype)
            let r = try flexAttention(q, k, v, scoreMod: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, returnLSE: true)
            XCTAssertEqual(r.output.dtype, dtype)
            return (try r.output.toArray(), try r.lse!.toArray())
        }
        let f32 = try run(.float32), bf16 = try run(.bfloat16)
        XCTAssertEqual(bf16.out, f32.out.map(\.roundedToBFloat16), "rounded, not truncated")
        XCTAssertEqual(bf16.lse, f32.lse, "the LSE is float32")
    }

    func testAttentionMatchesTheReferenceOfTheRoundedInputs() throws {
        let slopes = try device.tensor(([0.5, 0.25, 0.125, 0.0625] as [Float]).map(\.roundedToBFloat16), shape: [4], dtype: .bfloat16, name: "slope")
        let cases: [(String, Int, Int, Int, Int, Int, Float, ScoreMod?, MaskMod?)] = [
            ("causal", 4, 4, 130, 64, 64, 1, nil, MaskMod { _, _, q, kv in q >= kv }),
            ("ALiBi with a bfloat16 capture, GQA", 4, 2, 100, 32, 32, 1, ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }, MaskMod { _, _, q, kv in q >= kv }),
            ("odd head dims", 2, 2, 77, 47, 23, 1, nil, nil),
            ("values beyond float16's range", 2, 2, 64, 16, 16, 1e6, ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, nil),
        ]
        for (name, Hq, Hkv, L, D, Dv, vScale, score, mask) in cases {
            let q = try device.tensor(randn(Hq * L * D), shape: [1, Hq, L, D], dtype: .bfloat16)
            let k = try device.tensor(randn(Hkv * L * D), shape: [1, Hkv, L, D], dtype: .bfloat16)
            let v = try device.tensor(randn(Hkv * L * Dv, scale: vScale), shape: [1, Hkv, L, Dv], dtype: .bfloat16)
            let bm = try mask.map { try createBlockMask($0, B: 1, H: 1, qLen: L, kvLen: L, device: device, blockSize: 32) }
            let r = try flexAttention(q, k, v, scoreMod: score, blockMask: bm, enableGQA: Hq != Hkv, returnLSE: true)
            let ref = try flexAttentionReference(q, k, v, scoreMod: score, blockMask: bm, enableGQA: Hq != Hkv)
            let o = try r.output.toArray()
            XCTAssertFalse(o.contains { !$0.isFinite }, name)
            XCTAssertLessThan(relativeL2Error(o, ref.output), 1e-2, name)
            let lseErr = zip(try r.lse!.toArray(), ref.lse).map { abs(Double($0) - $1) }.max() ?? 0
            XCTAssertLessThan(lseErr, 5e-2, name)
        }
    }

    /// Long keys on lavapipe go through the key split and the merge, which writes bfloat16 too.
    func testLongKeysThroughTheMerge() throws {
        let (L, D) = (70_000, 8)
        let q = try device.tensor(randn(3 * D), shape: [1, 1, 3, D], dtype: .bfloat16)
        let k = try device.tensor(randn(L * D), shape: [1, 1, L, D], dtype: .bfloat16)
        let v = try device.tensor(randn(L * D), shape: [1, 1, L, D], dtype: .bfloat16)
        let r = try flexAttention(q, k, v)
        let ref = try flexAttentionReference(q, k, v)
        XCTAssertLessThan(relativeL2Error(try r.output.toArray(), ref.output), 1e-2)
    }
}
