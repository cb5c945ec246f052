import Foundation
import XCTest
@testable import VKFlex

final class BlockMaskTests: FlexTestCase {
    /// Seed masks for a (qLen, kvLen) problem, with the device tensors they capture.
    func seedMasks(qLen: Int, kvLen: Int) throws -> [(String, MaskMod)] {
        let S = max(qLen, kvLen)
        let doc = try device.tensor((0..<S).map { Int32($0 < S / 5 ? 0 : $0 < S / 2 ? 1 : 2) }, shape: [S], name: "doc")
        let bounds = [0, S / 7, S / 3, S]
        let seq = try device.tensor((0..<S).map { i in Int32(bounds.lastIndex { $0 <= i }!) }, shape: [S], name: "seq_idx")
        let offsets = try device.tensor(bounds.map(Int32.init), shape: [4], name: "offsets")
        let images = try device.tensor((0..<kvLen).map { Int32($0 * 3 / kvLen) }, shape: [kvLen], name: "image")
        let intervals = try device.tensor([0, Int32(qLen / 2), Int32(qLen / 4), Int32(qLen), Int32(qLen / 2), Int32(qLen)], shape: [3, 2], name: "intervals")
        let W = 16, KW = 5
        return [
            ("noop", noopMask),
            ("causal", MaskMod { _, _, q, kv in q >= kv }),
            ("sliding_window", MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 77) }),
            ("prefix_lm", MaskMod { _, _, q, kv in (kv <= 50) | (q >= kv) }),
            ("document", MaskMod { _, _, q, kv in (q >= kv) & (doc[q] == doc[kv]) }),
            ("sasa", MaskMod { _, _, q, kv in (abs(floorDiv(q, W) - floorDiv(kv, W)) <= 2) & (abs(q % W - kv % W) <= 2) }),
            ("natten", MaskMod { _, _, q, kv in
                (abs(clamp(floorDiv(q, W), KW / 2, (W - 1) - KW / 2) - floorDiv(kv, W)) <= KW / 2)
                    & (abs(clamp(q % W, KW / 2, (W - 1) - KW / 2) - kv % W) <= KW / 2) }),
            ("jagged", MaskMod { _, _, q, kv in (q - offsets[seq[q]] >= kv - offsets[seq[kv]]) & (seq[q] == seq[kv]) }),
            ("flamingo", MaskMod { _, _, q, kv in (q >= intervals[images[kv], 0]) & (q < intervals[images[kv], 1]) }),
            ("per_head", MaskMod { b, h, q, kv in (q - kv <= h * 40 + b * 7) & (kv - q <= 3) }),
        ]
    }

    /// Block classes derived from the element-level mask of `createMask`.
    func classesFromDense(_ dense: [Bool], B: Int, H: Int, qLen: Int, kvLen: Int, bs: BlockSize) -> [UInt8] {
        let qB = (qLen + bs.q - 1) / bs.q, kvB = (kvLen + bs.kv - 1) / bs.kv
        var out = [UInt8](repeating: 0, count: B * H * qB * kvB)
        for bh in 0..<(B * H) { for qb in 0..<qB { for kvb in 0..<kvB {
            var n = 0, t = 0
            for q in (qb * bs.q)..<min(qLen, (qb + 1) * bs.q) { for kv in (kvb * bs.kv)..<min(kvLen, (kvb + 1) * bs.kv) {
                t += 1
                if dense[(bh * qLen + q) * kvLen + kv] { n += 1 }
            }}
            out[(bh * qB + qb) * kvB + kvb] = n == 0 ? 0 : n == t ? 2 : 1
        }}}
        return out
    }

    func testGPUAndCPUBuildsAgreeWithTheDenseMask() throws {
        let (qLen, kvLen) = (301, 257)
        for (name, mask) in try seedMasks(qLen: qLen, kvLen: kvLen) {
            let (B, H) = name == "per_head" ? (2, 3) : (1, 1)
            let dense = try createMask(mask, B: B, H: H, qLen: qLen, kvLen: kvLen, device: device)
            for bs: BlockSize in [32, 64, 128, 256, BlockSize(q: 64, kv: 128)] {
                let gpu = try createBlockMask(mask, B: B, H: H, qLen: qLen, kvLen: kvLen, device: device, blockSize: bs)
                let cpu = try createBlockMask(mask, B: B, H: H, qLen: qLen, kvLen: kvLen, device: device, blockSize: bs, backend: .cpu())
                let expected = classesFromDense(dense, B: B, H: H, qLen: qLen, kvLen: kvLen, bs: bs)
                XCTAssertEqual(try gpu.blockClasses(), expected, "\(name) \(bs) GPU")
                XCTAssertEqual(try cpu.blockClasses(), expected, "\(name) \(bs) CPU")
                // Every index tensor agrees between the GPU compaction and the host one.
                for (g, c) in zip(gpu.tensors, cpu.tensors) {
                    XCTAssertEqual(g.shape, c.shape)
                    XCTAssertEqual(try g.toInt32Array(), try c.toInt32Array(), "\(name) \(bs) \(g.name)")
                }
            }
        }
    }

    func testPyTorchCounts() throws {
        let causal = MaskMod { _, _, q, kv in q >= kv }
        let window = andMasks(causal, MaskMod { _, _, q, kv in q - kv <= 512 })
        let m = try createBlockMask(window, B: 1, H: 1, qLen: 2048, kvLen: 2048, device: device)
        XCTAssertEqual(try m.kvNumBlocks.toInt32Array().reduce(0, +), 28)
        let none = try createBlockMask(andMasks(causal, MaskMod { _, _, q, kv in q < kv }), B: 1, H: 1, qLen: 2048, kvLen: 2048, device: device)
        XCTAssertEqual(try none.kvNumBlocks.toInt32Array().reduce(0, +), 0)
        XCTAssertEqual(try none.fullKVNumBlocks.toInt32Array().reduce(0, +), 0)
        XCTAssertEqual(try none.sparsity(), 100)
        let all = try createBlockMask(orMasks(causal, MaskMod { _, _, q, kv in q < kv }), B: 1, H: 1, qLen: 2048, kvLen: 2048, device: device)
        let noop = try createBlockMask(noopMask, B: 1, H: 1, qLen: 2048, kvLen: 2048, device: device)
        XCTAssertEqual(try all.sparsity(), try noop.sparsity())
        XCTAssertEqual(try noop.sparsity(), 0)
        let c = try createBlockMask(causal, B: 1, H: 1, qLen: 2048, kvLen: 2048, device: device)
        XCTAssertEqual(try c.sparsity(), 46.875, accuracy: 1e-9)
        XCTAssertEqual(try c.kvNumBlocks.toInt32Array(), [Int32](repeating: 1, count: 16))
        XCTAssertEqual(try c.fullKVNumBlocks.toInt32Array(), (0..<16).map(Int32.init))
        XCTAssertEqual(try c.qNumBlocks.toInt32Array(), [Int32](repeating: 1, count: 16))
        XCTAssertEqual(try c.fullQNumBlocks.toInt32Array(), (0..<16).map { Int32(15 - $0) })
        XCTAssertEqual(Array(try c.fullQIndices.toInt32Array()[16..<32]), (2..<16).map(Int32.init) + [0, 0], "column 1: full below the diagonal, then zeros")
    }

    func testPicture() throws {
        let causal = MaskMod { _, _, q, kv in q >= kv }
        let m = try createBlockMask(causal, B: 1, H: 1, qLen: 512, kvLen: 512, device: device)
        XCTAssertEqual(m.description, """
        BlockMask(shape=(1, 1, 512, 512), sparsity=37.50%,
        (0, 0)
        ░░
        ██░░
        ████░░
        ██████░░
        )
        """)
        let big = try createBlockMask(causal, B: 1, H: 1, qLen: 8192, kvLen: 8192, device: device)
        let lines = big.description.split(separator: "\n")
        XCTAssertEqual(lines.count, 1 + 1 + 20 + 1 + 1)
        XCTAssertTrue(big.description.contains("64x64 blocks shown as 20x20 cells"), big.description)
        XCTAssertTrue(lines[2].hasPrefix("░░"))
    }

    func testSparsityCountsInRangeElementsAndNeverGoesNegative() throws {
        let m = try createBlockMask(noopMask, B: 1, H: 1, qLen: 130, kvLen: 70, device: device)
        XCTAssertEqual(try m.sparsity(), 0)
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 200, kvLen: 200, device: device)
        // Kept: block (0,0) 128x128, (1,0) 72x128, (1,1) 72x72 of 200x200.
        XCTAssertEqual(try causal.sparsity(), 100 * (1 - Double(128 * 128 + 72 * 128 + 72 * 72) / 40000), accuracy: 1e-9)
    }

    func testFromKVBlocksDerivesTransposesAndDense() throws {
        let c = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 512, kvLen: 512, device: device)
        let rebuilt = try BlockMask(kvNumBlocks: c.kvNumBlocks, kvIndices: c.kvIndices, fullKVNumBlocks: c.fullKVNumBlocks,
                                    fullKVIndices: c.fullKVIndices, blockSize: 128)
        XCTAssertEqual(rebuilt.shape, [1, 1, 512, 512])
        for (a, b) in zip(c.tensors, rebuilt.tensors) { XCTAssertEqual(try a.toInt32Array(), try b.toInt32Array(), a.name) }
        XCTAssertEqual(try rebuilt.toDense().toInt32Array(), [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1])
        let partialOnly = try BlockMask(kvNumBlocks: c.kvNumBlocks, kvIndices: c.kvIndices, blockSize: 128, qLen: 500, kvLen: 400)
        XCTAssertEqual(partialOnly.qLen, 500)
        XCTAssertThrowsError(try BlockMask(kvNumBlocks: c.kvNumBlocks, kvIndices: c.kvIndices, blockSize: 128, qLen: 100))
        let badIdx = try device.tensor([Int32](repeating: 9, count: 16), shape: [1, 1, 4, 4])
        XCTAssertThrowsError(try BlockMask(kvNumBlocks: c.kvNumBlocks, kvIndices: badIdx, blockSize: 128)) {
            XCTAssertTrue("\($0)".contains("outside 0..<4"), "\($0)")
        }
    }

    func testSubscriptsByBatchAndHead() throws {
        let m = try createBlockMask(MaskMod { b, h, q, kv in q - kv <= (b * 2 + h) * 64 }, B: 2, H: 2, qLen: 256, kvLen: 256,
                                    device: device, blockSize: 64)
        let one = try m[1, 0]
        XCTAssertEqual(one.shape, [1, 1, 256, 256])
        let direct = try createBlockMask(MaskMod { _, _, q, kv in q - kv <= 128 }, B: 1, H: 1, qLen: 256, kvLen: 256, device: device, blockSize: 64)
        XCTAssertEqual(try one.blockClasses(), try direct.blockClasses())
        XCTAssertEqual(try m[1].shape, [1, 2, 256, 256])
        XCTAssertThrowsError(try m[2])
        XCTAssertThrowsError(try m[0, 5])
    }

    func testBadArgumentsAreCleanErrors() throws {
        XCTAssertThrowsError(try BlockSize(parsing: "0"))
        XCTAssertThrowsError(try BlockSize(parsing: "64y128"))
        XCTAssertEqual(try BlockSize(parsing: "64x128"), BlockSize(q: 64, kv: 128))
        XCTAssertThrowsError(try createBlockMask(noopMask, B: 0, H: 1, qLen: 8, kvLen: 8, device: device))
        XCTAssertThrowsError(try createBlockMask(noopMask, B: 1, H: 1, qLen: 8, kvLen: 8, device: device, blockSize: BlockSize(q: -1, kv: 4)))
        let t = try device.tensor([0, 1], shape: [2], name: "short")
        // The build is asynchronous: the kernel's report surfaces when the mask is read or used.
        let bad = try createBlockMask(MaskMod { _, _, q, _ in t[q] == 0 }, B: 1, H: 1, qLen: 8, kvLen: 8, device: device)
        XCTAssertThrowsError(try bad.sparsity()) { XCTAssertTrue("\($0)".contains("out of range for short"), "\($0)") }
        let q = try device.tensor(randn(64), shape: [1, 1, 8, 8])
        let r = try flexAttention(q, q, q, blockMask: bad)
        XCTAssertThrowsError(try r.output.toArray()) { XCTAssertTrue("\($0)".contains("out of range for short"), "\($0)") }
        let cpu = MaskBackend.cpu()
        XCTAssertThrowsError(try createBlockMask(MaskMod { _, _, q, _ in t[q] == 0 }, B: 1, H: 1, qLen: 8, kvLen: 8, device: device, backend: cpu))
    }

    func testFloatMaskAgreesWithTheFloat32Interpreter() throws {
        let m = MaskMod { _, _, q, kv in exp(Num(-0.01) * (q - kv)) > 0.5 }
        let gpu = try createBlockMask(m, B: 1, H: 1, qLen: 300, kvLen: 300, device: device, blockSize: 32)
        let cpu = try createBlockMask(m, B: 1, H: 1, qLen: 300, kvLen: 300, device: device, blockSize: 32, backend: .cpu(precision: .float32))
        XCTAssertEqual(try gpu.blockClasses(), try cpu.blockClasses())
    }
}
