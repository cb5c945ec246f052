import Foundation
import VKFlexExpr

/// The float64 CPU reference of FlexAttention's semantics, what the tests and `vkflex selftest`
/// compare the kernels with. The mods run through the interpreter in float64.
///
/// ```swift
/// let ref = try flexAttentionReference(q, k, v, scoreMod: softcap, blockMask: mask)
/// let err = relativeL2Error(try out.toArray(), ref.output)
/// ```
public struct ReferenceResult {
    /// `[B, Hq, Lq, Dv]` row-major.
    public var output: [Double]
    /// `[B, Hq, Lq]`, natural log, `-inf` for fully masked rows.
    public var lse: [Double]
    /// `[B, Hq, Lq]`: each row's largest score after scale, score-mod and mask; `-inf` for fully
    /// masked rows, NaN for rows with a NaN score.
    public var maxScores: [Double] = []
}

/// Computes attention in float64 from the tensors' values (read back from the device).
///
/// - Throws: ``FlexError/invalidArgument(_:)`` for the shapes ``flexAttention(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:qOffset:pageTable:sinks:returnLSE:returnMaxScores:out:options:)`` rejects; ``FlexError/modFailed(_:)`` when a mod fails on the CPU.
public func flexAttentionReference(_ q: Tensor, _ k: Tensor, _ v: Tensor, scoreMod: ScoreMod? = nil, blockMask: BlockMask? = nil,
                                   scale: Double? = nil, enableGQA: Bool = false, kvLengths: [Int]? = nil,
                                   sinks: [Float]? = nil, qOffsets: [Int]? = nil) throws -> ReferenceResult {
    let s = try AttentionShape(q, k, v, blockMask: blockMask, enableGQA: enableGQA, queryOffsets: qOffsets != nil)
    let classes = try blockMask?.blockClasses()
    return try referenceAttention(q: try q.toArray(), k: try k.toArray(), v: try v.toArray(),
                                  B: s.B, Hq: s.Hq, Hkv: s.Hkv, Lq: s.Lq, Lkv: s.Lkv, D: s.D, Dv: s.Dv,
                                  scoreMod: scoreMod, blockMask: blockMask.map { ($0, classes!) }, scale: scale ?? 1 / Double(s.D).squareRoot(),
                                  kvLengths: kvLengths, sinks: sinks.map { $0.map(Double.init) }, qOffsets: qOffsets)
}

func referenceAttention(q: [Float], k: [Float], v: [Float], B: Int, Hq: Int, Hkv: Int, Lq: Int, Lkv: Int, D: Int, Dv: Int,
                        scoreMod: ScoreMod?, blockMask: (BlockMask, [UInt8])?, scale: Double, kvLengths: [Int]? = nil,
                        sinks: [Double]? = nil, qOffsets: [Int]? = nil) throws -> ReferenceResult {
    let score = try scoreMod.map { try Interpreter($0.graph) }
    let mask = try blockMask?.0.maskMod.map { try Interpreter($0.graph) }
    var out = [Double](repeating: 0, count: B * Hq * Lq * Dv)
    var lse = [Double](repeating: -.infinity, count: B * Hq * Lq)
    var maxScores = [Double](repeating: -.infinity, count: B * Hq * Lq)
    var s = [Double](repeating: 0, count: Lkv)
    let group = Hkv == 0 ? 1 : Hq / Hkv
    for b in 0..<B {
        for h in 0..<Hq {
            let hk = h / group
            for i in 0..<Lq {
                let qrow = ((b * Hq + h) * Lq + i) * D
                let pos = i + (qOffsets?[b] ?? 0)   // the row's position: what the mods and the BlockMask see
                var m = -Double.infinity
                var rowNaN = false
                for j in 0..<Lkv {
                    if let kvLengths, j >= kvLengths[b] { s[j] = -.infinity; continue }   // no such key
                    var keep = true, partial = false
                    if let (bm, classes) = blockMask {
                        let mb = bm.B == 1 ? 0 : b, mh = bm.H == 1 ? 0 : h
                        let c = classes[((mb * bm.H + mh) * bm.qBlocks + pos / bm.blockSize.q) * bm.kvBlocks + j / bm.blockSize.kv]
                        keep = c != 0
                        partial = c == 1
                    }
                    guard keep else { s[j] = -.infinity; continue }
                    let krow = ((b * Hkv + hk) * Lkv + j) * D
                    var dot = 0.0
                    for d in 0..<D { dot += Double(q[qrow + d]) * Double(k[krow + d]) }
                    var x = dot * scale
                    if let score { x = score.float(score: x, b: b, h: h, q: pos, kv: j) }
                    if partial, let mask, !mask.bool(b: b, h: h, q: pos, kv: j) { x = -.infinity }
                    s[j] = x
                    if x.isNaN { rowNaN = true } else { m = max(m, x) }
                }
                let orow = ((b * Hq + h) * Lq + i) * Dv
                // Only -inf masks: a NaN score on a kept pair makes the row and its LSE NaN (PyTorch).
                if rowNaN {
                    for d in 0..<Dv { out[orow + d] = .nan }
                    lse[(b * Hq + h) * Lq + i] = .nan
                    maxScores[(b * Hq + h) * Lq + i] = .nan
                    continue
                }
                maxScores[(b * Hq + h) * Lq + i] = m
                // A sink joins the denominator with no value row (and sets the max it is taken from).
                let sink = sinks?[h] ?? -.infinity
                let mAll = max(m, sink)
                guard mAll > -.infinity else { continue }
                var l = sink > -.infinity ? Foundation.exp(sink - mAll) : 0
                for j in 0..<Lkv {
                    let p = s[j] == -.infinity ? 0 : Foundation.exp(s[j] - mAll)
                    guard p != 0 else { continue }
                    l += p
                    let vrow = ((b * Hkv + hk) * Lkv + j) * Dv
                    for d in 0..<Dv { out[orow + d] += p * Double(v[vrow + d]) }
                }
                for d in 0..<Dv { out[orow + d] /= l }
                lse[(b * Hq + h) * Lq + i] = mAll + Foundation.log(l)
            }
        }
    }
    if let e = score?.error ?? mask?.error { throw e }
    return ReferenceResult(output: out, lse: lse, maxScores: maxScores)
}

