import Foundation
import VKFlexExpr
import VKFlexVulkan

/// A score-mod and mask-mod turned into GLSL for one kernel, with the buffers their captures bind.
struct SplicedMods {
    let glsl: GLSLMods
    let tensors: [Tensor]

    /// The name of the generated include every template pulls in.
    static let includeName = "flex_mods.glsl"

    /// - Parameter gradCaptures: float captures of the score-mod whose gradients the kernel
    ///   scatters (``GLSLEmitter/emit(scoreMod:maskMod:firstBinding:errorBinding:gradCaptures:)``).
    /// - Parameter bindsCaptures: false for a second splice of the same mods whose pipelines bind
    ///   the first one's capture buffers: `tensors` stays empty (no 16-bit capture widened twice).
    /// - Parameter rowShiftInvariant: no dLSE and no sinks (``GLSLEmitter``: per-row terms of the
    ///   captures' gradients are exactly 0 and left out).
    init(score: ScoreMod?, mask: MaskMod?, firstBinding: Int, errorBinding: Int, gradCaptures: [CaptureInfo] = [], rowShiftInvariant: Bool = false,
         bindsCaptures: Bool = true, device: Device) throws {
        try score?.check()
        try mask?.check()
        // The emitted GLSL depends on the graphs and bindings alone: emitted once per device, cached
        // without the captures' storage so that the cache keeps no tensor alive (a call's host cost
        // with a mask and a score-mod: 190 -> 31 µs; docs/performance.md, "Host cost per call").
        let key = ModsCacheKey(score: score?.graph.withoutCaptureStorage, mask: mask?.graph.withoutCaptureStorage,
                               firstBinding: firstBinding, errorBinding: errorBinding, gradCaptures: gradCaptures.map(\.id),
                               rowShiftInvariant: rowShiftInvariant)
        let cache = try device.memoized("vkflex.mods-glsl") { ModsCache() }
        var emitted: GLSLMods
        if let known = cache.get(key) {
            emitted = known
        } else {
            emitted = try GLSLEmitter.emit(scoreMod: score?.graph, maskMod: mask?.graph, firstBinding: firstBinding, errorBinding: errorBinding,
                                           gradCaptures: gradCaptures, rowShiftInvariant: rowShiftInvariant)
            var stored = emitted
            stored.captures = emitted.captures.map { CaptureInfo(id: $0.id, name: $0.name, dtype: $0.dtype, shape: $0.shape) }
            cache.put(key, stored)
        }
        // The captures with their tensors, from this call's graphs (same ids, same order).
        let live = Dictionary(((score?.graph.captures ?? []) + (mask?.graph.captures ?? [])).map { ($0.id, $0) }) { a, _ in a }
        emitted.captures = emitted.captures.map { live[$0.id] ?? $0 }
        glsl = emitted
        tensors = !bindsCaptures ? [] : try glsl.captures.map { cap in
            guard let t = cap.storage.object as? Tensor else {
                throw FlexError("\(cap.name) is a host tensor; captures used on the GPU must be device tensors (device.tensor(...))")
            }
            guard t.device === device else { throw FlexError("captured tensor \(t.name) belongs to another device") }
            // 16-bit float captures are read through a float32 copy (the mods compute in float32).
            if t.dtype == .float16 || t.dtype == .bfloat16 {
                return try device.tensor(try t.toArray(), shape: t.shape, dtype: .float32, name: t.name)
            }
            guard t.isContiguous else { throw FlexError("captured tensor \(t.name) is a strided view; captures must be contiguous") }
            guard t.count > 0 else { throw FlexError("captured tensor \(t.name) is empty") }
            guard t.byteOffset % device.capabilities.minStorageBufferOffsetAlignment == 0 else {
                throw FlexError("captured tensor \(t.name) starts at byte \(t.byteOffset), not a multiple of \(device.capabilities.minStorageBufferOffsetAlignment)")
            }
            return t
        }
    }

    /// The generated includes: the mods, and the attention kernels' bindings and parameter block.
    var includes: [String: String] { [SplicedMods.includeName: glsl.source, AttentionParams.includeName: AttentionParams.glsl] }

    func captureBindings() -> [BufferBinding] {
        tensors.map { BufferBinding($0.buffer, offset: $0.byteOffset, size: $0.count * 4) }
    }

    /// A zeroed error buffer (`int vkf_err[4]`), host-visible so that checking it needs no copy.
    func makeErrorBuffer(_ device: Device) throws -> Buffer {
        let b = try device.makeBuffer(bytes: 16, hostVisible: true)
        try b.upload([Int32](repeating: 0, count: 4))
        return b
    }

    /// Reads the error buffer after the work ran; throws what the kernel reported.
    func check(errors: Buffer) throws {
        let e = try errors.download(count: 4, as: Int32.self)
        try SplicedMods.decode(e, captures: glsl.captures)
    }

