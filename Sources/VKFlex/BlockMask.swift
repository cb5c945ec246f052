import Foundation
import VKFlexExpr
import VKFlexVulkan

/// PyTorch's BlockMask: which (query block, key block) tiles attention visits, split into
/// partial blocks (the mask is applied) and full blocks (no mask needed), plus the transposes
/// the backward pass walks.
///
/// ```swift
/// let mask = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 2048, kvLen: 2048, device: device)
/// print(mask)               // the block picture: ██ full, ░░ partial, blank skipped
/// print(try mask.sparsity())    // 46.875
/// ```
///
/// The index tensors live on the device (int32): `kvNumBlocks [B,H,qBlocks]`,
/// `kvIndices [B,H,qBlocks,kvBlocks]`, `fullKVNumBlocks`, `fullKVIndices`, and
/// `qNumBlocks [B,H,kvBlocks]`, `qIndices [B,H,kvBlocks,qBlocks]`, `fullQNumBlocks`, `fullQIndices`.
/// Entries past a row's count are 0.
public final class BlockMask: @unchecked Sendable, CustomStringConvertible {
    public let B: Int, H: Int, qLen: Int, kvLen: Int
    public let blockSize: BlockSize
    /// The mask the partial blocks apply (nil: partial blocks are kept whole).
    public let maskMod: MaskMod?
    public let kvNumBlocks: Tensor, kvIndices: Tensor, fullKVNumBlocks: Tensor, fullKVIndices: Tensor
    public let qNumBlocks: Tensor, qIndices: Tensor, fullQNumBlocks: Tensor, fullQIndices: Tensor
    let device: Device
    /// The kernel's report for a mask built on the GPU (an out-of-range captured index).
    var errorCheck: ErrorCheck?
    private let lock = NSLock()
    private var cachedClasses: [UInt8]?

    /// Number of query blocks and key blocks.
    public var qBlocks: Int { (qLen + blockSize.q - 1) / blockSize.q }
    public var kvBlocks: Int { (kvLen + blockSize.kv - 1) / blockSize.kv }
    /// `[B, H, qLen, kvLen]`.
    public var shape: [Int] { [B, H, qLen, kvLen] }

    init(B: Int, H: Int, qLen: Int, kvLen: Int, blockSize: BlockSize, maskMod: MaskMod?, device: Device,
         tensors t: [Tensor], classes: [UInt8]?) {
        self.B = B; self.H = H; self.qLen = qLen; self.kvLen = kvLen
        self.blockSize = blockSize
        self.maskMod = maskMod
        self.device = device
        kvNumBlocks = t[0]; kvIndices = t[1]; fullKVNumBlocks = t[2]; fullKVIndices = t[3]
        qNumBlocks = t[4]; qIndices = t[5]; fullQNumBlocks = t[6]; fullQIndices = t[7]
        cachedClasses = classes
    }

