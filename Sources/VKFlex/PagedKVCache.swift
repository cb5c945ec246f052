import Foundation
import VKFlexVulkan

/// How paged K and V are read (`pageTable:` of
/// ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)``),
/// in PyTorch's layout: K and V are physical caches `[1, Hkv, pages·pageSize, D]`; logical key
/// `j` of batch `b` is physical row `table[b, j / pageSize]·pageSize + j % pageSize`; batch `b`
/// has `lengths[b]` keys. The mods see logical indices, keys at or past a batch's length are never
/// loaded nor given to a mod, and a BlockMask is logical: `kvLen` = `maxPages·pageSize`.
///
/// ```swift
/// // Two sequences of 300 and 40 keys in a cache of 8 pages of 128 keys; -1 pads unused pages.
/// let table = try device.tensor([5, 2, 7, -1, 0, -1, -1, -1] as [Int], shape: [2, 4], name: "page_table")
/// let lengths = try device.tensor([300, 40] as [Int], shape: [2], name: "seq_lens")
/// let paged = PageTable(table: table, lengths: lengths, pageSize: 128)
/// let out = try flexAttention(q, k, v, pageTable: paged).output   // k, v: [1, Hkv, 1024, D]
/// ```
///
/// ``PagedKVCache`` manages the pages and hands out its ``PagedKVCache/pageTable(entries:)``.
public struct PageTable {
    /// int32 `[B, maxPages]`: logical page → physical page. Entries of pages that hold no key of
    /// their batch are ignored (PyTorch pads with −1); the others must lie in `0..<pages`.
    public var table: Tensor
    /// int32 `[B]`: each batch's number of keys, at most `maxPages·pageSize`.
    public var lengths: Tensor
    /// Keys per page: divides the physical caches' length.
    public var pageSize: Int
    /// The table's and the lengths' values, where the caller knows them (a ``PagedKVCache``):
    /// the call then need not read them back.
    var known: (table: [Int32], lengths: [Int])? = nil

    public init(table: Tensor, lengths: Tensor, pageSize: Int) {
        self.table = table
        self.lengths = lengths
        self.pageSize = pageSize
    }

    /// The logical keys per batch the table spans.
    var logicalKeys: Int { table.rank == 2 ? table.shape[1] * max(pageSize, 0) : 0 }
}

/// A call's page table, checked.
struct ResolvedPaging {
    let table: Tensor
    let lengths: Tensor
    let pageSize: Int
    let maxPages: Int
}

extension PageTable {
    /// Checks the table against the call (`B` from the query, the physical caches' length).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for tensors of the wrong dtype, shape or
    ///   device, a page size that does not divide the caches, a length the table does not cover,
    ///   or a page that holds keys mapped outside the caches.
    func resolve(batches B: Int, physicalKeys: Int, device: Device) throws -> ResolvedPaging {
        guard pageSize >= 1 else { throw FlexError("pageTable: the page size must be at least 1, got \(pageSize)") }
        guard physicalKeys % pageSize == 0 else {
            throw FlexError("pageTable: the page size \(pageSize) does not divide the caches' \(physicalKeys) rows (they hold whole pages)")
        }
        for (name, t) in [("table", table), ("lengths", lengths)] where t.device !== device {
            throw FlexError("pageTable: the \(name) belongs to another device")
        }
        guard table.dtype == .int32, table.rank == 2, table.shape[0] == B, table.isContiguous else {
            throw FlexError("pageTable: the table must be contiguous int32 [B, maxPages] with B = \(B), got \(table.dtype.rawValue) \(table.shape)")
        }
        guard lengths.dtype == .int32, lengths.shape == [B] else {
            throw FlexError("pageTable: the lengths must be int32 [B] = [\(B)], got \(lengths.dtype.rawValue) \(lengths.shape)")
        }
        let maxPages = table.shape[1]
        let (entries, lens) = try known ?? (table.int32Values(), lengths.int32Values().map(Int.init))
        if let problem = PageTable.problem(table: entries, maxPages: maxPages, lengths: lens, pageSize: pageSize, pages: physicalKeys / pageSize) {
            throw FlexError("pageTable: " + problem)
        }
        return ResolvedPaging(table: table, lengths: lengths, pageSize: pageSize, maxPages: maxPages)
    }

