/// The size of a BlockMask block: `q` query rows by `kv` key columns.
///
/// ```swift
/// let square: BlockSize = 128            // 128 x 128
/// let tall = BlockSize(q: 64, kv: 128)
/// let parsed = try BlockSize(parsing: "64x128")   // the CLI spelling: query size first
/// ```
public struct BlockSize: Hashable, Sendable, ExpressibleByIntegerLiteral, CustomStringConvertible, Codable {
    public var q: Int
    public var kv: Int

    public init(q: Int, kv: Int) {
        self.q = q
        self.kv = kv
    }

    public init(integerLiteral value: Int) { self.init(q: value, kv: value) }

    /// Parses `128` or `64x128` (ASCII x, query size first). Sizes must be positive.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public init(parsing text: String) throws {
        let parts = text.lowercased().split(separator: "x", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let q = Int(parts[0]), let kv = Int(parts.last!) else {
            throw FlexError("block size '\(text)' is not N or QxKV (e.g. 128 or 64x128)")
        }
        self.init(q: q, kv: kv)
        try validate()
    }

    func validate() throws {
        guard q > 0, kv > 0 else { throw FlexError("block size \(self) must be positive") }
    }

    public var description: String { q == kv ? "\(q)" : "\(q)x\(kv)" }
}