    /// PyTorch's `BlockMask.from_kv_blocks`: a mask from its kv lists, deriving the transposes.
    /// Lengths default to blocks × block size. Indices must lie in `0..<kvBlocks`.
    ///
    /// ```swift
    /// let num = try device.tensor([1, 2], shape: [1, 1, 2], name: "kv_num_blocks")          // [B, H, qBlocks]
    /// let idx = try device.tensor([0, 0, 0, 1], shape: [1, 1, 2, 2], name: "kv_indices")   // [B, H, qBlocks, kvBlocks]
    /// let m = try BlockMask(kvNumBlocks: num, kvIndices: idx, blockSize: 128, maskMod: causal)
    /// ```
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public convenience init(kvNumBlocks: Tensor, kvIndices: Tensor, fullKVNumBlocks: Tensor? = nil, fullKVIndices: Tensor? = nil,
                            blockSize: BlockSize = 128, qLen: Int? = nil, kvLen: Int? = nil, maskMod: MaskMod? = nil) throws {
        try blockSize.validate()
        guard kvIndices.rank >= 2 else { throw FlexError("kvIndices must have at least 2 dimensions, got shape \(kvIndices.shape)") }
        guard (fullKVNumBlocks == nil) == (fullKVIndices == nil) else {
            throw FlexError("give both fullKVNumBlocks and fullKVIndices, or neither")
        }
        let lead = Array(kvIndices.shape.dropLast(2))
        guard lead.count <= 2 else { throw FlexError("kvIndices must be [B, H, qBlocks, kvBlocks], got shape \(kvIndices.shape)") }
        let B = lead.count == 2 ? lead[0] : 1, H = lead.last ?? 1
        let qBlocks = kvIndices.shape[kvIndices.rank - 2], kvBlocks = kvIndices.shape[kvIndices.rank - 1]
        guard kvNumBlocks.shape == Array(kvIndices.shape.dropLast()) else {
            throw FlexError("kvNumBlocks has shape \(kvNumBlocks.shape); expected \(Array(kvIndices.shape.dropLast()))")
        }
        let qL = qLen ?? qBlocks * blockSize.q, kvL = kvLen ?? kvBlocks * blockSize.kv
        guard (qL + blockSize.q - 1) / blockSize.q == qBlocks, (kvL + blockSize.kv - 1) / blockSize.kv == kvBlocks else {
            throw FlexError("lengths \(qL)x\(kvL) need \((qL + blockSize.q - 1) / blockSize.q)x\((kvL + blockSize.kv - 1) / blockSize.kv) blocks of \(blockSize); the indices describe \(qBlocks)x\(kvBlocks)")
        }
        var classes = [UInt8](repeating: 0, count: B * H * qBlocks * kvBlocks)
        func fill(_ num: Tensor, _ idx: Tensor, _ value: UInt8, _ what: String) throws {
            let n = try num.toInt32Array(), ix = try idx.toInt32Array()
            for row in 0..<(B * H * qBlocks) {
                guard n[row] >= 0, Int(n[row]) <= kvBlocks else { throw FlexError("\(what) count \(n[row]) in row \(row) is outside 0...\(kvBlocks)") }
                for k in 0..<Int(n[row]) {
                    let c = Int(ix[row * kvBlocks + k])
                    guard (0..<kvBlocks).contains(c) else { throw FlexError("\(what) index \(c) in row \(row) is outside 0..<\(kvBlocks)") }
                    classes[row * kvBlocks + c] = value
                }
            }
        }
        try fill(kvNumBlocks, kvIndices, 1, "kvNumBlocks/kvIndices")
        if let fn = fullKVNumBlocks, let fi = fullKVIndices {
            guard fn.shape == kvNumBlocks.shape, fi.shape == kvIndices.shape else { throw FlexError("full-block tensors must have the shapes of the partial ones") }
            try fill(fn, fi, 2, "fullKVNumBlocks/fullKVIndices")
        }
        let made = try BlockMask.make(classes: classes, B: B, H: H, qLen: qL, kvLen: kvL, blockSize: blockSize, maskMod: maskMod, device: kvIndices.device)
        self.init(B: B, H: H, qLen: qL, kvLen: kvL, blockSize: blockSize, maskMod: maskMod, device: made.device,
                  tensors: made.tensors, classes: classes)
    }

    var tensors: [Tensor] { [kvNumBlocks, kvIndices, fullKVNumBlocks, fullKVIndices, qNumBlocks, qIndices, fullQNumBlocks, fullQIndices] }

