import Foundation
import XCTest
import VKFlexVulkan
@testable import VKFlex

/// Gradients of captured tensors (learnable biases) against the float64 reverse-mode reference,
/// with float atomics and without; the reference itself against central differences.
final class CaptureGradientTests: FlexTestCase {
    struct Inputs {
        let q: Tensor, k: Tensor, v: Tensor, dO: Tensor
    }

    func inputs(B: Int = 1, Hq: Int, Hkv: Int? = nil, Lq: Int, Lkv: Int, D: Int = 16, dtype: DType = .float32, on device: Device) throws -> Inputs {
        let Hkv = Hkv ?? Hq
        return Inputs(q: try device.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: dtype),
                      k: try device.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: dtype),
                      v: try device.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: dtype),
                      dO: try device.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: dtype))
    }

    /// Runs forward and backward, compares each capture's gradient with the reference: relative
    /// L2 within `tol` where the reference is not all zeros, absolute 1e-5 where it is.
    func check(_ name: String, _ x: Inputs, score: ScoreMod, mask: MaskMod? = nil, captures: [Tensor], tol: Double = 1e-3,
               zero: Bool = false, zeroTol: Double = 1e-5, line: UInt = #line) throws {
        let s = x.q.shape, gqa = x.q.shape[1] != x.k.shape[1]
        let bm = try mask.map { try createBlockMask($0, B: 1, H: 1, qLen: s[2], kvLen: x.k.shape[2], device: x.q.device, blockSize: 16) }
        let fwd = try flexAttention(x.q, x.k, x.v, scoreMod: score, blockMask: bm, enableGQA: gqa, returnLSE: true, options: FlexOptions(kernel: .portable))
        let g = try fwd.backward(gradOutput: x.dO, gradCaptures: captures)
        let ref = try flexAttentionBackwardReference(x.q, x.k, x.v, gradOutput: x.dO, scoreMod: score, blockMask: bm, enableGQA: gqa,
                                                     gradCaptures: captures)
        for (i, c) in captures.enumerated() {
            let got = try XCTUnwrap(g.gradient(of: c), line: line)
            XCTAssertEqual(got.shape, c.shape, line: line)
            XCTAssertEqual(got.dtype, .float32, line: line)
            let values = try got.toArray(), r = ref.captures[i]
            if zero && zeroTol == 0 {
                // Exactly zero (the reference's float64 sums leave ~1e-15).
                XCTAssertEqual(values.map(abs).max() ?? 0, 0, "\(name) \(c.name)", line: line)
                XCTAssertLessThanOrEqual(r.map(abs).max() ?? 0, 1e-12, "\(name) \(c.name): the reference", line: line)
            } else if zero {
                XCTAssertLessThanOrEqual(zip(values, r).map { abs(Double($0) - $1) }.max() ?? 0, zeroTol, "\(name) \(c.name)", line: line)
            } else {
                XCTAssertGreaterThan(r.map(abs).max() ?? 0, 1e-3, "\(name) \(c.name): the reference is all zeros", line: line)
                XCTAssertLessThanOrEqual(relativeL2Error(values, r), tol, "\(name) \(c.name)", line: line)
            }
        }
        // dQ, dK and dV are those of a call without gradCaptures.
        let plain = try fwd.backward(gradOutput: x.dO)
        XCTAssertEqual(try g.dq.toArray(), try plain.dq.toArray(), line: line)
    }

    func cases(on device: Device, fp16: Bool = false) throws {
        let dtype: DType = fp16 ? .float16 : .float32, tol = fp16 ? 1e-2 : 1e-3
        let (H, L) = (4, 40)
        let x = try inputs(Hq: H, Lq: L, Lkv: L, dtype: dtype, on: device)
        let causal = MaskMod { _, _, q, kv in q >= kv }
        // A learnable bias per key (1-D), per pair (2-D), by relative position (a computed index).
        let perKey = try device.tensor(randn(L, scale: 0.5), shape: [L], name: "key_bias")
        try check("1-D", x, score: ScoreMod { s, _, _, _, kv in s + perKey[kv] }, captures: [perKey], tol: tol)
        let pair = try device.tensor(randn(L * L, scale: 0.5), shape: [L, L], name: "pair_bias")
        try check("2-D causal", x, score: ScoreMod { s, _, _, q, kv in s + pair[q, kv] }, mask: causal, captures: [pair], tol: tol)
        let rel = try device.tensor(randn(2 * L - 1, scale: 0.5), shape: [2 * L - 1], name: "rel")
        try check("relative table", x, score: ScoreMod { s, _, _, q, kv in s + rel[q - kv + (L - 1)] }, mask: causal, captures: [rel], tol: tol)
        // ALiBi slopes, per-head temperatures, a table read twice and a head bias beside it.
        let slopes = try device.tensor([0.5, 0.25, 0.125, 0.0625], shape: [H], name: "slope")
        try check("ALiBi", x, score: ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }, mask: causal, captures: [slopes], tol: tol)
        let temp = try device.tensor([1.0, 0.5, 2.0, 1.5], shape: [H], name: "temp")
        try check("temperature", x, score: ScoreMod { s, _, h, _, _ in s * temp[h] }, captures: [temp], tol: tol)
        let w = try device.tensor(randn(H, scale: 0.5), shape: [H], name: "w")
        try check("read twice, two captures", x, score: ScoreMod { s, _, h, q, kv in 10 * tanh((s + rel[q - kv + (L - 1)] * w[h]) / 10) + w[h] * w[h] * (kv - q) / 8 },
                  captures: [rel, w], tol: tol)
        // A bias by head or by query row alone shifts a whole softmax row: exactly zero gradient
        // (Σ_j P(dP − Δ) = dO·O − Δ = 0), and exactly 0 it is — those terms are left out, not
        // summed to rounding noise (with 16-bit inputs that noise was the output's rounding,
        // 3e-3 here, since Δ comes from the stored output).
        let head = try device.tensor(randn(H), shape: [H], name: "head_bias")
        let row = try device.tensor(randn(L), shape: [L], name: "row_bias")
        try check("by head and row", x, score: ScoreMod { s, _, h, q, _ in s + head[h] + row[q] }, captures: [head, row], zero: true, zeroTol: 0)
        // Beside a per-key term in the same mod, the per-row one still drops out, the other not.
        try check("head bias beside a key bias", x, score: ScoreMod { s, _, h, _, kv in s + head[h] + perKey[kv] }, captures: [perKey], tol: tol)
        try check("head bias beside a key bias (its own)", x, score: ScoreMod { s, _, h, _, kv in s + head[h] + perKey[kv] }, captures: [head],
                  zero: true, zeroTol: 0)
    }

    /// With dLSE the loss sees a shift of a row (d LSE / d shift = 1): a head bias then has the
    /// gradient Σ_rows dLSE, computed, not left out.
    func testARowBiasWithGradLSE() throws {
        let (H, L) = (2, 24)
        let x = try inputs(Hq: H, Lq: L, Lkv: L, on: device)
        let head = try device.tensor([0.3, -0.2], shape: [H], name: "head_bias")
        let dLSE = randn(H * L)
        let gl = try device.tensor(dLSE, shape: [1, H, L])
        let score = ScoreMod { s, _, h, _, _ in s + head[h] }
        let fwd = try flexAttention(x.q, x.k, x.v, scoreMod: score, returnLSE: true)
        let g = try fwd.backward(gradOutput: x.dO, gradLSE: gl, gradCaptures: [head])
        let got = try XCTUnwrap(g.gradient(of: head)).toArray()
        let ref = try flexAttentionBackwardReference(x.q, x.k, x.v, gradOutput: x.dO, gradLSE: gl, scoreMod: score, gradCaptures: [head])
        for h in 0..<H {
            let rows = dLSE[(h * L)..<((h + 1) * L)].reduce(0, +)
            XCTAssertEqual(ref.captures[0][h], Double(rows), accuracy: 1e-4)
            XCTAssertEqual(Double(got[h]), Double(rows), accuracy: 1e-4)
        }
    }

    func testGradientsOfCapturesMatchTheReference() throws {
        XCTAssertTrue(device.enabledFeatures.floatAtomicAdd, "lavapipe has float atomic adds: this test covers that path")
        try cases(on: device)
    }

    func testFloat16Inputs() throws {
        try cases(on: device, fp16: true)
    }

    /// The path without float atomics (per-workgroup slices summed afterwards), forced on lavapipe.
    func testWithoutFloatAtomics() throws {
        let plain = try Device(selector: ProcessInfo.processInfo.environment["VKFLEX_DEVICE"] ?? "llvmpipe",
                               options: .init(validation: true, floatAtomics: false))
        XCTAssertFalse(plain.enabledFeatures.floatAtomicAdd)
        try cases(on: plain)
        // GQA with rows of 30,000 keys: lavapipe's loop cap splits each row's keys across
        // workgroups; 2 × 2 × 4,200 rows: more tiles of 16 rows (1,056) than slices (1,024), so a
        // workgroup walks several.
        for (B, Lq, Lkv) in [(1, 5, 30_000), (2, 4200, 20)] {
            let x = try inputs(B: B, Hq: 2, Hkv: 1, Lq: Lq, Lkv: Lkv, on: plain)
            let bias = try plain.tensor(randn(Lkv, scale: 0.5), shape: [Lkv], name: "kv_bias")
            try check("\(Lq)x\(Lkv)", x, score: ScoreMod { s, _, _, _, kv in s + bias[kv] }, captures: [bias])
        }
        try plain.synchronize()
    }

    /// The reference's gradients (reverse mode) against central differences of the float64 forward.
    func testReferenceAgainstFiniteDifferences() throws {
        let (H, L) = (2, 12)
        let x = try inputs(Hq: H, Lq: L, Lkv: L, D: 8, on: device)
        let table = randn(2 * L - 1, scale: 0.5), temps: [Float] = [0.7, 1.3]
        func mod(_ rel: Tensor, _ temp: Tensor) -> ScoreMod {
            ScoreMod { s, _, h, q, kv in 5 * tanh(s * temp[h] / 5) + rel[q - kv + (L - 1)] }
        }
        let rel = try device.tensor(table, shape: [2 * L - 1]), temp = try device.tensor(temps, shape: [H])
        let ref = try flexAttentionBackwardReference(x.q, x.k, x.v, gradOutput: x.dO, scoreMod: mod(rel, temp), gradCaptures: [rel, temp])
        let dO = try x.dO.toArray().map(Double.init)
        func loss(_ t: [Float], _ p: [Float]) throws -> Double {
            let f = try flexAttentionReference(x.q, x.k, x.v, scoreMod: mod(try device.tensor(t, shape: [2 * L - 1]), try device.tensor(p, shape: [H])))
            return zip(f.output, dO).reduce(0) { $0 + $1.0 * $1.1 }
        }
        for e in [0, 5, L - 1, 2 * L - 2] {
            var up = table, down = table
            up[e] += 1e-3; down[e] -= 1e-3
            let numeric = (try loss(up, temps) - loss(down, temps)) / Double(up[e] - down[e])
            XCTAssertEqual(ref.captures[0][e], numeric, accuracy: 1e-4 * max(1, abs(numeric)), "rel[\(e)]")
        }
        for h in 0..<H {
            var up = temps, down = temps
            up[h] += 1e-3; down[h] -= 1e-3
            let numeric = (try loss(table, up) - loss(table, down)) / Double(up[h] - down[h])
            XCTAssertEqual(ref.captures[1][h], numeric, accuracy: 1e-4 * max(1, abs(numeric)), "temp[\(h)]")
        }
    }

    func testBadRequestsAreCleanErrors() throws {
        let x = try inputs(Hq: 2, Lq: 8, Lkv: 8, on: device)
        let bias = try device.tensor(randn(8), shape: [8], name: "bias")
        let other = try device.tensor(randn(8), shape: [8], name: "other")
        let docs = try device.tensor([Int32](repeating: 0, count: 8), shape: [8], name: "doc")
        let ids = try device.tensor([Int32](repeating: 1, count: 8), shape: [8], name: "ids")
        let score = ScoreMod { s, _, _, _, kv in s + bias[kv] + ids[kv] }
        let bm = try createBlockMask(MaskMod { _, _, q, kv in docs[q] == docs[kv] }, B: 1, H: 1, qLen: 8, kvLen: 8, device: device, blockSize: 16)
        let fwd = try flexAttention(x.q, x.k, x.v, scoreMod: score, blockMask: bm, returnLSE: true)
        for (tensors, message) in [([ids], "ids is an int32 tensor"), ([other], "the score-mod does not read other"),
                                   ([docs], "doc is an int32 tensor"), ([bias, bias], "lists bias twice")] {
            XCTAssertThrowsError(try fwd.backward(gradOutput: x.dO, gradCaptures: tensors)) {
                XCTAssertTrue("\($0)".contains(message), "\($0)")
            }
        }
        let maskBias = try device.tensor(randn(8), shape: [8], name: "mask_bias")
        let bm2 = try createBlockMask(MaskMod { _, _, q, kv in maskBias[kv] > 0 }, B: 1, H: 1, qLen: 8, kvLen: 8, device: device, blockSize: 16)
        let fwd2 = try flexAttention(x.q, x.k, x.v, blockMask: bm2, returnLSE: true)
        XCTAssertThrowsError(try fwd2.backward(gradOutput: x.dO, gradCaptures: [maskBias])) {
            XCTAssertTrue("\($0)".contains("read only by the mask-mod"), "\($0)")
        }
    }
}

