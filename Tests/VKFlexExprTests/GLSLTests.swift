import Foundation
import XCTest
@testable import VKFlexExpr

final class GLSLTests: XCTestCase {
    func testGoldenScoreMod() throws {
        let softcap = ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }
        let out = try GLSLEmitter.emit(scoreMod: softcap.graph, maskMod: nil, firstBinding: 5, errorBinding: 4)
        XCTAssertTrue(out.source.contains("""
        float score_mod(float score, int b, int h, int q_idx, int kv_idx) {
            float t0 = (score / 20.0);
            float t1 = vkf_tanh(t0);
            float t2 = (20.0 * t1);
            return t2;
        }
        """), out.source)
        XCTAssertTrue(out.source.contains("""
        bool mask_mod(int b, int h, int q_idx, int kv_idx) {
            return true;
        }
        """), out.source)
        XCTAssertTrue(out.source.contains("binding = 4) buffer VkfErrors"))
        XCTAssertTrue(out.source.contains("#define VKF_HAS_SCORE_MOD 1"))
        XCTAssertTrue(out.source.contains("#define VKF_HAS_MASK_MOD 0"))
    }

    func testGoldenMaskWithCapturesAndSharedSubexpressions() throws {
        let doc = HostTensor(name: "doc", int32: [0, 0, 1], shape: [3])
        let m = MaskMod { _, _, q, kv in (doc[q] == doc[kv]) & (floorDiv(q - kv, 2) != doc[q] % 3) }
        let out = try GLSLEmitter.emit(scoreMod: nil, maskMod: m.graph, firstBinding: 6, errorBinding: 5)
        XCTAssertEqual(out.captures.map(\.name), ["doc"])
        XCTAssertTrue(out.source.contains("layout(std430, set = 0, binding = 6) readonly buffer VkfCap0 { int data[]; } vkf_cap0; // doc int32[3]"), out.source)
        XCTAssertTrue(out.source.contains("""
        bool mask_mod(int b, int h, int q_idx, int kv_idx) {
            int t0 = vkf_load0(q_idx);
            int t1 = vkf_load0(kv_idx);
            bool t2 = (t0 == t1);
            int t3 = (q_idx - kv_idx);
            int t4 = vkf_fdiv_u(t3, 2);
            int t5 = vkf_fmod_u(t0, 3);
            bool t6 = (t4 != t5);
            bool t7 = (t2 && t6);
            return t7;
        }
        """), out.source)
        XCTAssertTrue(out.source.contains("""
        int vkf_load0(int i0) {
            int w0 = i0 < 0 ? i0 + 3 : i0;
            if (w0 < 0 || w0 >= 3) { vkf_report(1, 0, i0, 0); return int(0); }
            return vkf_cap0.data[w0];
        }
        """), out.source)
    }

    func testWorkThatDependsOnlyOnBatchAndHeadIsHoisted() throws {
        let slope = HostTensor(name: "slope", float32: [0.5, 0.25], shape: [2])
        let alibi = ScoreMod { s, _, h, q, kv in s + slope[h] * (kv - q) }
        let out = try GLSLEmitter.emit(scoreMod: alibi.graph, maskMod: nil, firstBinding: 5, errorBinding: 4)
        XCTAssertTrue(out.source.contains("""
        #ifdef VKF_HOIST_BH
        #define VKF_HAS_PROLOGUE 1
        float vkf_bh0;
        float vkf_bh1;
        void vkf_prologue(int b, int h) {
            vkf_bh0 = vkf_load0(h);
            vkf_bh1 = (vkf_bh0 * 1.442695);
        }
        float score_mod(float score, int b, int h, int q_idx, int kv_idx) {
            int t0 = (kv_idx - q_idx);
            float t1 = (vkf_bh0 * float(t0));
            float t2 = (score + t1);
            return t2;
        }
        """), out.source)
        // Templates without a prologue (the mask builder, the mod evaluator) get the plain functions.
        XCTAssertTrue(out.source.contains("""
        #else
        float score_mod(float score, int b, int h, int q_idx, int kv_idx) {
            float t0 = vkf_load0(h);
        """), out.source)
        // Nothing to hoist: no prologue at all.
        let causal = MaskMod { _, _, q, kv in q >= kv }
        let plain = try GLSLEmitter.emit(scoreMod: nil, maskMod: causal.graph, firstBinding: 5, errorBinding: 4)
        XCTAssertFalse(plain.source.contains("VKF_HOIST_BH"))
    }

    /// The mask's work that depends on the row alone or the key alone goes into vkf_mrow /
    /// vkf_mcol, which fragment kernels run once per row and per column; mask_mod itself becomes
    /// the same computation through them, and (b, h) work still goes to the prologue.
    func testMaskWorkPerRowAndPerColumnIsSeparated() throws {
        let doc = HostTensor(name: "doc", int32: [0, 0, 1], shape: [3])
        let window = HostTensor(name: "window", int32: [4, 8], shape: [2])
        let m = MaskMod { _, h, q, kv in (doc[q] == doc[kv]) & (q - kv <= window[h]) & (floorDiv(q, 4) >= 1) }
        let out = try GLSLEmitter.emit(scoreMod: nil, maskMod: m.graph, firstBinding: 6, errorBinding: 5)
        XCTAssertTrue(out.source.contains("""
        #ifdef VKF_HOIST_BH
        #define VKF_HAS_PROLOGUE 1
        int vkf_bh0;
        void vkf_prologue(int b, int h) {
            vkf_bh0 = vkf_load1(h);
        }
        #define VKF_HAS_MASK_RC 1
        struct vkf_mrow_t { int r0; int r1; bool r2; };
        vkf_mrow_t vkf_mrow(int b, int h, int q_idx) {
            vkf_mrow_t R;
            R.r0 = vkf_load0(q_idx);
            R.r1 = vkf_fdiv_u(q_idx, 4);
            R.r2 = (R.r1 >= 1);
            return R;
        }
        struct vkf_mcol_t { int c0; };
        vkf_mcol_t vkf_mcol(int b, int h, int kv_idx) {
            vkf_mcol_t C;
            C.c0 = vkf_load0(kv_idx);
            return C;
        }
        bool mask_mod_rc(int b, int h, int q_idx, int kv_idx, vkf_mrow_t R, vkf_mcol_t C) {
            bool t0 = (R.r0 == C.c0);
            int t1 = (q_idx - kv_idx);
            bool t2 = (t1 <= vkf_bh0);
            bool t3 = (t0 && t2);
            bool t4 = (t3 && R.r2);
            return t4;
        }
        """), out.source)
        XCTAssertTrue(out.source.contains("""
        bool mask_mod(int b, int h, int q_idx, int kv_idx) {
            return mask_mod_rc(b, h, q_idx, kv_idx, vkf_mrow(b, h, q_idx), vkf_mcol(b, h, kv_idx));
        }
        #define VKF_PURE_MODS 1
        #else
        """), out.source)
        // One side empty: its struct keeps a member that is never read.
        let strided = try GLSLEmitter.emit(scoreMod: nil, maskMod: MaskMod { _, _, q, kv in (kv % 64 == 0) | (q >= kv) }.graph,
                                           firstBinding: 6, errorBinding: 5)
        XCTAssertTrue(strided.source.contains("struct vkf_mrow_t { int unused; };"), strided.source)
        XCTAssertTrue(strided.source.contains("struct vkf_mcol_t { int c0; bool c1; };"), strided.source)
        XCTAssertFalse(strided.source.contains("VKF_HAS_PROLOGUE"), strided.source)
        // Only comparisons to hoist: per element they cost no more than reading them back.
        let prefix = try GLSLEmitter.emit(scoreMod: nil, maskMod: MaskMod { _, _, q, kv in (kv <= 100) | (q >= kv) }.graph,
                                          firstBinding: 6, errorBinding: 5)
        XCTAssertFalse(prefix.source.contains("VKF_HOIST_BH"), prefix.source)
        // Score-mods are not split (they run on every element anyway); causal has nothing to split.
        let alibi = try GLSLEmitter.emit(scoreMod: ScoreMod { s, _, _, q, kv in s + (kv - q) }.graph, maskMod: nil, firstBinding: 6, errorBinding: 5)
        XCTAssertFalse(alibi.source.contains("VKF_HAS_MASK_RC"), alibi.source)
    }

    /// VKF_PURE_MODS tells a template whether the per-element mods may run on elements outside the
    /// ranges: only where they load nothing and can report nothing.
    func testModsThatLoadOrReportAreNotPure() throws {
        func pure(_ score: ScoreMod?, _ mask: MaskMod?) throws -> [Bool] {
            let source = try GLSLEmitter.emit(scoreMod: score?.graph, maskMod: mask?.graph, firstBinding: 6, errorBinding: 5).source
            return source.split(separator: "\n").filter { $0.hasPrefix("#define VKF_PURE_MODS ") }.map { $0.hasSuffix(" 1") }
        }
        let slopes = HostTensor(name: "slopes", float32: [0.5, 0.25], shape: [2])
        let bias = HostTensor(name: "bias", float32: [Float](repeating: 0, count: 16), shape: [4, 4])
        let doc = HostTensor(name: "doc", int32: [0, 0, 1, 1], shape: [4])
        XCTAssertEqual(try pure(nil, MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 1024) }), [true])
        XCTAssertEqual(try pure(ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, MaskMod { _, _, q, kv in q >= kv }), [true])
        // A per-head load goes to the prologue: pure per element there, not in the plain functions.
        XCTAssertEqual(try pure(ScoreMod { s, _, h, q, kv in s + (kv - q) * slopes[h] }, nil), [true, false])
        // The document mask's loads go per row and per column; the comparison left is pure.
        XCTAssertEqual(try pure(nil, MaskMod { _, _, q, kv in doc[q] == doc[kv] }), [true, false])
        XCTAssertEqual(try pure(ScoreMod { s, _, _, q, kv in s + bias[q, kv] }, nil), [false])
        XCTAssertEqual(try pure(nil, MaskMod { _, _, q, kv in floorDiv(q, kv + 1) >= 1 }), [false])
        XCTAssertEqual(try pure(nil, MaskMod { _, _, q, kv in q % (kv + 1) == 0 }), [false])
    }

    /// `score_mod_f` converts sums of indices from the kernel's float indices, not per score.
    func testIndexSumsConvertFromFloatIndices() throws {
        let slopes = HostTensor(name: "slopes", float32: [0.5, 0.25], shape: [2])
        let alibi = try GLSLEmitter.emit(scoreMod: ScoreMod { s, _, h, q, kv in s + (kv - q) * slopes[h] }.graph, maskMod: nil,
                                         firstBinding: 6, errorBinding: 5).source
        XCTAssertTrue(alibi.contains("""
        #define VKF_HAS_SCORE_MOD_F 1
        float score_mod_f(float score, int b, int h, int q_idx, int kv_idx, float q_f, float kv_f) {
            int t0 = (kv_idx - q_idx);
            float t1 = ((kv_f - q_f) * vkf_bh0);
        """), alibi)
        // Literals join the sum; a product does not (it could leave float's exact integers).
        let shifted = try GLSLEmitter.emit(scoreMod: ScoreMod { s, _, _, q, kv in s - abs(q - kv + 3) }.graph, maskMod: nil,
                                           firstBinding: 6, errorBinding: 5).source
        XCTAssertTrue(shifted.contains("float t3 = (score - abs(((q_f - kv_f) + 3.0)));"), shifted)
        let clamped = try GLSLEmitter.emit(scoreMod: ScoreMod { s, _, _, q, kv in s + clamp(kv - q, -64, 64) }.graph, maskMod: nil,
                                           firstBinding: 6, errorBinding: 5).source
        XCTAssertTrue(clamped.contains("(score + min(max((kv_f - q_f), (-64.0)), 64.0))"), clamped)
        let product = try GLSLEmitter.emit(scoreMod: ScoreMod { s, _, _, q, kv in s + q * kv }.graph, maskMod: nil,
                                           firstBinding: 6, errorBinding: 5).source
        XCTAssertFalse(product.contains("score_mod_f"), product)
        // Soft-capping has no index to convert: no second function.
        let softcap = try GLSLEmitter.emit(scoreMod: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }.graph, maskMod: nil,
                                           firstBinding: 6, errorBinding: 5).source
        XCTAssertFalse(softcap.contains("score_mod_f"), softcap)
        // Five terms or a literal past 2^20 keep the conversion.
        let long = try GLSLEmitter.emit(scoreMod: ScoreMod { s, _, _, q, kv in s + (q - kv + q - kv + q) }.graph, maskMod: nil,
                                        firstBinding: 6, errorBinding: 5).source
        XCTAssertFalse(long.contains("score_mod_f"), long)
        let big = try GLSLEmitter.emit(scoreMod: ScoreMod { s, _, _, q, kv in s + (kv - q + 2_000_000) }.graph, maskMod: nil,
                                       firstBinding: 6, errorBinding: 5).source
        XCTAssertFalse(big.contains("score_mod_f"), big)
    }

    /// `score_mod_l2` folds log2(e) into literals and hoisted head factors where it distributes,
    /// and is left out where it would only multiply at the end.
    func testLog2FormFoldsTheFactorIntoConstants() throws {
        func emit(_ m: ScoreMod) throws -> String {
            try GLSLEmitter.emit(scoreMod: m.graph, maskMod: nil, firstBinding: 6, errorBinding: 5).source
        }
        let slopes = HostTensor(name: "slopes", float32: [0.5, 0.25], shape: [2])
        let alibi = try emit(ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) })
        XCTAssertTrue(alibi.contains("""
        void vkf_prologue(int b, int h) {
            vkf_bh0 = vkf_load0(h);
            vkf_bh1 = (vkf_bh0 * 1.442695);
        }
        """), alibi)
        XCTAssertTrue(alibi.contains("""
        #define VKF_HAS_SCORE_MOD_L2F 1
        float score_mod_l2f(float score, float score_l2, int b, int h, int q_idx, int kv_idx, float q_f, float kv_f) {
            int t0 = (kv_idx - q_idx);
            return (score_l2 + (vkf_bh1 * (kv_f - q_f)));
        }
        """), alibi)
        // Without hoisting (templates that do not run one head per workgroup) the product is per call.
        XCTAssertTrue(alibi.contains("""
            float t0 = vkf_load0(h);
            float t1 = (t0 * 1.442695);
            int t2 = (kv_idx - q_idx);
            return (score_l2 + (t1 * float(t2)));
        """), alibi)
        let softcap = try emit(ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) })
        // k * tanh(a): log2(e) and k go into the tanh's formula (VKF_KTANH_L2), the literal divisor into its exp2.
        XCTAssertTrue(softcap.contains("    return VKF_KTANH_L2(28.8539, 57.7078, (score_l2 * 0.1));"), softcap)
        XCTAssertFalse(softcap.contains("score_mod_l2f"), softcap)   // no index to take as a float
        // A factor whose product with 2 log2(e) would overflow float stays outside the formula.
        let huge = try emit(ScoreMod { s, _, _, _, _ in 1e38 * tanh(s) })
        XCTAssertTrue(huge.contains("    return (1e+38 * VKF_KTANH_L2(1.442695, 2.88539, (score_l2 * 2.0)));"), huge)
        let causal = try emit(ScoreMod { s, _, _, q, kv in select(q >= kv, s * 0.5, -Double.infinity) })
        XCTAssertTrue(causal.contains("return (t0 ? (0.5 * score_l2) : (-uintBitsToFloat(0x7F800000u)));"), causal)
        // Nothing to fold: a bias table times the score keeps score_mod * log2(e) in the kernel.
        let table = HostTensor(name: "table", float32: [1, 2], shape: [2])
        XCTAssertFalse(try emit(ScoreMod { s, _, _, q, _ in s * table[q] }).contains("score_mod_l2"))
        // Integer arithmetic is not distributed over (wrap-around differs from float arithmetic).
        let wrap = try emit(ScoreMod { s, _, _, q, kv in s + (q * 100000 * 100000 - kv) })
        XCTAssertTrue(wrap.contains("return (score_l2 + (float(t2) * 1.442695));"), wrap)
    }

    func testLiteralsAreLocaleFreeAndHandleInfNan() {
        XCTAssertEqual(GLSLEmitter.floatLiteral(0.1), "0.1")
        XCTAssertEqual(GLSLEmitter.floatLiteral(20), "20.0")
        XCTAssertEqual(GLSLEmitter.floatLiteral(1e-5), "1e-05")
        XCTAssertEqual(GLSLEmitter.floatLiteral(-2.5), "(-2.5)")
        XCTAssertEqual(GLSLEmitter.floatLiteral(.infinity), "uintBitsToFloat(0x7F800000u)")
        XCTAssertEqual(GLSLEmitter.floatLiteral(-.infinity), "(-uintBitsToFloat(0x7F800000u))")
        XCTAssertEqual(GLSLEmitter.floatLiteral(.nan), "uintBitsToFloat(0x7FC00000u)")
        XCTAssertEqual(GLSLEmitter.floatLiteral(1e300), "uintBitsToFloat(0x7F800000u)")
        XCTAssertEqual(GLSLEmitter.intLiteral(Int32.min), "int(0x80000000u)")
        XCTAssertEqual(GLSLEmitter.intLiteral(-3), "(-3)")
        setlocale(LC_ALL, "de_DE.UTF-8")
        defer { setlocale(LC_ALL, "C") }
        XCTAssertEqual(GLSLEmitter.floatLiteral(0.5), "0.5")
    }

    func testEmissionIsDeterministicAndKeyedByStructure() throws {
        func mods(_ doc: HostTensor) -> MaskMod { MaskMod { _, _, q, kv in doc[q] == doc[kv] } }
        let a = HostTensor(name: "doc", int32: [0, 1], shape: [2])
        let b = HostTensor(name: "doc", int32: [5, 5], shape: [2])
        let c = HostTensor(name: "doc", int32: [5, 5, 5], shape: [3])
        let ea = try GLSLEmitter.emit(scoreMod: nil, maskMod: mods(a).graph, firstBinding: 3, errorBinding: 2)
        let eb = try GLSLEmitter.emit(scoreMod: nil, maskMod: mods(b).graph, firstBinding: 3, errorBinding: 2)
        let ec = try GLSLEmitter.emit(scoreMod: nil, maskMod: mods(c).graph, firstBinding: 3, errorBinding: 2)
        XCTAssertEqual(ea.source, eb.source, "same structure, same pipeline")
        XCTAssertNotEqual(ea.source, ec.source, "another shape is another variant")
        XCTAssertThrowsError(try GLSLEmitter.emit(scoreMod: .invalid("bad"), maskMod: nil, firstBinding: 0, errorBinding: 0))
    }

    func testGradientFunctionIsEmitted() throws {
        let out = try GLSLEmitter.emit(scoreMod: ScoreMod { s, _, _, _, _ in s * s }.graph, maskMod: nil, firstBinding: 1, errorBinding: 0)
        XCTAssertTrue(out.source.contains("float score_mod_grad(float score"), out.source)
    }
}