/// `‖a − b‖ / ‖b‖` (∞ when `a` has a NaN, or `b` is all zeros and `a` is not).
public func relativeL2Error(_ a: [Float], _ b: [Double]) -> Double {
    var num = 0.0, den = 0.0
    for (x, y) in zip(a, b) {
        if x.isNaN { return .infinity }
        num += (Double(x) - y) * (Double(x) - y)
        den += y * y
    }
    if a.count != b.count { return .infinity }
    if den == 0 { return num == 0 ? 0 : .infinity }
    return (num / den).squareRoot()
}

/// The float64 reference for some query rows of one (batch 0, head 0) slice: `q` holds the rows'
/// query vectors (`rows.count × D`), `k`/`v` the whole key/value head. Returns `rows.count × Dv`.
/// What `vkflex bench` checks a slice of a large output with.
///
/// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
public func attentionReferenceRows(q: [Float], rows: [Int], k: [Float], v: [Float], Lkv: Int, D: Int, Dv: Int,
                                   scoreMod: ScoreMod?, blockMask: BlockMask?, scale: Double? = nil) throws -> [Double] {
    let score = try scoreMod.map { try Interpreter($0.graph) }
    let mask = try blockMask?.maskMod.map { try Interpreter($0.graph) }
    let classes = try blockMask?.blockClasses()
    let sc = scale ?? 1 / Double(D).squareRoot()
    var out = [Double](repeating: 0, count: rows.count * Dv)
    var s = [Double](repeating: 0, count: Lkv)
    for (ri, i) in rows.enumerated() {
        var m = -Double.infinity
        for j in 0..<Lkv {
            var partial = false
            if let bm = blockMask, let classes {
                let c = classes[(i / bm.blockSize.q) * bm.kvBlocks + j / bm.blockSize.kv]
                if c == 0 { s[j] = -.infinity; continue }
                partial = c == 1
            }
            var dot = 0.0
            for d in 0..<D { dot += Double(q[ri * D + d]) * Double(k[j * D + d]) }
            var x = dot * sc
            if let score { x = score.float(score: x, b: 0, h: 0, q: i, kv: j) }
            if partial, let mask, !mask.bool(b: 0, h: 0, q: i, kv: j) { x = -.infinity }
            s[j] = x
            m = max(m, x)
        }
        guard m > -.infinity else { continue }
        var l = 0.0
        for j in 0..<Lkv where s[j] > -.infinity {
            let p = Foundation.exp(s[j] - m)
            l += p
            for d in 0..<Dv { out[ri * Dv + d] += p * Double(v[j * Dv + d]) }
        }
        for d in 0..<Dv { out[ri * Dv + d] /= l }
    }
    return out
}

/// The gradients ``flexAttentionBackwardReference(_:_:_:gradOutput:gradLSE:scoreMod:blockMask:scale:enableGQA:kvLengths:sinks:gradCaptures:)``
/// computes, row-major, in float64.
public struct ReferenceGradients {
    /// In the shapes of q, k and v.
    public var dq: [Double], dk: [Double], dv: [Double]
    /// `[Hq]`, with sinks: `−Σ_{b,i} exp(sink_h − LSE_bhi)·Δ_bhi`.
    public var dsinks: [Double] = []
    /// The gradients of the `gradCaptures:` tensors, in that order, each in its capture's shape:
    /// by reverse-mode differentiation of the score-mod at every kept pair (``ReverseMode``), not
    /// by the symbolic derivative the kernels splice.
    public var captures: [[Double]] = []
}