    static func decode(_ e: [Int32], captures: [CaptureInfo]) throws {
        switch GLSLMods.ErrorCode(rawValue: e[0]) {
        case .noError: return
        case .indexOutOfRange:
            let cap = captures.indices.contains(Int(e[1])) ? captures[Int(e[1])] : CaptureInfo(id: -1, name: "a captured tensor", dtype: .int32, shape: [])
            throw FlexError.indexOutOfRange(name: cap.name, shape: cap.shape, index: e[2], dim: Int(e[3]))
        case .divisionByZero: throw FlexError.divisionByZero
        case .negativePower: throw FlexError.negativePower
        case .walkIncomplete:
            throw FlexError.limitExceeded("the device stopped the attention kernel's loops before it had read every key (Mesa's lavapipe ends a shader's loops after 65535 iterations), so the output would be wrong; vkflex splits long key ranges to avoid this, and missed here: please report the shapes and the device")
        case nil:
            throw FlexError.modFailed("the kernel reported error code \(e[0])")
        }
    }
}

/// Runs mods on the GPU over an index grid: what the tests and `vkflex selftest` compare with the
/// CPU interpreter.
public enum ModEvaluator {
    public struct Result {
        /// `score_mod(score, b, h, q, kv)`, its derivative, and `mask_mod(b, h, q, kv)`, row-major over [B, H, Q, KV].
        public var scores: [Float]
        public var gradients: [Float]
        public var mask: [Bool]
    }

    /// Which form of the score-mod fills `Result.scores`.
    public enum ScoreForm: Int32, Sendable {
        /// `score_mod` itself.
        case plain = 0
        /// `score_mod` times log2(e), through `score_mod_l2` where the emitter wrote one (the
        /// form the attention kernels take before their `exp2`).
        case log2 = 1
        /// The same through `score_mod_l2f`, with float indices, where the emitter wrote one.
        case log2FloatIndices = 2
    }

    struct Key: Hashable, Sendable { let source: String, exactTanh: Bool }

    /// Evaluates `score` (on the given `scores`) and `mask` over the grid; `form` picks the form of
    /// the score-mod that fills `Result.scores`; `exactTanh` the tanh that forward calls returning
    /// the LSE take (within a few float roundings, not ~1e-7 absolute).
    ///
    /// ```swift
    /// let alibi = try ScoreMod(parsing: "score + slope[h] * (kv_idx - q_idx)", captures: ["slope": slope])
    /// let r = try ModEvaluator.evaluate(score: alibi, mask: nil, B: 1, H: 2, Q: 4, KV: 4,
    ///                                   scores: [Float](repeating: 0.5, count: 32), form: .log2, device: device)
    /// // r.scores: score_mod times log2(e), as the attention kernels compute it
    /// ```
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public static func evaluate(score: ScoreMod?, mask: MaskMod?, B: Int, H: Int, Q: Int, KV: Int,
                                scores: [Float], form: ScoreForm = .plain, exactTanh: Bool = false, device: Device) throws -> Result {
        let n = B * H * Q * KV
        guard scores.count == n, n > 0 else { throw FlexError("need \(n) scores for the grid, got \(scores.count)") }
        let mods = try SplicedMods(score: score, mask: mask, firstBinding: 5, errorBinding: 4, device: device)
        let pipeline = try device.pipeline(for: Key(source: mods.glsl.source, exactTanh: exactTanh)) {
            PipelineDescription(source: ShaderSource(name: "mod_eval", text: try ShaderLibrary.standard.text("mod_eval.comp"),
                                                     defines: exactTanh ? [.init("VKF_EXACT_TANH", "1")] : []),
                                bindingCount: 5 + mods.tensors.count, pushConstantSize: 20, includes: mods.includes)
        }
        let input = try device.makeBuffer(bytes: n * 4)
        try input.upload(scores)
        let outScore = try device.makeBuffer(bytes: n * 4), outGrad = try device.makeBuffer(bytes: n * 4), outMask = try device.makeBuffer(bytes: n * 4)
        let errors = try mods.makeErrorBuffer(device)
        let bindings = [BufferBinding(input), BufferBinding(outScore, writes: true), BufferBinding(outGrad, writes: true),
                        BufferBinding(outMask, writes: true), BufferBinding(errors, writes: true)] + mods.captureBindings()
        try device.record { rec in
            try rec.dispatch(pipeline, bindings: bindings, pushConstants: pushBytes(UInt32(B), UInt32(H), UInt32(Q), UInt32(KV), UInt32(form.rawValue)),
                             groups: ((n + 63) / 64, 1, 1))
        }
        try mods.check(errors: errors)
        return Result(scores: try outScore.download(count: n, as: Float.self),
                      gradients: try outGrad.download(count: n, as: Float.self),
                      mask: try outMask.download(count: n, as: Int32.self).map { $0 != 0 })
    }
}

struct ModsCacheKey: Hashable, Sendable {
    let score: Expr?
    let mask: Expr?
    let firstBinding: Int
    let errorBinding: Int
    var gradCaptures: [Int] = []
    var rowShiftInvariant = false
}

/// The GLSL emitted per pair of mods on a device, bounded (cleared past 256 entries).
final class ModsCache: @unchecked Sendable {
    private let lock = NSLock()
    private var entries: [ModsCacheKey: GLSLMods] = [:]
    func get(_ key: ModsCacheKey) -> GLSLMods? { lock.withLock { entries[key] } }
    func put(_ key: ModsCacheKey, _ value: GLSLMods) {
        lock.withLock {
            if entries.count >= 256 { entries.removeAll() }
            entries[key] = value
        }
    }
}
