import Foundation
import XCTest
@testable import VKFlex

/// Paged K/V: physical pages read through a page table, against the same keys laid out
/// contiguously and the float64 reference; PagedKVCache's appends; bad tables.
final class PagedKVTests: FlexTestCase {
    /// Contiguous K or V values `[B, H, L, D]` scattered into permuted pages of a physical cache
    /// `[1, H, pages·P, D]`; pages no batch holds are NaN. Returns the cache's values and the
    /// table (−1 for pages past a batch's length).
    func scatter(_ x: [Float], B: Int, H: Int, L: Int, D: Int, P: Int, lengths: [Int], pages: Int, order: [Int]) -> (cache: [Float], table: [Int32]) {
        let maxPages = (L + P - 1) / P
        var cache = [Float](repeating: .nan, count: H * pages * P * D)
        var table = [Int32](repeating: -1, count: B * maxPages)
        var next = 0
        for b in 0..<B {
            for page in 0..<((lengths[b] + P - 1) / P) {
                let phys = order[next]; next += 1
                table[b * maxPages + page] = Int32(phys)
                for h in 0..<H {
                    for r in 0..<P where page * P + r < lengths[b] {
                        for d in 0..<D { cache[((h * pages + phys) * P + r) * D + d] = x[((b * H + h) * L + page * P + r) * D + d] }
                    }
                }
            }
        }
        return (cache, table)
    }

