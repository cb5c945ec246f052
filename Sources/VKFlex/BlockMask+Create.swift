import Foundation
import VKFlexExpr
import VKFlexVulkan

/// Where a BlockMask is built.
public enum MaskBackend: Sendable {
    /// A compute shader classifies every tile (the default).
    case gpu
    /// The CPU interpreter, for tests and tiny masks; `float32` rounds float math like a GPU.
    case cpu(precision: Interpreter.Precision = .float64)
}

/// PyTorch's `create_block_mask`: evaluates `maskMod` over every (query block, key block) tile
/// and keeps the tiles that have any pair, split into full and partial ones. Memory grows with
/// the number of blocks, never with `qLen × kvLen`.
///
/// ```swift
/// let causal = MaskMod { _, _, q, kv in q >= kv }
/// let mask = try createBlockMask(causal, B: 1, H: 1, qLen: 8192, kvLen: 8192, device: device)
/// let windowed = try createBlockMask(causal, B: 1, H: 1, qLen: 1000, kvLen: 1000, device: device,
///                                    blockSize: BlockSize(q: 64, kv: 128))
/// ```
/// `B` and `H` may be 1 (broadcast over batches / heads) or the real sizes when the mask uses
/// `b` or `h`. Lengths need not be multiples of the block size; the mod is never evaluated
/// outside `[0, qLen) × [0, kvLen)`.
///
/// The GPU build is enqueued and returns at once. If the mask reads a captured tensor out of
/// range (or divides an int by zero), reading the mask (`sparsity()`, its tensors) or the output
/// of an attention call that uses it throws the kernel's report.
///
/// - Throws: ``FlexError/invalidArgument(_:)`` for non-positive lengths or block sizes or a mask_mod that does not type-check (``FlexError/expression(_:)``); ``FlexError/modFailed(_:)`` when the mask_mod reads a capture out of range; device errors (``FlexError/vulkan(call:result:)``, ``FlexError/limitExceeded(_:)``).
public func createBlockMask(_ maskMod: MaskMod, B: Int, H: Int, qLen: Int, kvLen: Int, device: Device,
                            blockSize: BlockSize = 128, backend: MaskBackend = .gpu) throws -> BlockMask {
    try maskMod.check()
    try blockSize.validate()
    guard B >= 1, H >= 1 else { throw FlexError("createBlockMask: B and H must be at least 1, got B=\(B), H=\(H)") }
    guard qLen >= 1, kvLen >= 1 else { throw FlexError("createBlockMask: lengths must be at least 1, got qLen=\(qLen), kvLen=\(kvLen)") }
    let qB = (qLen + blockSize.q - 1) / blockSize.q, kvB = (kvLen + blockSize.kv - 1) / blockSize.kv
    // Its index tensors hold an int32 per block: refuse, in the caller's terms, what no buffer binds.
    let entries = B * H * qB * kvB, caps = device.capabilities
    if entries * 4 > caps.maxStorageBufferRange {
        throw FlexError.limitExceeded("a BlockMask of B=\(B), H=\(H) with \(qB) x \(kvB) blocks of \(blockSize) keeps \(formatBytes(entries * 4)) of block indices; \(caps.name) binds at most \(formatBytes(caps.maxStorageBufferRange)) per buffer: use a larger block size, or B=1 / H=1 when the mask does not depend on b / h")
    }
    switch backend {
    case .cpu(let precision):
        let classes = try classifyOnCPU(maskMod, B: B, H: H, qLen: qLen, kvLen: kvLen, blockSize: blockSize, precision: precision)
        return try BlockMask.make(classes: classes, B: B, H: H, qLen: qLen, kvLen: kvLen, blockSize: blockSize, maskMod: maskMod, device: device)
    case .gpu:
        return try buildOnGPU(maskMod, B: B, H: H, qLen: qLen, kvLen: kvLen, qB: qB, kvB: kvB, blockSize: blockSize, device: device)
    }
}

func classifyOnCPU(_ maskMod: MaskMod, B: Int, H: Int, qLen: Int, kvLen: Int, blockSize: BlockSize,
                   precision: Interpreter.Precision) throws -> [UInt8] {
    let eval = try Interpreter(maskMod.graph, precision: precision)
    let qB = (qLen + blockSize.q - 1) / blockSize.q, kvB = (kvLen + blockSize.kv - 1) / blockSize.kv
    var classes = [UInt8](repeating: 0, count: B * H * qB * kvB)
    for b in 0..<B { for h in 0..<H { for qb in 0..<qB { for kvb in 0..<kvB {
        var count = 0, total = 0
        for q in (qb * blockSize.q)..<min(qLen, (qb + 1) * blockSize.q) {
            for kv in (kvb * blockSize.kv)..<min(kvLen, (kvb + 1) * blockSize.kv) {
                total += 1
                if eval.bool(b: b, h: h, q: q, kv: kv) { count += 1 }
            }
        }
        classes[((b * H + h) * qB + qb) * kvB + kvb] = count == 0 ? 0 : count == total ? 2 : 1
    }}}}
    if let e = eval.error { throw e }
    return classes
}

struct BlockMaskKernelKey: Hashable, Sendable {
    let mods: String
    let workgroup: Int
}