    /// What is wrong with a page table's values (`table` row-major `[B, maxPages]`), or nil: a
    /// length the table does not cover, or a page that holds keys mapped outside `0..<pages`.
    /// (The CLI words the same checks with its flags.)
    public static func problem(table: [Int32], maxPages: Int, lengths: [Int], pageSize: Int, pages: Int) -> String? {
        for (b, n) in lengths.enumerated() {
            guard n >= 0, n <= maxPages * pageSize else {
                return "batch \(b) has length \(n), outside 0...\(maxPages * pageSize) (the table's \(maxPages) pages of \(pageSize) keys)"
            }
            for page in 0..<((n + pageSize - 1) / pageSize) {
                let e = Int(table[b * maxPages + page])
                guard e >= 0, e < pages else {
                    return "batch \(b)'s page \(page) holds keys but maps to physical page \(e), outside 0..<\(pages)"
                }
            }
        }
        return nil
    }
}

/// A paged KV cache for serving (vLLM's and PyTorch's `PagedAttention` layout): physical K and V
/// pages `[1, Hkv, pages·pageSize, D]`, a page table per entry (a sequence) and its length, with
/// host-side page management. Entries grow token by token without copying what they hold;
/// ``erase(entry:)`` returns an entry's pages to the pool.
///
/// ```swift
/// let cache = try PagedKVCache(device: device, kvHeads: 8, headDim: 64, pageSize: 128, pages: 64,
///                              entries: 4, maxLength: 2048, dtype: .float16)
/// try cache.append(keys: k, values: v, entries: [0, 1])      // k, v: [2, 8, T, 64]: T tokens each
/// let positions = try device.tensor([cache.length(of: 0) - 1, cache.length(of: 1) - 1], shape: [2])
/// let step = try flexAttention(q, cache: cache, entries: [0, 1], blockMask: mask, qOffset: .perBatch(positions))
/// cache.erase(entry: 1)
/// ```
///
/// A BlockMask for it is logical: `kvLen` = ``logicalLength`` (`maxLength` rounded up to whole
/// pages). Not thread-safe: one thread manages a cache (attention calls may run from any).
public final class PagedKVCache {
    /// The device the pages live on.
    public let device: Device
    /// Physical key and value pages, `[1, Hkv, pages·pageSize, D]` and `[1, Hkv, pages·pageSize, Dv]`.
    public let k: Tensor, v: Tensor
    /// Keys per page, physical pages, and entries (sequences) the cache serves.
    public let pageSize: Int, pages: Int, entries: Int
    /// Pages per entry: `maxLength` rounded up to whole pages.
    public let maxPages: Int
    /// The logical key length of every entry's table row (`maxPages·pageSize`): a BlockMask's `kvLen`.
    public var logicalLength: Int { maxPages * pageSize }

    private var table: [Int32]
    private var lengths: [Int]
    private var free: [Int]
    /// The device copy of the whole table and lengths, rebuilt after a change.
    private var deviceTable: (table: Tensor, lengths: Tensor)?

    /// - Throws: ``FlexError/invalidArgument(_:)`` for sizes below 1 or a cache that exceeds what
    ///   the device binds; device errors.
    public init(device: Device, kvHeads: Int, headDim: Int, valueHeadDim: Int? = nil, pageSize: Int, pages: Int,
                entries: Int, maxLength: Int, dtype: DType = .float16) throws {
        guard kvHeads >= 1, headDim >= 1, (valueHeadDim ?? headDim) >= 1, pageSize >= 1, pages >= 1, entries >= 1, maxLength >= 1 else {
            throw FlexError("PagedKVCache: heads, head dims, page size, pages, entries and maxLength must be at least 1")
        }
        guard dtype.isFloat else { throw FlexError("PagedKVCache: the dtype must be float32, float16 or bfloat16") }
        self.device = device
        self.pageSize = pageSize
        self.pages = pages
        self.entries = entries
        maxPages = (maxLength + pageSize - 1) / pageSize
        k = try device.empty(shape: [1, kvHeads, pages * pageSize, headDim], dtype: dtype, name: "k_pages")
        v = try device.empty(shape: [1, kvHeads, pages * pageSize, valueHeadDim ?? headDim], dtype: dtype, name: "v_pages")
        table = [Int32](repeating: -1, count: entries * maxPages)
        lengths = [Int](repeating: 0, count: entries)
        free = Array((0..<pages).reversed())
    }

