import Foundation
import VKFlexVulkan

/// Where a call's query rows sit in their sequence (`qOffset:` of
/// ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)``):
/// query row `i` of batch `b` is position `i + offset[b]`. Both mods see that position as `q_idx`,
/// and a BlockMask built once for the whole sequence (`qLen` = its full length) is walked at the
/// block row of the position — so a decode step's causal or sliding-window mask needs no rebuilding.
///
/// ```swift
/// // One decode step: the new token of each sequence sits at position `S - 1` of a cache of S keys.
/// let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: S, kvLen: S, device: device)
/// let step = try flexAttention(q, k, v, blockMask: causal, qOffset: .uniform(S - 1))   // q: [B, H, 1, D]
/// let perSequence = try device.tensor([100, 250] as [Int], shape: [2], name: "positions")
/// let steps = try flexAttention(q, k, v, blockMask: causal, qOffset: .perBatch(perSequence))   // B = 2
/// let same = try flexAttention(q, k, v, blockMask: causal, qOffset: .values([100, 250]))       // no read-back
/// ```
public enum QueryOffset: ExpressibleByIntegerLiteral {
    /// The same offset for every batch.
    case uniform(Int)
    /// An int32 tensor `[B]`, one offset per batch, checked as `kvLengths:` is (from the host's copy
    /// of a tensor made from host values, else read back: the call then waits for its writer).
    case perBatch(Tensor)
    /// One offset per batch from the host: what a serving loop knows, uploaded with the call and
    /// never read back (no wait).
    case values([Int])

    public init(integerLiteral value: Int) { self = .uniform(value) }
}

/// A call's query offsets, checked: their values and the int32 `[B]` tensor the kernel reads.
struct ResolvedQueryOffsets {
    let values: [Int]
    let tensor: Tensor
}

extension QueryOffset {
    /// The offsets of a call, checked against its shape and BlockMask; nil when every offset is 0
    /// (the call then runs as one without them).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a tensor that is not int32 `[B]` on the
    ///   call's device, a negative offset, or rows that run past the BlockMask's `qLen`.
    func resolve(shape s: AttentionShape, blockMask: BlockMask?, device: Device) throws -> ResolvedQueryOffsets? {
        let values: [Int]
        switch self {
        case .uniform(let o): values = [Int](repeating: o, count: s.B)
        case .values(let v):
            guard v.count == s.B else { throw FlexError("qOffset: .values has \(v.count) offsets; the call has B = \(s.B) batches") }
            values = v
        case .perBatch(let t):
            guard t.device === device else { throw FlexError("qOffset: the tensor belongs to another device") }
            guard t.dtype == .int32, t.shape == [s.B] else {
                throw FlexError("qOffset must be int32 [B] = [\(s.B)], one offset per batch, got \(t.dtype.rawValue) \(t.shape)")
            }
            values = try t.int32Values().map(Int.init)
        }
        let limit = blockMask?.qLen ?? Int(Int32.max)
        for (b, o) in values.enumerated() {
            guard o >= 0 else { throw FlexError("qOffset: batch \(b) has offset \(o); offsets are positions, at least 0") }
            guard o + s.Lq <= limit else {
                throw FlexError(blockMask == nil
                    ? "qOffset: batch \(b)'s rows reach position \(o + s.Lq - 1), past int32"
                    : "qOffset: batch \(b)'s \(s.Lq) rows at offset \(o) reach position \(o + s.Lq - 1), but the BlockMask covers query positions 0..<\(limit) (build it for the whole sequence)")
            }
        }
        if values.allSatisfy({ $0 == 0 }) { return nil }
        if case .perBatch(let t) = self { return ResolvedQueryOffsets(values: values, tensor: t) }
        return ResolvedQueryOffsets(values: values, tensor: try device.tensor(values.map(Int32.init), shape: [s.B], name: "q_offsets"))
    }
}