func buildOnGPU(_ maskMod: MaskMod, B: Int, H: Int, qLen: Int, kvLen: Int, qB: Int, kvB: Int, blockSize: BlockSize, device: Device) throws -> BlockMask {
    let capabilities = device.capabilities
    guard capabilities.subgroupArithmetic else {
        return try createBlockMask(maskMod, B: B, H: H, qLen: qLen, kvLen: kvLen, device: device, blockSize: blockSize, backend: .cpu())
    }
    let BH = B * H
    guard BH <= capabilities.maxWorkgroupCount[2], qB <= capabilities.maxWorkgroupCount[1], kvB <= capabilities.maxWorkgroupCount[0] else {
        throw FlexError("createBlockMask: \(B)x\(H)x\(qB)x\(kvB) blocks exceed the device's dispatch limits; use larger blocks")
    }
    let mods = try SplicedMods(score: nil, mask: maskMod, firstBinding: 2, errorBinding: 1, device: device)
    let caps = device.capabilities
    let wg = max(32, min(256, caps.maxWorkgroupInvocations) / 32 * 32)
    let lib = ShaderLibrary.standard
    let classify = try device.pipeline(for: BlockMaskKernelKey(mods: mods.glsl.source, workgroup: wg)) {
        PipelineDescription(source: ShaderSource(name: "block_mask_classify", text: try lib.text("block_mask.comp")),
                            bindingCount: 2 + mods.tensors.count, pushConstantSize: 32, specialization: [UInt32(wg)],
                            includes: mods.includes)
    }
    let compact = try device.pipeline(for: "vkflex.block_mask_compact") {
        PipelineDescription(source: ShaderSource(name: "block_mask_compact", text: try lib.text("block_mask.comp"), defines: [.init("COMPACT")]),
                            bindingCount: 9, pushConstantSize: 16)
    }
    // One allocation for the classes and the eight index tensors; views at aligned offsets.
    let shapes: [([Int], String)] = [
        ([B, H, qB, kvB], "block_classes"),
        ([B, H, qB], "kv_num_blocks"), ([B, H, qB, kvB], "kv_indices"),
        ([B, H, qB], "full_kv_num_blocks"), ([B, H, qB, kvB], "full_kv_indices"),
        ([B, H, kvB], "q_num_blocks"), ([B, H, kvB, qB], "q_indices"),
        ([B, H, kvB], "full_q_num_blocks"), ([B, H, kvB, qB], "full_q_indices"),
    ]
    let align = max(16, caps.minStorageBufferOffsetAlignment)
    var offsets: [Int] = []
    var total = 0
    for (shape, _) in shapes {
        offsets.append(total)
        total += (shape.reduce(4, *) + align - 1) / align * align
    }
    let storage = try device.makeBuffer(bytes: total)
    let views = zip(shapes, offsets).map { item, offset in
        Tensor(device: device, buffer: storage, byteOffset: offset, shape: item.0, strides: Tensor.contiguousStrides(item.0),
               dtype: .int32, name: item.1)
    }
    let classes = views[0]
    let outputs = Array(views.dropFirst())
    let errors = try mods.makeErrorBuffer(device)
    try device.record { rec in
        try rec.dispatch(classify, bindings: [classes.binding(writes: true), BufferBinding(errors, writes: true)] + mods.captureBindings(),
                         pushConstants: pushBytes(UInt32(qLen), UInt32(kvLen), UInt32(blockSize.q), UInt32(blockSize.kv),
                                                  UInt32(qB), UInt32(kvB), UInt32(H), 0),
                         groups: (kvB, qB, BH))
        let invocations = BH * (qB + kvB)
        try rec.dispatch(compact, bindings: [classes.binding()] + outputs.map { $0.binding(writes: true) },
                         pushConstants: pushBytes(UInt32(qB), UInt32(kvB), UInt32(BH), 0),
                         groups: ((invocations + 63) / 64, 1, 1))
    }
    let mask = BlockMask(B: B, H: H, qLen: qLen, kvLen: kvLen, blockSize: blockSize, maskMod: maskMod, device: device, tensors: outputs, classes: nil)
    if maskMod.graph.canFail {
        // Reported when the mask is read or its attention output is.
        mask.errorCheck = ErrorCheck(errors: errors, captures: mods.glsl.captures)
        for t in outputs { t.addCheck(mask.errorCheck!) }
    }
    return mask
}

/// PyTorch's `create_mask`: the element-level mask `[B, H, qLen, kvLen]`, row-major, evaluated on
/// the GPU. For tests and small cases: memory grows with `qLen × kvLen`.
///
/// - Throws: ``FlexError/invalidArgument(_:)`` for bad lengths, ``FlexError/expression(_:)`` for a mask_mod that does not type-check, ``FlexError/modFailed(_:)`` when it reads a capture out of range.
public func createMask(_ maskMod: MaskMod, B: Int, H: Int, qLen: Int, kvLen: Int, device: Device) throws -> [Bool] {
    try ModEvaluator.evaluate(score: nil, mask: maskMod, B: B, H: H, Q: qLen, KV: kvLen,
                              scores: [Float](repeating: 0, count: B * H * qLen * kvLen), device: device).mask
}