    /// Pages not held by any entry.
    public var freePages: Int { free.count }

    /// The number of keys entry `entry` holds.
    public func length(of entry: Int) -> Int { lengths[entry] }

    /// Gives entry `entry` pages for `length` keys (keeping those it has).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for an entry out of range, a length past
    ///   ``logicalLength``, or too few free pages (nothing changes then).
    public func reserve(entry: Int, length: Int) throws {
        try checkEntry(entry)
        guard length <= logicalLength else { throw FlexError("PagedKVCache: entry \(entry) cannot hold \(length) keys; maxLength is \(logicalLength)") }
        let needed = (length + pageSize - 1) / pageSize
        let missing = (0..<needed).filter { table[entry * maxPages + $0] < 0 }
        guard missing.count <= free.count else {
            throw FlexError("PagedKVCache: entry \(entry) needs \(missing.count) more pages for \(length) keys; \(free.count) are free (erase entries or make a larger cache)")
        }
        for page in missing { table[entry * maxPages + page] = Int32(free.removeLast()) }
        if !missing.isEmpty { deviceTable = nil }
    }

    /// Appends `T` new keys and values to each of `entries` (default: all, in order): `keys`
    /// `[E, Hkv, T, D]`, `values` `[E, Hkv, T, Dv]`, contiguous, in the cache's dtype, row `e` for
    /// `entries[e]`. Reserves the pages needed, then copies the rows into them on the GPU (ordered
    /// with the work already enqueued); a decode step appends one token per sequence.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for shapes, dtypes or entries that do not fit,
    ///   or too few free pages (nothing is appended then).
    public func append(keys: Tensor, values: Tensor, entries chosen: [Int]? = nil) throws {
        let ids = chosen ?? Array(0..<entries)
        guard Set(ids).count == ids.count else { throw FlexError("PagedKVCache.append: an entry is listed twice") }
        for e in ids { try checkEntry(e) }
        let (Hkv, D, Dv) = (k.shape[1], k.shape[3], v.shape[3])
        guard keys.rank == 4, keys.shape[0] == ids.count, keys.shape[1] == Hkv, keys.shape[3] == D else {
            throw FlexError("PagedKVCache.append: keys must be [\(ids.count), \(Hkv), T, \(D)] (entries, heads, tokens, dim), got \(keys.shape)")
        }
        let T = keys.shape[2]
        guard values.shape == [ids.count, Hkv, T, Dv] else {
            throw FlexError("PagedKVCache.append: values must be [\(ids.count), \(Hkv), \(T), \(Dv)], got \(values.shape)")
        }
        for (name, t) in [("keys", keys), ("values", values)] {
            guard t.device === device else { throw FlexError("PagedKVCache.append: the \(name) belong to another device") }
            guard t.dtype == k.dtype else { throw FlexError("PagedKVCache.append: the \(name) are \(t.dtype.rawValue); the cache holds \(k.dtype.rawValue)") }
            guard t.isContiguous else { throw FlexError("PagedKVCache.append: the \(name) must be contiguous") }
        }
        guard T > 0 else { return }
        // Reserve everything first, so that a failure leaves the cache as it was.
        let before = (table, free, deviceTable)
        do {
            for e in ids { try reserve(entry: e, length: lengths[e] + T) }
        } catch {
            (table, free, deviceTable) = before
            throw error
        }
        let size = k.dtype.size, rows = k.shape[2]
        var kRegions: [BufferCopyRegion] = [], vRegions: [BufferCopyRegion] = []
        for (i, e) in ids.enumerated() {
            for h in 0..<Hkv {
                for t in 0..<T {
                    let j = lengths[e] + t
                    let row = Int(table[e * maxPages + j / pageSize]) * pageSize + j % pageSize
                    let src = ((i * Hkv + h) * T + t)
                    kRegions.append(BufferCopyRegion(sourceOffset: keys.byteOffset + src * D * size,
                                                     destinationOffset: k.byteOffset + (h * rows + row) * D * size, bytes: D * size))
                    vRegions.append(BufferCopyRegion(sourceOffset: values.byteOffset + src * Dv * size,
                                                     destinationOffset: v.byteOffset + (h * rows + row) * Dv * size, bytes: Dv * size))
                }
            }
        }
        try device.record { rec in
            rec.copy(from: keys.buffer, to: k.buffer, regions: kRegions)
            rec.copy(from: values.buffer, to: v.buffer, regions: vRegions)
        }
        for e in ids { lengths[e] += T }
        deviceTable = nil
    }