    /// Builds every index tensor from block classes (0 empty, 1 partial, 2 full), on the host.
    static func make(classes: [UInt8], B: Int, H: Int, qLen: Int, kvLen: Int, blockSize: BlockSize, maskMod: MaskMod?, device: Device) throws -> BlockMask {
        let qB = (qLen + blockSize.q - 1) / blockSize.q, kvB = (kvLen + blockSize.kv - 1) / blockSize.kv
        let BH = B * H
        var kvNum = [Int32](repeating: 0, count: BH * qB), kvIdx = [Int32](repeating: 0, count: BH * qB * kvB)
        var fkvNum = kvNum, fkvIdx = kvIdx
        var qNum = [Int32](repeating: 0, count: BH * kvB), qIdx = [Int32](repeating: 0, count: BH * kvB * qB)
        var fqNum = qNum, fqIdx = qIdx
        for bh in 0..<BH {
            for qb in 0..<qB {
                let row = bh * qB + qb
                for kvb in 0..<kvB {
                    switch classes[row * kvB + kvb] {
                    case 1: kvIdx[row * kvB + Int(kvNum[row])] = Int32(kvb); kvNum[row] += 1
                    case 2: fkvIdx[row * kvB + Int(fkvNum[row])] = Int32(kvb); fkvNum[row] += 1
                    default: break
                    }
                }
            }
            for kvb in 0..<kvB {
                let col = bh * kvB + kvb
                for qb in 0..<qB {
                    switch classes[(bh * qB + qb) * kvB + kvb] {
                    case 1: qIdx[col * qB + Int(qNum[col])] = Int32(qb); qNum[col] += 1
                    case 2: fqIdx[col * qB + Int(fqNum[col])] = Int32(qb); fqNum[col] += 1
                    default: break
                    }
                }
            }
        }
        let t = [
            try device.tensor(kvNum, shape: [B, H, qB], name: "kv_num_blocks"),
            try device.tensor(kvIdx, shape: [B, H, qB, kvB], name: "kv_indices"),
            try device.tensor(fkvNum, shape: [B, H, qB], name: "full_kv_num_blocks"),
            try device.tensor(fkvIdx, shape: [B, H, qB, kvB], name: "full_kv_indices"),
            try device.tensor(qNum, shape: [B, H, kvB], name: "q_num_blocks"),
            try device.tensor(qIdx, shape: [B, H, kvB, qB], name: "q_indices"),
            try device.tensor(fqNum, shape: [B, H, kvB], name: "full_q_num_blocks"),
            try device.tensor(fqIdx, shape: [B, H, kvB, qB], name: "full_q_indices"),
        ]
        return BlockMask(B: B, H: H, qLen: qLen, kvLen: kvLen, blockSize: blockSize, maskMod: maskMod, device: device, tensors: t, classes: classes)
    }