extension CaptureGradientTests {
    /// The coopmat-nv forward evaluates P in fp16 with a score-mod (faster), except where the call
    /// returns the LSE: fp16 P put the LSE off by a few 1e-4, which the backward turned into bias
    /// gradients 3-10x PyTorch's error on an H100 (docs/performance.md, 2026-12-05).
    func testTheForwardKeepsPInFloat32WhenItReturnsTheLSE() throws {
        let q = try device.tensor(randn(128 * 64), shape: [1, 1, 128, 64], dtype: .float16)
        let s = try AttentionShape(q, q, q, blockMask: nil, enableGQA: false)
        let softcap = ScoreMod { score, _, _, _, _ in 20 * tanh(score / 20) }
        let mods = try SplicedMods(score: softcap, mask: nil, firstBinding: AttentionBinding.firstCapture,
                                   errorBinding: AttentionBinding.errors.rawValue, device: device)
        for lse in [false, true] {
            let plan = try AttentionPlanner.forward(shape: s, mods: mods, scoreMod: softcap, blockMask: nil, scale: 0.125, kernel: .coopmatNV,
                                                    device: device, lse: lse)
            XCTAssertEqual(plan.exp16, !lse, "returnLSE: \(lse)")
        }
    }

    /// The exact tanh (`VKF_EXACT_TANH`) where the call returns the LSE and a mod takes a tanh, in the
    /// portable and split-KV kernels only: coopmat-nv's soft-cap forward ran at half speed with it
    /// on an H100 (docs/performance.md, 2026-12-07).
    func testTheExactTanhWhereTheLSEIsReturned() throws {
        let q = try device.tensor(randn(128 * 64), shape: [1, 1, 128, 64], dtype: .float16)
        let s = try AttentionShape(q, q, q, blockMask: nil, enableGQA: false)
        let softcap = ScoreMod { score, _, _, _, _ in 20 * tanh(score / 20) }
        let alibi = ScoreMod { score, _, h, q, kv in score + (kv - q) * exp2(-(h + 1)) }
        for (mod, tanh) in [(softcap, true), (alibi, false)] {
            let mods = try SplicedMods(score: mod, mask: nil, firstBinding: AttentionBinding.firstCapture,
                                       errorBinding: AttentionBinding.errors.rawValue, device: device)
            XCTAssertEqual(mods.glsl.usesTanh, tanh)
            for kernel in [FlexKernel.portable, .coopmatNV] {
                for lse in [false, true] {
                    let plan = try AttentionPlanner.forward(shape: s, mods: mods, scoreMod: mod, blockMask: nil, scale: 0.125, kernel: kernel,
                                                            device: device, lse: lse)
                    let exact = try plan.source().defines.contains { $0.name == "VKF_EXACT_TANH" && $0.value == "1" }
                    XCTAssertEqual(exact, lse && tanh && kernel == .portable, "\(kernel) returnLSE: \(lse) tanh: \(tanh)")
                }
            }
        }
    }
}