/// The backward pass in float64 on the CPU, from the tensors' values: the forward (P, LSE, O)
/// recomputed in float64, then `Δ = rowsum(dO ⊙ O) − dLSE`, `dS = P ⊙ (dO·Vᵀ − Δ) · ∂mod/∂score`
/// over the pairs the mask keeps, `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, `dV = Pᵀ·dO`; with
/// `gradCaptures:`, `dc[e] = Σ P ⊙ (dO·Vᵀ − Δ) · ∂mod/∂c[e]` over the same pairs.
///
/// - Throws: what ``flexAttentionReference(_:_:_:scoreMod:blockMask:scale:enableGQA:kvLengths:sinks:qOffsets:)`` throws.
public func flexAttentionBackwardReference(_ q: Tensor, _ k: Tensor, _ v: Tensor, gradOutput: Tensor, gradLSE: Tensor? = nil,
                                           scoreMod: ScoreMod? = nil, blockMask: BlockMask? = nil, scale: Double? = nil,
                                           enableGQA: Bool = false, kvLengths: [Int]? = nil, sinks: [Float]? = nil,
                                           gradCaptures: [Tensor] = []) throws -> ReferenceGradients {
    let s = try AttentionShape(q, k, v, blockMask: blockMask, enableGQA: enableGQA)
    _ = try captureGradientTargets(gradCaptures, scoreMod: scoreMod, blockMask: blockMask)
    let reverse = try gradCaptures.isEmpty ? nil : scoreMod.map { try ReverseMode($0.graph) }
    var dcaps = gradCaptures.map { [Double](repeating: 0, count: $0.count) }
    let capIndex = Dictionary(uniqueKeysWithValues: gradCaptures.enumerated().map { ($1.id, $0) })
    let scale = scale ?? 1 / Double(s.D).squareRoot()
    let fwd = try flexAttentionReference(q, k, v, scoreMod: scoreMod, blockMask: blockMask, scale: scale, enableGQA: enableGQA,
                                         kvLengths: kvLengths, sinks: sinks)
    var dsinks = [Double](repeating: 0, count: sinks == nil ? 0 : s.Hq)
    let qv = try q.toArray(), kv = try k.toArray(), vv = try v.toArray(), dO = try gradOutput.toArray()
    let dlse = try gradLSE?.toArray()
    let classes = try blockMask?.blockClasses()
    let score = try scoreMod.map { try Interpreter($0.graph) }
    let grad = try scoreMod.map { try Interpreter($0.graph.derivative()) }
    let mask = try blockMask?.maskMod.map { try Interpreter($0.graph) }
    var dq = [Double](repeating: 0, count: qv.count), dk = [Double](repeating: 0, count: kv.count), dv = [Double](repeating: 0, count: vv.count)
    let group = s.Hq / max(1, s.Hkv)
    for b in 0..<s.B {
        for h in 0..<s.Hq {
            let hk = h / group
            for i in 0..<s.Lq {
                let row = (b * s.Hq + h) * s.Lq + i
                let lse = fwd.lse[row]
                guard lse > -.infinity else { continue }
                var delta = 0.0
                for d in 0..<s.Dv { delta += Double(dO[row * s.Dv + d]) * fwd.output[row * s.Dv + d] }
                if let dlse { delta -= Double(dlse[row]) }
                if let sinks { dsinks[h] -= Foundation.exp(Double(sinks[h]) - lse) * delta }
                for j in 0..<(kvLengths?[b] ?? s.Lkv) {
                    if let bm = blockMask, let classes {
                        let mb = bm.B == 1 ? 0 : b, mh = bm.H == 1 ? 0 : h
                        let c = classes[((mb * bm.H + mh) * bm.qBlocks + i / bm.blockSize.q) * bm.kvBlocks + j / bm.blockSize.kv]
                        if c == 0 { continue }
                        if c == 1, let mask, !mask.bool(b: b, h: h, q: i, kv: j) { continue }
                    }
                    let krow = ((b * s.Hkv + hk) * s.Lkv + j)
                    var dot = 0.0, dp = 0.0
                    for d in 0..<s.D { dot += Double(qv[row * s.D + d]) * Double(kv[krow * s.D + d]) }
                    for d in 0..<s.Dv { dp += Double(dO[row * s.Dv + d]) * Double(vv[krow * s.Dv + d]) }
                    let raw = dot * scale
                    let modded = score.map { $0.float(score: raw, b: b, h: h, q: i, kv: j) } ?? raw
                    let p = Foundation.exp(modded - lse)
                    let ds = p * (dp - delta) * (grad.map { $0.float(score: raw, b: b, h: h, q: i, kv: j) } ?? 1)
                    for d in 0..<s.D {
                        dq[row * s.D + d] += scale * ds * Double(kv[krow * s.D + d])
                        dk[krow * s.D + d] += scale * ds * Double(qv[row * s.D + d])
                    }
                    for d in 0..<s.Dv { dv[krow * s.Dv + d] += p * Double(dO[row * s.Dv + d]) }
                    if let reverse {
                        for (id, elements) in reverse.evaluate(score: raw, b: b, h: h, q: i, kv: j).captures {
                            guard let c = capIndex[id] else { continue }
                            for (e, partial) in elements { dcaps[c][e] += p * (dp - delta) * partial }
                        }
                    }
                }
            }
        }
    }
    if let e = score?.error ?? grad?.error ?? mask?.error { throw e }
    return ReferenceGradients(dq: dq, dk: dk, dv: dv, dsinks: dsinks, captures: dcaps)
}