    /// The class of every block, `[B, H, qBlocks, kvBlocks]`: 0 skipped, 1 partial, 2 full.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func blockClasses() throws -> [UInt8] {
        if let c = lock.withLock({ cachedClasses }) { return c }
        let qB = qBlocks, kvB = kvBlocks
        var classes = [UInt8](repeating: 0, count: B * H * qB * kvB)
        let n = try kvNumBlocks.toInt32Array(), ix = try kvIndices.toInt32Array()
        let fn = try fullKVNumBlocks.toInt32Array(), fx = try fullKVIndices.toInt32Array()
        for row in 0..<(B * H * qB) {
            for k in 0..<Int(n[row]) { classes[row * kvB + Int(ix[row * kvB + k])] = 1 }
            for k in 0..<Int(fn[row]) { classes[row * kvB + Int(fx[row * kvB + k])] = 2 }
        }
        lock.withLock { cachedClasses = classes }
        return classes
    }

    /// The block-level dense mask `[B, H, qBlocks, kvBlocks]` (1 where a block is kept, partial
    /// or full), as PyTorch's `to_dense()`.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func toDense() throws -> Tensor {
        try device.tensor(try blockClasses().map { $0 == 0 ? 0 : 1 }, shape: [B, H, qBlocks, kvBlocks], name: "dense_block_mask")
    }

    /// Percent of the score matrix skipped: `100 × (1 − kept / total)`, where `kept` counts the
    /// in-range elements of every kept block and `total = B·H·qLen·kvLen`. Never negative.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func sparsity() throws -> Double {
        let classes = try blockClasses()
        let qB = qBlocks, kvB = kvBlocks
        var kept = 0
        for bh in 0..<(B * H) {
            for qb in 0..<qB {
                let rows = min(blockSize.q, qLen - qb * blockSize.q)
                for kvb in 0..<kvB where classes[(bh * qB + qb) * kvB + kvb] != 0 {
                    kept += rows * min(blockSize.kv, kvLen - kvb * blockSize.kv)
                }
            }
        }
        let total = B * H * qLen * kvLen
        guard total > 0 else { return 0 }
        return max(0, 100 * (1 - Double(kept) / Double(total)))
    }

    /// The fraction of blocks kept (what the FLOP convention of the benchmarks calls density).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func blockDensity() throws -> Double {
        let c = try blockClasses()
        return c.isEmpty ? 0 : Double(c.filter { $0 != 0 }.count) / Double(c.count)
    }

    /// The mask of batch `b` (B becomes 1). A broadcast mask (B = 1) answers for any `b`.
    public subscript(b: Int) -> BlockMask {
        get throws { try slice(b: b, h: nil) }
    }

    /// The mask of batch `b`, head `h` (B and H become 1).
    public subscript(b: Int, h: Int) -> BlockMask {
        get throws { try slice(b: b, h: h) }
    }

    private func slice(b: Int, h: Int?) throws -> BlockMask {
        guard b >= 0, B == 1 || b < B else { throw FlexError("batch \(b) is out of range for a BlockMask with B = \(B)") }
        if let h { guard h >= 0, H == 1 || h < H else { throw FlexError("head \(h) is out of range for a BlockMask with H = \(H)") } }
        let classes = try blockClasses()
        let per = qBlocks * kvBlocks
        let bb = B == 1 ? 0 : b
        var out: [UInt8] = []
        let heads = h.map { [H == 1 ? 0 : $0] } ?? Array(0..<H)
        for hh in heads { out += classes[((bb * H + hh) * per)..<((bb * H + hh + 1) * per)] }
        return try BlockMask.make(classes: out, B: 1, H: heads.count, qLen: qLen, kvLen: kvLen, blockSize: blockSize, maskMod: maskMod, device: device)
    }

    // MARK: Picture

    /// The block picture (attention-gym legend): `██` full, `░░` partial, blank skipped.
    public var description: String {
        guard let classes = try? blockClasses(), let sp = try? sparsity() else { return "BlockMask(shape=\(tupleShape), unreadable)" }
        var lines = ["BlockMask(shape=\(tupleShape), sparsity=\(String(format: "%.2f", sp))%,"]
        let qB = qBlocks, kvB = kvBlocks
        let rows = min(qB, 20), cols = min(kvB, 20)
        let maxPairs = 8
        var shown = 0
        for b in 0..<B {
            for h in 0..<H {
                if shown == maxPairs {
                    lines.append("... \(B * H - maxPairs) more (b, h) pairs")
                    break
                }
                shown += 1
                lines.append("(\(b), \(h))")
                let base = (b * H + h) * qB * kvB
                for r in 0..<rows {
                    let q0 = r * qB / rows, q1 = (r + 1) * qB / rows
                    var line = ""
                    for c in 0..<cols {
                        let k0 = c * kvB / cols, k1 = (c + 1) * kvB / cols
                        var all2 = true, all0 = true
                        for qb in q0..<q1 { for kvb in k0..<k1 {
                            let v = classes[base + qb * kvB + kvb]
                            if v != 2 { all2 = false }
                            if v != 0 { all0 = false }
                        }}
                        line += all2 ? "██" : all0 ? "  " : "░░"
                    }
                    while line.hasSuffix(" ") { line.removeLast() }
                    lines.append(line)
                }
            }
            if shown == maxPairs && B * H > maxPairs { break }
        }
        if qB > 20 || kvB > 20 {
            lines.append("(\(qB)x\(kvB) blocks shown as \(rows)x\(cols) cells: ██ all full, blank all skipped, ░░ otherwise)")
        }
        lines.append(")")
        return lines.joined(separator: "\n")
    }

    private var tupleShape: String { "(\(B), \(H), \(qLen), \(kvLen))" }
}
