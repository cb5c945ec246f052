import Foundation
import XCTest
@testable import VKFlex

/// `qOffset:`: query rows placed at positions of a longer sequence (decoding against a BlockMask
/// built once), against the float64 reference and against the rows of a full-length call.
final class QueryOffsetTests: FlexTestCase {
    func tensors(B: Int, Hq: Int, Hkv: Int, Lq: Int, Lkv: Int, D: Int, dtype: DType = .float32) throws -> (Tensor, Tensor, Tensor) {
        (try device.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: dtype),
         try device.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: dtype),
         try device.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: dtype))
    }

    func check(_ name: String, B: Int = 1, Hq: Int = 2, Hkv: Int = 2, Lq: Int, S: Int, D: Int = 16, dtype: DType = .float32,
               offsets: [Int], perBatch: Bool, score: ScoreMod? = nil, mask: MaskMod?, blockSize: BlockSize = 32, line: UInt = #line) throws {
        let (q, k, v) = try tensors(B: B, Hq: Hq, Hkv: Hkv, Lq: Lq, Lkv: S, D: D, dtype: dtype)
        let bm = try mask.map { try createBlockMask($0, B: 1, H: 1, qLen: S, kvLen: S, device: device, blockSize: blockSize) }
        // Per batch alternately from a device tensor and from host values.
        let offset: QueryOffset = !perBatch ? .uniform(offsets[0]) : B % 2 == 1 ? .perBatch(try device.tensor(offsets, shape: [B], name: "offsets")) : .values(offsets)
        let r = try flexAttention(q, k, v, scoreMod: score, blockMask: bm, enableGQA: Hq != Hkv, qOffset: offset, returnLSE: true)
        XCTAssertEqual(r.kernel, Lq <= 16 ? .splitKV : .portable, line: line)
        let ref = try flexAttentionReference(q, k, v, scoreMod: score, blockMask: bm, enableGQA: Hq != Hkv, qOffsets: offsets)
        let tol = dtype == .float32 ? 1e-5 : 5e-3
        XCTAssertLessThanOrEqual(relativeL2Error(try r.output.toArray(), ref.output), tol, "\(name) output", line: line)
        let lse = try r.lse!.toArray()
        for (a, e) in zip(lse, ref.lse) {
            if e == -.infinity { XCTAssertEqual(a, -.infinity, "\(name) lse", line: line) } else { XCTAssertEqual(Double(a), e, accuracy: 1e-4 * max(1, abs(e)), "\(name) lse", line: line) }
        }
    }

    func testOffsetsMatchTheReference() throws {
        let causal = MaskMod { _, _, q, kv in q >= kv }
        let window = MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 40) }
        // One decode step per sequence: the last position, then several rows crossing a block.
        try check("decode, uniform", Lq: 1, S: 200, offsets: [199], perBatch: false, mask: causal)
        try check("4 rows across a block", Lq: 4, S: 200, offsets: [94], perBatch: false, mask: causal)
        try check("40 rows over two blocks", Lq: 40, S: 200, offsets: [20], perBatch: false, mask: window)
        // Per batch, GQA, a score-mod that reads q_idx, a sliding window leaving some blocks out.
        let slopes = try device.tensor([0.5, 0.25, 0.125, 0.0625], shape: [4], name: "slopes")
        try check("per batch, GQA, ALiBi, window", B: 3, Hq: 4, Hkv: 2, Lq: 5, S: 300, offsets: [0, 117, 295], perBatch: true,
                  score: ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }, mask: window, blockSize: 64)
        // No BlockMask: the offsets reach the mods alone.
        try check("dense, relative score", B: 2, Lq: 3, S: 90, offsets: [10, 87], perBatch: true,
                  score: ScoreMod { s, _, _, q, kv in s - 0.01 * abs(q - kv) }, mask: nil)
        try check("float16", Lq: 2, S: 128, dtype: .float16, offsets: [126], perBatch: false, mask: causal)
    }

    /// A decode step's rows are those of the full-length call at the same positions.
    func testRowsMatchTheFullCall() throws {
        let (B, H, S, D, Lq) = (2, 2, 160, 16, 3)
        let (qFull, k, v) = try tensors(B: B, Hq: H, Hkv: H, Lq: S, Lkv: S, D: D)
        let causal = try createBlockMask(MaskMod { _, _, q, kv in (q >= kv) & (q - kv < 70) }, B: 1, H: 1, qLen: S, kvLen: S, device: device, blockSize: 32)
        let full = try flexAttention(qFull, k, v, blockMask: causal).output.toArray()
        let offsets = [45, 157]
        let qValues = try qFull.toArray()
        var rows: [Float] = []
        for b in 0..<B { for h in 0..<H { for i in 0..<Lq { let base = ((b * H + h) * S + offsets[b] + i) * D; rows += qValues[base..<(base + D)] } } }
        let q = try device.tensor(rows, shape: [B, H, Lq, D])
        let step = try flexAttention(q, k, v, blockMask: causal, qOffset: .perBatch(try device.tensor(offsets, shape: [B]))).output.toArray()
        for b in 0..<B { for h in 0..<H { for i in 0..<Lq { for d in 0..<D {
            let got = step[((b * H + h) * Lq + i) * D + d], want = full[((b * H + h) * S + offsets[b] + i) * D + d]
            XCTAssertEqual(got, want, accuracy: 1e-5, "b\(b) h\(h) row \(i)")
        } } } }
    }

    /// Long caches on lavapipe go through the key splits and their merge with the offsets intact.
    func testLongCacheThroughKeySplits() throws {
        try check("20,000 keys", Hq: 1, Hkv: 1, Lq: 2, S: 20_000, D: 64, offsets: [15_000], perBatch: false,
                  mask: MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 9000) }, blockSize: 128)
    }

    func testBadOffsetsAreCleanErrors() throws {
        let (q, k, v) = try tensors(B: 2, Hq: 1, Hkv: 1, Lq: 4, Lkv: 64, D: 8)
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 64, kvLen: 64, device: device, blockSize: 16)
        let cases: [(QueryOffset, String)] = [
            (.uniform(-1), "offset -1; offsets are positions"),
            (.uniform(61), "reach position 64, but the BlockMask covers query positions 0..<64"),
            (.perBatch(try device.tensor([0, 1, 2] as [Int], shape: [3])), "qOffset must be int32 [B] = [2]"),
            (.perBatch(try device.tensor([1.0, 2.0], shape: [2])), "qOffset must be int32 [B] = [2]"),
            (.values([1, 2, 3]), ".values has 3 offsets; the call has B = 2 batches"),
            (.values([1, -4]), "batch 1 has offset -4"),
        ]
        for (offset, message) in cases {
            XCTAssertThrowsError(try flexAttention(q, k, v, blockMask: causal, qOffset: offset)) { XCTAssertTrue("\($0)".contains(message), "\($0)") }
        }
        // A mask for other keys, and the backward of a decoding call.
        let short = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 64, kvLen: 32, device: device, blockSize: 16)
        XCTAssertThrowsError(try flexAttention(q, k, v, blockMask: short, qOffset: 3)) { XCTAssertTrue("\($0)".contains("build it for the whole sequence"), "\($0)") }
        let r = try flexAttention(q, k, v, blockMask: causal, qOffset: 60, returnLSE: true)
        XCTAssertThrowsError(try r.backward(gradOutput: q)) { XCTAssertTrue("\($0)".contains("does not take qOffset"), "\($0)") }
        // Offsets of 0 are a call without them: the mask must then match the rows.
        XCTAssertThrowsError(try flexAttention(q, k, v, blockMask: causal, qOffset: 0)) { XCTAssertTrue("\($0)".contains("every qOffset is 0"), "\($0)") }
    }
}