    /// Empties entry `entry` and returns its pages to the pool.
    public func erase(entry: Int) {
        guard (0..<entries).contains(entry) else { return }
        for page in 0..<maxPages where table[entry * maxPages + page] >= 0 {
            free.append(Int(table[entry * maxPages + page]))
            table[entry * maxPages + page] = -1
        }
        lengths[entry] = 0
        deviceTable = nil
    }

    /// The page table of `entries` (default: all, in order) for
    /// ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)``
    /// with ``k`` and ``v``: batch `i` of the call is entry `entries[i]` (serving a subset).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for an entry out of range; device errors.
    public func pageTable(entries chosen: [Int]? = nil) throws -> PageTable {
        let ids = chosen ?? Array(0..<entries)
        for e in ids { try checkEntry(e) }
        let rows = ids.flatMap { table[($0 * maxPages)..<(($0 + 1) * maxPages)] }, lens = ids.map { lengths[$0] }
        let tensors: (table: Tensor, lengths: Tensor)
        if chosen == nil, let cached = deviceTable {
            tensors = cached
        } else {
            tensors = (try device.tensor(rows, shape: [ids.count, maxPages], name: "page_table"),
                       try device.tensor(lens.map(Int32.init), shape: [ids.count], name: "seq_lens"))
            if chosen == nil { deviceTable = tensors }
        }
        var t = PageTable(table: tensors.table, lengths: tensors.lengths, pageSize: pageSize)
        t.known = (rows, lens)
        return t
    }

    private func checkEntry(_ e: Int) throws {
        guard (0..<entries).contains(e) else { throw FlexError("PagedKVCache: entry \(e) is outside 0..<\(entries)") }
    }
}

/// ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)``
/// over a ``PagedKVCache``: batch `i` of `q` attends entry `entries[i]` (default: every entry, in
/// order) through the cache's page table. A BlockMask's `kvLen` is the cache's ``PagedKVCache/logicalLength``.
///
/// ```swift
/// let cache = try PagedKVCache(device: device, kvHeads: 8, headDim: 64, pageSize: 128, pages: 64, entries: 4, maxLength: 2048)
/// let out = try flexAttention(q, cache: cache, entries: [2], blockMask: mask, qOffset: .uniform(cache.length(of: 2) - 1))
/// ```
///
/// - Throws: what the call with `pageTable:` throws.
public func flexAttention(_ q: Tensor, cache: PagedKVCache, entries: [Int]? = nil, scoreMod: ScoreMod? = nil, blockMask: BlockMask? = nil,
                          scale: Double? = nil, enableGQA: Bool = false, qOffset: QueryOffset? = nil, sinks: Tensor? = nil,
                          returnLSE: Bool = false, returnMaxScores: Bool = false, out: Tensor? = nil,
                          options: FlexOptions = FlexOptions()) throws -> FlexResult {
    try flexAttention(q, cache.k, cache.v, scoreMod: scoreMod, blockMask: blockMask, scale: scale, enableGQA: enableGQA, qOffset: qOffset,
                      pageTable: try cache.pageTable(entries: entries), sinks: sinks, returnLSE: returnLSE, returnMaxScores: returnMaxScores,
                      out: out, options: options)
}
