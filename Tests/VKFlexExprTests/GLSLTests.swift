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
            int t4 = vkf_floordiv(t3, 2);
            int t5 = vkf_mod(t0, 3);
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
        void vkf_prologue(int b, int h) {
            vkf_bh0 = vkf_load0(h);
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