    func check(_ name: String, B: Int, Hq: Int, Hkv: Int, Lq: Int, L: Int, D: Int = 16, P: Int, lengths: [Int], dtype: DType = .float32,
               score: ScoreMod? = nil, mask: MaskMod? = nil, offsets: [Int]? = nil, kvBlock: Int? = nil, line: UInt = #line) throws {
        let maxPages = (L + P - 1) / P, logical = maxPages * P
        let used = lengths.map { ($0 + P - 1) / P }.reduce(0, +), pages = used + 3
        let order = Array(0..<pages).shuffled()
        let kv = [randn(B * Hkv * logical * D), randn(B * Hkv * logical * D)]
        let q = try device.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: dtype)
        let paged = kv.map { scatter($0, B: B, H: Hkv, L: logical, D: D, P: P, lengths: lengths, pages: pages, order: order) }
        let kCache = try device.tensor(paged[0].cache, shape: [1, Hkv, pages * P, D], dtype: dtype)
        let vCache = try device.tensor(paged[1].cache, shape: [1, Hkv, pages * P, D], dtype: dtype)
        let table = PageTable(table: try device.tensor(paged[0].table, shape: [B, maxPages]),
                              lengths: try device.tensor(lengths, shape: [B]), pageSize: P)
        let bm = try mask.map { try createBlockMask($0, B: 1, H: 1, qLen: (offsets?.max() ?? 0) + Lq, kvLen: logical, device: device, blockSize: BlockSize(q: 32, kv: kvBlock ?? P)) }
        let offset = try offsets.map { QueryOffset.perBatch(try device.tensor($0, shape: [B])) }
        let r = try flexAttention(q, kCache, vCache, scoreMod: score, blockMask: bm, enableGQA: Hq != Hkv, qOffset: offset, pageTable: table, returnLSE: true)
        // The same keys, contiguous, with kvLengths: same answer.
        let k = try device.tensor(kv[0], shape: [B, Hkv, logical, D], dtype: dtype), v = try device.tensor(kv[1], shape: [B, Hkv, logical, D], dtype: dtype)
        let lens = try device.tensor(lengths, shape: [B])
        let c = try flexAttention(q, k, v, scoreMod: score, blockMask: bm, enableGQA: Hq != Hkv, kvLengths: lens, qOffset: offset, returnLSE: true)
        let got = try r.output.toArray()
        XCTAssertFalse(got.contains { $0.isNaN }, "\(name): NaN from a poisoned page", line: line)
        let contiguous = try c.output.toArray()
        XCTAssertEqual(zip(got, contiguous).map { abs($0 - $1) }.max() ?? 0, 0, "\(name): paged vs contiguous", line: line)
        let ref = try flexAttentionReference(q, k, v, scoreMod: score, blockMask: bm, enableGQA: Hq != Hkv, kvLengths: lengths, qOffsets: offsets)
        XCTAssertLessThanOrEqual(relativeL2Error(got, ref.output), dtype == .float32 ? 1e-5 : 5e-3, "\(name): against the reference", line: line)
    }

    func testPagedMatchesContiguous() throws {
        let causal = MaskMod { _, _, q, kv in q >= kv }
        try check("prefill, causal", B: 2, Hq: 2, Hkv: 2, Lq: 100, L: 100, P: 16, lengths: [100, 37], mask: causal)
        try check("decode, GQA, ALiBi", B: 3, Hq: 4, Hkv: 2, Lq: 1, L: 300, P: 32, lengths: [300, 1, 129],
                  score: ScoreMod { s, _, h, q, kv in s + (kv - q) * 0.05 * (h + 1) }, offsets: [299, 0, 128])
        try check("4 rows, sliding window, page 128, float16", B: 2, Hq: 2, Hkv: 1, Lq: 4, L: 512, D: 64, P: 128, lengths: [512, 260], dtype: .float16,
                  mask: MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 100) }, offsets: [508, 256])
        try check("empty entry", B: 2, Hq: 1, Hkv: 1, Lq: 2, L: 64, P: 16, lengths: [0, 64])
        // KV blocks of half a page (split-KV looks a block's page up once) and of two pages (each key its own).
        let window = MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 70) }
        for kvBlock in [16, 64] {
            try check("decode, KV blocks of \(kvBlock) in pages of 32", B: 2, Hq: 4, Hkv: 2, Lq: 1, L: 200, P: 32, lengths: [200, 75], dtype: .float16,
                      mask: window, offsets: [199, 74], kvBlock: kvBlock)
        }
    }

    /// lavapipe's key splits with a long paged cache.
    func testLongPagedCache() throws {
        try check("20,000 keys", B: 1, Hq: 1, Hkv: 1, Lq: 1, L: 20_000, D: 64, P: 128, lengths: [19_990], offsets: [19_989])
    }

    /// Appends, token by token and in chunks, then attention equals attention over the same keys
    /// laid out contiguously; erase frees the pages.
    /// A serving loop — append a token, attend with a captured ALiBi slope, read the output — holds
    /// the same device memory step after step (drivers cap the allocations: 4096 on NVIDIA).
    func testADecodeLoopHoldsSteadyAllocations() throws {
        let (E, Hq, Hkv, D, P) = (2, 4, 2, 16, 8)
        let cache = try PagedKVCache(device: device, kvHeads: Hkv, headDim: D, pageSize: P, pages: 24, entries: E, maxLength: 90, dtype: .float16)
        let slopes = try device.tensor([0.5, 0.25, 0.125, 0.0625], shape: [4], name: "slopes")
        let alibi = ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: cache.logicalLength, kvLen: cache.logicalLength,
                                         device: device, blockSize: BlockSize(q: 32, kv: P))
        let out = try device.empty(shape: [E, Hq, 1, D], dtype: .float16)
        try cache.append(keys: try device.tensor(randn(E * Hkv * 5 * D), shape: [E, Hkv, 5, D], dtype: .float16),
                         values: try device.tensor(randn(E * Hkv * 5 * D), shape: [E, Hkv, 5, D], dtype: .float16), entries: [0, 1])   // a prompt
        var held = 0
        for step in 0..<60 {
            try cache.append(keys: try device.tensor(randn(E * Hkv * D), shape: [E, Hkv, 1, D], dtype: .float16),
                             values: try device.tensor(randn(E * Hkv * D), shape: [E, Hkv, 1, D], dtype: .float16), entries: [0, 1])
            let positions = (0..<E).map { cache.length(of: $0) - 1 }
            _ = try flexAttention(try device.tensor(randn(E * Hq * D), shape: [E, Hq, 1, D], dtype: .float16), cache: cache, entries: [0, 1],
                                  scoreMod: alibi, blockMask: causal, enableGQA: true, qOffset: .perBatch(try device.tensor(positions, shape: [E])), out: out)
            XCTAssertFalse(try out.toArray().contains { !$0.isFinite }, "step \(step)")
            if step == 20 { held = device.liveAllocations }
        }
        XCTAssertLessThanOrEqual(device.liveAllocations - held, 2, "allocations held by 39 more steps")
    }

    func testCacheAppendsThenAttends() throws {
        let (E, Hkv, D, P) = (3, 2, 16, 8)
        let cache = try PagedKVCache(device: device, kvHeads: Hkv, headDim: D, pageSize: P, pages: 20, entries: E, maxLength: 50, dtype: .float32)
        XCTAssertEqual(cache.logicalLength, 56)
        var keys = [[Float]](repeating: [], count: E), values = [[Float]](repeating: [], count: E)   // per entry [Hkv][t][D] as [t][Hkv][D]
        func append(_ T: Int, entries: [Int]) throws {
            let k = randn(entries.count * Hkv * T * D), v = randn(entries.count * Hkv * T * D)
            try cache.append(keys: try device.tensor(k, shape: [entries.count, Hkv, T, D]), values: try device.tensor(v, shape: [entries.count, Hkv, T, D]), entries: entries)
            for (i, e) in entries.enumerated() {
                for t in 0..<T { for h in 0..<Hkv {
                    let start: Int = ((i * Hkv + h) * T + t) * D
                    keys[e] += k[start..<(start + D)]
                    values[e] += v[start..<(start + D)]
                } }
            }
        }
        try append(13, entries: [0, 2])
        for _ in 0..<5 { try append(1, entries: [0, 1, 2]) }
        try append(9, entries: [1])
        XCTAssertEqual((0..<E).map { cache.length(of: $0) }, [18, 14, 18])
        // Entries 2 and 0 (a subset, reordered), one decode row each at their last position.
        let entries = [2, 0]
        let q = try device.tensor(randn(2 * 4 * D), shape: [2, 4, 1, D])
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: cache.logicalLength, kvLen: cache.logicalLength, device: device, blockSize: BlockSize(q: 32, kv: P))
        let positions = entries.map { cache.length(of: $0) - 1 }
        let r = try flexAttention(q, cache: cache, entries: entries, blockMask: causal, enableGQA: true,
                                  qOffset: .perBatch(try device.tensor(positions, shape: [2])))
        // Contiguous [2, Hkv, L, D] from what was appended.
        let L = cache.logicalLength
        var kc = [Float](repeating: 0, count: 2 * Hkv * L * D), vc = kc
        for (i, e) in entries.enumerated() {
            for t in 0..<cache.length(of: e) { for h in 0..<Hkv { for d in 0..<D {
                kc[((i * Hkv + h) * L + t) * D + d] = keys[e][(t * Hkv + h) * D + d]
                vc[((i * Hkv + h) * L + t) * D + d] = values[e][(t * Hkv + h) * D + d]
            } } }
        }
        let k = try device.tensor(kc, shape: [2, Hkv, L, D]), v = try device.tensor(vc, shape: [2, Hkv, L, D])
        let ref = try flexAttentionReference(q, k, v, blockMask: causal, enableGQA: true, kvLengths: entries.map { cache.length(of: $0) }, qOffsets: positions)
        XCTAssertLessThanOrEqual(relativeL2Error(try r.output.toArray(), ref.output), 1e-5)
        // Erase frees the pages; a cache too small says so.
        let free = cache.freePages
        cache.erase(entry: 1)
        XCTAssertEqual(cache.freePages, free + 2)
        XCTAssertEqual(cache.length(of: 1), 0)
        XCTAssertThrowsError(try cache.reserve(entry: 1, length: 57)) { XCTAssertTrue("\($0)".contains("cannot hold 57 keys; maxLength is 56"), "\($0)") }
        let small = try PagedKVCache(device: device, kvHeads: 1, headDim: 4, pageSize: 4, pages: 2, entries: 2, maxLength: 16, dtype: .float32)
        XCTAssertThrowsError(try small.reserve(entry: 0, length: 12)) { XCTAssertTrue("\($0)".contains("needs 3 more pages"), "\($0)") }
        XCTAssertThrowsError(try small.append(keys: try device.tensor(randn(4), shape: [1, 1, 1, 4], dtype: .float16),
                                              values: try device.tensor(randn(4), shape: [1, 1, 1, 4], dtype: .float16), entries: [0])) {
            XCTAssertTrue("\($0)".contains("the cache holds float32"), "\($0)")
        }
    }

    /// Key lengths, offsets and tables made from host values are checked from the host's copy (no
    /// read-back, no wait); a kernel's write drops the copy.
    func testHostValuesAreCheckedWithoutAReadBack() throws {
        let t = try device.tensor([5, 7] as [Int], shape: [2])
        // A write the tensor does not see: the host's copy is what the checks read.
        try t.buffer.upload([Int32(40), 41])
        XCTAssertEqual(try t.int32Values(), [5, 7])
        try t.copy(from: [1, 2])
        XCTAssertEqual(try t.int32Values(), [1, 2])
        _ = t.binding(writes: true)   // what a kernel writing it binds
        try t.buffer.upload([Int32(3), 4])
        XCTAssertEqual(try t.int32Values(), [3, 4], "read back once a kernel may have written it")
        let empty = try device.empty(shape: [2], dtype: .int32)
        try empty.buffer.upload([Int32(8), 9])
        XCTAssertEqual(try empty.int32Values(), [8, 9])
    }

    func testBadTablesAreCleanErrors() throws {
        let (B, P, pages) = (2, 8, 4)
        let q = try device.tensor(randn(B * 16), shape: [B, 1, 1, 16])
        let k = try device.tensor(randn(pages * P * 16), shape: [1, 1, pages * P, 16])
        func call(_ table: [Int], _ lengths: [Int], pageSize: Int = P, maxPages: Int = 2, kv: Tensor? = nil) throws {
            _ = try flexAttention(q, kv ?? k, kv ?? k, pageTable: PageTable(table: try device.tensor(table, shape: [B, maxPages]),
                                                                         lengths: try device.tensor(lengths, shape: [B]), pageSize: pageSize))
        }
        XCTAssertNoThrow(try call([3, -1, 0, 1], [8, 16]))   // -1 pads a page past the length
        let cases: [(() throws -> Void, String)] = [
            ({ try call([3, 4, 0, 1], [16, 16]) }, "batch 0's page 1 holds keys but maps to physical page 4, outside 0..<4"),
            ({ try call([3, -1, 0, 1], [9, 16]) }, "batch 0's page 1 holds keys but maps to physical page -1"),
            ({ try call([3, 2, 0, 1], [17, 16]) }, "batch 0 has length 17, outside 0...16"),
            ({ try call([3, 2, 0, 1], [8, 8], pageSize: 5) }, "the page size 5 does not divide the caches' 32 rows"),
            ({ try call([0, 0, 0, 0], [1, 1], kv: try self.device.tensor(self.randn(2 * 32 * 16), shape: [2, 1, 32, 16])) }, "paged K and V are physical caches"),
        ]
        for (f, message) in cases { XCTAssertThrowsError(try f()) { XCTAssertTrue("\($0)".contains(message), "\($0)") } }
        let table = PageTable(table: try device.tensor([0, 1, 2, 3] as [Int], shape: [B, 2]), lengths: try device.tensor([4, 4] as [Int], shape: [B]), pageSize: P)
        XCTAssertThrowsError(try flexAttention(q, k, k, kvLengths: try device.tensor([1, 1] as [Int], shape: [B]), pageTable: table)) {
            XCTAssertTrue("\($0)".contains("the lengths are the page table's"), "\($0)")
        }
        let r = try flexAttention(q, k, k, pageTable: table, returnLSE: true)
        XCTAssertThrowsError(try r.backward(gradOutput: q)) { XCTAssertTrue("\($0)".contains("does not take pageTable:"), "\($0)") }
    }
}
