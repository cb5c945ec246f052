import Foundation
import XCTest
@testable import VKFlex
import VKFlexSPIRV

final class AttentionTests: FlexTestCase {
    struct Case {
        var B = 1, Hq = 2, Hkv = 2, Lq = 70, Lkv = 70, D = 32, Dv = 32
        var dtype: DType = .float32
        var score: ScoreMod? = nil
        var mask: MaskMod? = nil
        var maskB = 1, maskH = 1
        var blockSize: BlockSize = 32
        var scale: Double? = nil
        /// Forces a kernel (nil: the planner's choice).
        var kernel: FlexKernel? = nil
    }

    /// Runs a case on the device and against the float64 reference; checks output, LSE and that
    /// every element was written (the output is poisoned with NaN first).
    @discardableResult
    func check(_ c: Case, _ name: String, file: StaticString = #filePath, line: UInt = #line) throws -> (Double, Double) {
        let q = try device.tensor(randn(c.B * c.Hq * c.Lq * c.D), shape: [c.B, c.Hq, c.Lq, c.D], dtype: c.dtype, name: "q")
        let k = try device.tensor(randn(c.B * c.Hkv * c.Lkv * c.D), shape: [c.B, c.Hkv, c.Lkv, c.D], dtype: c.dtype, name: "k")
        let v = try device.tensor(randn(c.B * c.Hkv * c.Lkv * c.Dv), shape: [c.B, c.Hkv, c.Lkv, c.Dv], dtype: c.dtype, name: "v")
        let mask = try c.mask.map { try createBlockMask($0, B: c.maskB, H: c.maskH, qLen: c.Lq, kvLen: c.Lkv, device: device, blockSize: c.blockSize) }
        let out = try device.tensor([Float](repeating: .nan, count: c.B * c.Hq * c.Lq * c.Dv), shape: [c.B, c.Hq, c.Lq, c.Dv], dtype: c.dtype)
        let r = try flexAttention(q, k, v, scoreMod: c.score, blockMask: mask, scale: c.scale, enableGQA: c.Hq != c.Hkv, returnLSE: true, out: out,
                                options: FlexOptions(kernel: c.kernel))
        if let forced = c.kernel { XCTAssertEqual(r.kernel, forced, name, file: file, line: line) }
        let ref = try flexAttentionReference(q, k, v, scoreMod: c.score, blockMask: mask, scale: c.scale, enableGQA: c.Hq != c.Hkv)
        let o = try r.output.toArray(), l = try r.lse!.toArray()
        XCTAssertFalse(o.contains { $0.isNaN }, "\(name): NaN in the output (unwritten or computed)", file: file, line: line)
        let err = relativeL2Error(o, ref.output)
        // bfloat16 through coopmat-generic: P is rounded to bfloat16 (2^-9) too, besides the output.
        let tol = c.dtype == .float32 ? 1e-4 : c.dtype == .bfloat16 && r.kernel == .coopmatGeneric ? 6e-3 : 2e-3
        XCTAssertLessThanOrEqual(err, tol, "\(name): relative L2 error \(err)", file: file, line: line)
        var lseErr = 0.0
        for (a, b) in zip(l, ref.lse) {
            if b == -.infinity { XCTAssertEqual(a, -.infinity, "\(name): masked row LSE", file: file, line: line); continue }
            lseErr = max(lseErr, abs(Double(a) - b))
        }
        XCTAssertLessThanOrEqual(lseErr, c.dtype == .float32 ? 1e-3 : 2e-2, "\(name): LSE error \(lseErr)", file: file, line: line)
        // Fully masked rows are exactly zero.
        for (row, b) in ref.lse.enumerated() where b == -.infinity {
            XCTAssertTrue(o[(row * c.Dv)..<((row + 1) * c.Dv)].allSatisfy { $0 == 0 }, "\(name): masked row \(row) not zero", file: file, line: line)
        }
        return (err, lseErr)
    }

    func testDenseAttention() throws {
        try check(Case(), "dense")
        try check(Case(Lq: 1, Lkv: 1, D: 1, Dv: 1), "1x1, D=1")
    }

    func testCausal() throws {
        try check(Case(mask: MaskMod { _, _, q, kv in q >= kv }), "causal")
    }
}

extension AttentionTests {
    func testSeedScoreAndMaskMods() throws {
        let S = 150
        let doc = try device.tensor((0..<S).map { Int32($0 < 40 ? 0 : $0 < 100 ? 1 : 2) }, shape: [S], name: "doc")
        let slopes = try device.tensor((0..<4).map { Float(exp2(-Double($0 + 1) * 8 / 4)) }, shape: [4], name: "slopes")
        let bounds = [0, 33, 90, S]
        let seq = try device.tensor((0..<S).map { i in Int32(bounds.lastIndex { $0 <= i }!) }, shape: [S], name: "seq")
        let offsets = try device.tensor(bounds.map(Int32.init), shape: [4], name: "offsets")
        let W = 10
        let cases: [(String, ScoreMod?, MaskMod?)] = [
            ("noop", .identity, nil),
            ("causal", nil, MaskMod { _, _, q, kv in q >= kv }),
            ("causal as score_mod", ScoreMod { s, _, _, q, kv in select(q >= kv, s, -Double.infinity) }, nil),
            ("sliding window", nil, MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 37) }),
            ("prefix-LM", nil, MaskMod { _, _, q, kv in (kv <= 45) | (q >= kv) }),
            ("document", nil, MaskMod { _, _, q, kv in (q >= kv) & (doc[q] == doc[kv]) }),
            ("SASA", nil, MaskMod { _, _, q, kv in (abs(floorDiv(q, W) - floorDiv(kv, W)) <= 2) & (abs(q % W - kv % W) <= 2) }),
            ("NATTEN", nil, MaskMod { _, _, q, kv in
                (abs(clamp(floorDiv(q, W), 1, W - 2) - floorDiv(kv, W)) <= 1) & (abs(clamp(q % W, 1, W - 2) - kv % W) <= 1) }),
            ("ALiBi captured", ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }, MaskMod { _, _, q, kv in q >= kv }),
            ("ALiBi functional", ScoreMod { s, _, h, q, kv in s + (q - kv) * exp2(-((h + 1) * 8.0 / 4)) }, nil),
            ("soft-cap", ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, MaskMod { _, _, q, kv in q >= kv }),
            ("jagged", nil, MaskMod { _, _, q, kv in (q - offsets[seq[q]] >= kv - offsets[seq[kv]]) & (seq[q] == seq[kv]) }),
        ]
        for (name, score, mask) in cases {
            try check(Case(Hq: 4, Hkv: 4, Lq: S, Lkv: S, D: 16, Dv: 16, score: score, mask: mask), name)
        }
    }

    func testFlamingoCrossAttention() throws {
        // 12 text queries attend to 3 images of 3 tokens each: Lq != Lkv.
        let images = try device.tensor((0..<9).map { Int32($0 / 3) }, shape: [9], name: "image_of_token")
        let intervals = try device.tensor([0, 7, 1, 7, 7, 12], shape: [3, 2], name: "intervals")
        let mask = MaskMod { _, _, q, kv in (q >= intervals[images[kv], 0]) & (q < intervals[images[kv], 1]) }
        try check(Case(Lq: 12, Lkv: 9, D: 8, Dv: 8, mask: mask, blockSize: 4), "flamingo")
    }

    func testShapesDtypesAndGQA() throws {
        let causal = MaskMod { _, _, q, kv in q >= kv }
        try check(Case(Hq: 8, Hkv: 2, Lq: 45, Lkv: 45, mask: causal), "GQA 8/2")
        try check(Case(Hq: 3, Hkv: 1, Lq: 33, Lkv: 61, D: 24, Dv: 40), "MQA, Lq != Lkv, Dv != D")
        try check(Case(B: 2, Lq: 77, Lkv: 51, D: 37, Dv: 19, mask: causal, blockSize: BlockSize(q: 16, kv: 48)), "odd head dims and lengths")
        try check(Case(Lq: 40, Lkv: 40, D: 256, Dv: 256, mask: causal), "head dim 256")
        try check(Case(Lq: 64, Lkv: 64, D: 64, Dv: 64, dtype: .float16, mask: causal), "float16")
        // Portable kernel: 192 P·V tasks of 4x4 for 128 invocations (two for some, dims differing).
        try check(Case(Lq: 70, Lkv: 90, D: 80, Dv: 96, dtype: .float16, mask: causal), "float16, D=80, Dv=96")
        try check(Case(Lq: 50, Lkv: 50, scale: 0.37), "custom scale")
        try check(Case(B: 2, Hq: 2, Lq: 64, Lkv: 64, mask: MaskMod { b, h, q, kv in q - kv <= (b * 2 + h) * 9 }, maskB: 2, maskH: 2), "per-batch, per-head mask")
    }

    func testFullyMaskedRowsGiveZeroAndMinusInfinity() throws {
        // Rows 0..9 see no key; a score_mod of -inf masks a whole row too.
        try check(Case(Lq: 40, Lkv: 40, mask: MaskMod { _, _, q, kv in (q >= 10) & (kv < q) }), "masked rows")
        try check(Case(Lq: 20, Lkv: 20, score: ScoreMod { s, _, _, q, _ in select(q % 3 == 0, -Double.infinity, s) }), "score -inf rows")
    }

    func testStridedViewsAndOut() throws {
        let (B, S, H, D) = (2, 37, 3, 16)
        let bshd = try device.tensor(randn(B * S * H * D), shape: [B, S, H, D], name: "qkv")
        let view = try bshd.permuted(0, 2, 1, 3)
        let contiguous = try device.tensor(try view.toArray(), shape: [B, H, S, D])
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: S, kvLen: S, device: device, blockSize: 16)
        let a = try flexAttention(view, view, view, blockMask: causal).output.toArray()
        let b = try flexAttention(contiguous, contiguous, contiguous, blockMask: causal).output.toArray()
        XCTAssertEqual(a, b)
        // out: writes into a permuted view of a caller's buffer.
        let outBuffer = try device.empty(shape: [B, S, H, D], dtype: .float32)
        let outView = try outBuffer.permuted(0, 2, 1, 3)
        _ = try flexAttention(contiguous, contiguous, contiguous, blockMask: causal, out: outView)
        XCTAssertEqual(try outView.toArray(), b)
    }

    func testTensorsLargerThanOneBindingAreSplitAcrossDispatches() throws {
        // Two batches 160 MiB apart: the whole span is over lavapipe's 128 MiB binding limit.
        let stride = 40 << 20
        let big = try device.empty(shape: [2 * stride], dtype: .float32, name: "big")
        let shape = [2, 1, 5, 4]
        let strides = [stride, 20, 4, 1]
        let values = randn(40)
        try big.buffer.upload(Array(values[0..<20]))
        try big.buffer.upload(Array(values[20..<40]), byteOffset: stride * 4)
        let q = try big.asStrided(shape: shape, strides: strides)
        let dense = try device.tensor(values, shape: shape)
        XCTAssertGreaterThan(q.byteSpan.upper, device.capabilities.maxStorageBufferRange)
        let a = try flexAttention(q, q, q, returnLSE: true)
        let b = try flexAttention(dense, dense, dense, returnLSE: true)
        XCTAssertEqual(try a.output.toArray(), try b.output.toArray())
        XCTAssertEqual(try a.lse!.toArray(), try b.lse!.toArray())
    }

    func testOutOfRangeCaptureFailsWhenTheOutputIsRead() throws {
        let table = try device.tensor([0, 1, 2], shape: [3], name: "short_table")
        let q = try device.tensor(randn(8 * 4), shape: [1, 1, 8, 4])
        let r = try flexAttention(q, q, q, scoreMod: ScoreMod { s, _, _, qi, _ in s + table[qi] })
        XCTAssertThrowsError(try r.output.toArray()) { e in
            XCTAssertTrue("\(e)".contains("is out of range for short_table (size 3)"), "\(e)")
        }
    }

    func testBadInputsAreCleanErrors() throws {
        let q = try device.tensor(randn(2 * 4 * 8 * 16), shape: [2, 4, 8, 16])
        let k3 = try device.tensor(randn(2 * 3 * 8 * 16), shape: [2, 3, 8, 16])
        let k2 = try device.tensor(randn(2 * 2 * 8 * 16), shape: [2, 2, 8, 16])
        let kd = try device.tensor(randn(2 * 4 * 8 * 8), shape: [2, 4, 8, 8])
        let h16 = try device.tensor(randn(2 * 4 * 8 * 16), shape: [2, 4, 8, 16], dtype: .float16)
        let i32 = try device.tensor([Int32](repeating: 1, count: 2 * 4 * 8 * 16), shape: [2, 4, 8, 16])
        let flat = try device.tensor(randn(16), shape: [16])
        func expect(_ fragment: String, _ body: () throws -> Void, line: UInt = #line) {
            XCTAssertThrowsError(try body(), line: line) { XCTAssertTrue("\($0)".contains(fragment), "\($0)", line: line) }
        }
        expect("pass enableGQA: true") { _ = try flexAttention(q, k2, k2) }
        expect("multiple of the key/value heads") { _ = try flexAttention(q, k3, k3, enableGQA: true) }
        expect("head dim 16 differs") { _ = try flexAttention(q, kd, kd) }
        expect("must share a dtype") { _ = try flexAttention(q, h16, h16) }
        expect("must be float32, float16 or bfloat16") { _ = try flexAttention(i32, i32, i32) }
        expect("must be 4-D") { _ = try flexAttention(flat, q, q) }
        let m = try createBlockMask(noopMask, B: 1, H: 1, qLen: 9, kvLen: 8, device: device)
        expect("built for qLen=9, kvLen=8") { _ = try flexAttention(q, q, q, blockMask: m) }
        let mh = try createBlockMask(noopMask, B: 1, H: 3, qLen: 8, kvLen: 8, device: device)
        expect("has H=3") { _ = try flexAttention(q, q, q, blockMask: mh) }
        let out = try device.empty(shape: [2, 4, 8, 8], dtype: .float32)
        expect("out: shape") { _ = try flexAttention(q, q, q, out: out) }
        expect("scale must be finite") { _ = try flexAttention(q, q, q, scale: .nan) }
        let bad = ScoreMod { s, _, _, q, _ in s + q / 2 * Num(Int(Int32.max) + 5) }
        expect("does not fit in int32") { _ = try flexAttention(q, q, q, scoreMod: bad) }
    }

    func testSeveralCallsShareOneSubmission() throws {
        let q = try device.tensor(randn(1 * 2 * 32 * 8), shape: [1, 2, 32, 8])
        let first = try flexAttention(q, q, q).output
        let second = try flexAttention(first, first, first).output
        XCTAssertTrue(device.hasUnsubmittedWork, "both calls are still being recorded")
        let ref1 = try flexAttentionReference(q, q, q)
        XCTAssertLessThan(relativeL2Error(try first.toArray(), ref1.output), 1e-5)
        let ref2 = try flexAttentionReference(first, first, first)
        XCTAssertLessThan(relativeL2Error(try second.toArray(), ref2.output), 1e-5)
    }
}

extension AttentionTests {
    func testKernelChoiceAndForcing() throws {
        let values = randn(64 * 16)
        let q = try device.tensor(values, shape: [1, 1, 64, 16], dtype: .float16)
        XCTAssertEqual(try flexAttention(q, q, q).kernel, .portable, "lavapipe has no cooperative matrices")
        for (env, fragment) in [("coopmat", "VK_NV_cooperative_matrix"), ("coopmat-nv", "VK_NV_cooperative_matrix"), ("fast", "use portable, coopmat-nv, coopmat-generic, split-kv or auto")] {
            let d = try device(with: ["VKFLEX_KERNEL": env])
            let qd = try d.tensor(values, shape: [1, 1, 64, 16], dtype: .float16)
            XCTAssertThrowsError(try flexAttention(qd, qd, qd)) { XCTAssertTrue("\($0)".contains(fragment), "\(env): \($0)") }
            if env == "coopmat-nv" {
                // The per-call option wins over the variable.
                XCTAssertEqual(try flexAttention(qd, qd, qd, options: FlexOptions(kernel: .portable)).kernel, .portable)
            }
        }
        let portable = try device(with: ["VKFLEX_KERNEL": "portable"])
        let qp = try portable.tensor(values, shape: [1, 1, 64, 16], dtype: .float16)
        XCTAssertEqual(try flexAttention(qp, qp, qp).kernel, .portable)
        XCTAssertThrowsError(try flexAttention(q, q, q, options: FlexOptions(kernel: .coopmatNV))) { error in
            guard case FlexError.unsupported(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.hasPrefix("kernel: .coopmatNV: "), m)
        }
        XCTAssertEqual(FlexKernel(name: "coopmat-nv"), .coopmatNV)
        XCTAssertEqual(FlexKernel(name: "coopmat"), .coopmatNV)
        XCTAssertEqual(FlexKernel.coopmatNV.rawValue, "coopmat-nv")
    }
}

extension AttentionTests {
    /// The kernels' parameter block goes as push constants where the device takes 220 bytes of
    /// them (the H200: 256), else as a storage buffer (lavapipe: 128). Lavapipe runs the buffer
    /// form; the push-constant form must at least compile, and the host's block must match the
    /// shader's.
    func testParameterBlockAsPushConstantsWhereTheDeviceHasRoom() throws {
        XCTAssertEqual(AttentionParams.byteCount, 220)
        XCTAssertEqual(AttentionPlanner.pushesParams(device, tuning: AttentionTuning()), device.capabilities.maxPushConstantsSize >= 220)
        // One declaration: the GLSL members are generated from the same fields the host packs.
        let members = AttentionParams.glsl.components(separatedBy: "#define VKF_PARAMS_MEMBERS")[1]
        XCTAssertEqual(members.split(separator: ";").filter { !$0.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty }.count * 4, AttentionParams.byteCount)
        XCTAssertTrue(AttentionParams.glsl.contains("#define VKF_BINDING_PARAMS 9\n#define VKF_BINDING_ERRORS 10\n#define VKF_BINDING_MAX 11\n#define VKF_BINDING_KV_LENS 12\n#define VKF_BINDING_SINKS 13\n#define VKF_BINDING_Q_OFFSETS 14\n#define VKF_BINDING_PAGE_TABLE 15\n#define VKF_BINDING_FIRST_CAPTURE 16"), AttentionParams.glsl)
        XCTAssertFalse(try ShaderLibrary.standard.text("flex_attention_common.glsl").contains("binding = 1"), "bindings come from AttentionBinding")
        for push in [false, true] {
            let source = try AttentionPlan.portable(D: 64, Dv: 64, BQ: 16, BKV: 32, WG: 128, dtype: .float16, pushParams: push).source()
            let mods = try SplicedMods(score: nil, mask: nil, firstBinding: AttentionBinding.firstCapture, errorBinding: AttentionBinding.errors.rawValue, device: device)
            var library = ShaderLibrary.standard
            library.files.merge(mods.includes) { _, new in new }
            XCTAssertEqual(try ShaderCompiler.shared.compile(source, library: library).first, 0x0723_0203)
        }
        // The backward's passes in both forms too (lavapipe runs the buffer form), the captures'
        // gradients with and without atomics, and the split-KV kernel.
        let shape = try AttentionShape(try device.empty(shape: [1, 2, 8, 64], dtype: .float16), try device.empty(shape: [1, 2, 8, 64], dtype: .float16),
                                       try device.empty(shape: [1, 2, 8, 64], dtype: .float16), blockMask: nil, enableGQA: false)
        let rb = try device.tensor([Float](repeating: 0, count: 15), shape: [15], name: "rb")
        let rel = ScoreMod { s, _, _, q, kv in s + rb[q - kv + 7] }
        for push in [false, true] {
            for (pass, atomic) in [(0, false), (1, false), (2, false), (3, false), (4, false), (5, false), (5, true)] {
                let mods = try SplicedMods(score: rel, mask: nil, firstBinding: BackwardBinding.firstCapture, errorBinding: BackwardBinding.errors.rawValue,
                                           gradCaptures: pass == 5 ? [rb.captureInfo] : [], device: device)
                let plan = AttentionPlanner.backward(shape: shape, pass: pass, tiles: [1, 2, 5].contains(pass) ? (16, 32, 128) : (0, 0, 64),
                                                     pushParams: push, mods: mods, capAtomic: atomic)
                var library = ShaderLibrary.standard
                library.files.merge(mods.includes) { _, new in new }
                library.files[BackwardParams.includeName] = BackwardParams.glsl
                XCTAssertEqual(try ShaderCompiler.shared.compile(try plan.source(), library: library).first, 0x0723_0203, "backward pass \(pass)")
            }
            let mods = try SplicedMods(score: rel, mask: nil, firstBinding: AttentionBinding.firstCapture, errorBinding: AttentionBinding.errors.rawValue, device: device)
            var plan = AttentionPlan.portable(D: 64, Dv: 64, BQ: 16, BKV: 32, WG: 128, dtype: .float16, pushParams: push)
            (plan.pass, plan.kernel, plan.tiles, plan.qOffsets, plan.paged) = (.forwardPartial, .splitKV, .decode(rows: 16, KPL: 2, WG: 128, LK: 8, scatter: true), true, true)
            var library = ShaderLibrary.standard
            library.files.merge(mods.includes) { _, new in new }
            XCTAssertEqual(try ShaderCompiler.shared.compile(try plan.source(), library: library).first, 0x0723_0203, "split-kv")
        }
        // VKFLEX_PUSH_PARAMS=0 turns push constants off everywhere.
        XCTAssertFalse(AttentionPlanner.pushesParams(device, tuning: try AttentionTuning.parse(["VKFLEX_PUSH_PARAMS": "0"])))
    }

    /// The cooperative-matrix kernel cannot run on lavapipe, but it must compile — optimized, since
    /// spirv-opt crashes on some NV cooperative-matrix code and a crash would take the process down:
    /// every head dim and tile choice, with and without mods, goes through shaderc here, and
    /// through the rewrite to `VK_KHR_cooperative_matrix`.
    func testCooperativeMatrixVariantsCompileWithTheOptimizer() throws {
        let docs = try device.tensor([0, 0, 1, 1], shape: [4], name: "docs")
        let modSets: [(ScoreMod?, MaskMod?)] = [
            (nil, nil),
            (ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, MaskMod { _, _, q, kv in q >= kv }),
            (ScoreMod { s, _, h, q, kv in s + (kv - q) * exp2(-((h + 1) * 8.0 / 16)) }, MaskMod { _, _, q, kv in docs[q % 4] == docs[kv % 4] }),
        ]
        var compiled = 0
        for D in [16, 32, 48, 64, 80, 96, 112, 128, 144, 192, 256] {
            var choices = [CoopmatTiles(D: D, sharedMemory: 48 << 10, forced: nil),
                           CoopmatTiles(D: D, sharedMemory: 16 << 10, forced: nil)]
            if D == 64 { choices += ["64x1x8x1", "16x2x4x1"].map { CoopmatTiles(D: D, sharedMemory: 48 << 10, forced: $0) } }
            if D == 64 { choices.append(CoopmatTiles(D: D, sharedMemory: 48 << 10, dense: true, forced: nil)) }   // 256 rows
            if D == 64 || D == 128 || D == 192 || D == 256 { choices += [64, 32].map { CoopmatTiles(D: D, sharedMemory: 48 << 10, queryBlock: $0, forced: nil) } }
            for tiles in choices.compactMap({ $0 }) {
                for (score, mask) in modSets {
                    let mods = try SplicedMods(score: score, mask: mask, firstBinding: AttentionBinding.firstCapture, errorBinding: AttentionBinding.errors.rawValue, device: device)
                    var library = ShaderLibrary.standard
                    library.files.merge(mods.includes) { _, new in new }
                    // Both forms of the products and of the parameter block (push constants need more room
                    // than lavapipe's 128 bytes, so only the H200 runs that form).
                    for narrowK in [false, true] {
                        // The exact maximum scores (returnMaxScores) on one of the two forms; with 16x8
                        // products, the row sums by products with ones without a score-mod and of float32
                        // P with one (as where the call returns the LSE), and the exact tanh that the planner
                        // gives the portable and split-KV kernels only, to keep it compiling here.
                        let source = try AttentionPlan.coopmat(D: D, tiles: tiles, rawMax: score == nil, exp16: score != nil, narrowK: narrowK,
                                                               exactRowSums: narrowK && score != nil, exactTanh: narrowK && score != nil, floatIndices: narrowK, typedOperands: narrowK, maxScores: narrowK, kvLengths: narrowK,
                                                               sinks: narrowK, pushParams: narrowK).source()
                        let spirv = try ShaderCompiler.shared.compile(source, library: library)
                        XCTAssertEqual(spirv.first, 0x0723_0203)
                        // What a VK_KHR_cooperative_matrix device builds (checked by the rewriter's verify).
                        let khr = try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: 32)
                        XCTAssertFalse(CooperativeMatrixKHRRewriter.usesNVCooperativeMatrix(khr))
                        compiled += 1
                    }
                }
            }
        }
        XCTAssertEqual(compiled, 192)
        // bfloat16 operands (KHR only, no fp16 exp2, no 16x8 products): the retype must find no
        // 16-bit arithmetic in any of them.
        for D in [64, 128, 256] {
            let tiles = try XCTUnwrap(CoopmatTiles(D: D, sharedMemory: 48 << 10, typedOperands: true, forced: nil))
            for (score, mask) in modSets {
                let mods = try SplicedMods(score: score, mask: mask, firstBinding: AttentionBinding.firstCapture, errorBinding: AttentionBinding.errors.rawValue, device: device)
                var library = ShaderLibrary.standard
                library.files.merge(mods.includes) { _, new in new }
                let plan = AttentionPlan.coopmat(D: D, tiles: tiles, rawMax: score == nil, exp16: false, typedOperands: true, maxScores: true,
                                                 sinks: true, dtype: .bfloat16)
                XCTAssertTrue(plan.bfloat16Operands)
                let khr = try CooperativeMatrixKHRRewriter.rewrite(try ShaderCompiler.shared.compile(try plan.source(), library: library), subgroupSize: 32)
                try assertBFloat16Operands(try BFloat16Retyper.retype(khr), "coopmat-nv D=\(D)", operandsOnly: false)
            }
        }
    }
}

extension AttentionTests {
    func testOneBatchLargerThanABindingIsSplitAcrossHeads() throws {
        // Heads 160 MiB apart: one batch spans more than lavapipe's 128 MiB, so each dispatch binds a
        // group of heads. GQA: 4 query heads over 2 key/value heads.
        let stride = 40 << 20
        let big = try device.empty(shape: [4 * stride], dtype: .float32, name: "big")
        let values = randn(4 * 20)
        for h in 0..<4 { try big.buffer.upload(Array(values[(h * 20)..<((h + 1) * 20)]), byteOffset: h * stride * 4) }
        let q = try big.asStrided(shape: [1, 4, 5, 4], strides: [4 * stride, stride, 4, 1])
        let kv = try big.asStrided(shape: [1, 2, 5, 4], strides: [4 * stride, stride, 4, 1])
        XCTAssertGreaterThan(q.byteSpan.upper - q.byteSpan.lower, device.capabilities.maxStorageBufferRange)
        let dq = try device.tensor(values, shape: [1, 4, 5, 4])
        let dkv = try device.tensor(Array(values[0..<40]), shape: [1, 2, 5, 4])
        let causal = try createBlockMask(MaskMod { _, h, q, kv in q + h >= kv }, B: 1, H: 4, qLen: 5, kvLen: 5, device: device, blockSize: 2)
        // Split-KV packs every head of a group, so a call chunked by heads falls back to the portable kernel.
        let a = try flexAttention(q, kv, kv, blockMask: causal, enableGQA: true, returnLSE: true)
        XCTAssertEqual(a.kernel, .portable)
        let b = try flexAttention(dq, dkv, dkv, blockMask: causal, enableGQA: true, returnLSE: true, options: FlexOptions(kernel: .portable))
        XCTAssertEqual(try a.output.toArray(), try b.output.toArray())
        XCTAssertEqual(try a.lse!.toArray(), try b.lse!.toArray())
        let ref = try flexAttentionReference(dq, dkv, dkv, blockMask: causal, enableGQA: true)
        XCTAssertLessThan(relativeL2Error(try a.output.toArray(), ref.output), 1e-5)
    }
}

extension AttentionTests {
    /// Per-(batch, head) work in a mod runs once per workgroup in `vkf_prologue`: the results must
    /// not change, per head and per batch, and an index out of range there is still reported.
    func testWorkHoistedPerBatchAndHeadMatchesTheReference() throws {
        let (B, H, L, D) = (2, 3, 40, 8)
        let slope = try device.tensor([0.5, -0.25, 1.5], shape: [3], name: "slope")
        let bias = try device.tensor([2.0, -1.0], shape: [2], name: "bias")
        // slope[h] and bias[b] * exp2(-(h + 1)) depend on b and h alone; kv_idx - q_idx does not.
        let mod = ScoreMod { s, b, h, q, kv in s + slope[h] * (kv - q) / 8 + bias[b] * exp2(-(h + 1)) }
        let glsl = try GLSLEmitter.emit(scoreMod: mod.graph, maskMod: nil, firstBinding: AttentionBinding.firstCapture, errorBinding: AttentionBinding.errors.rawValue)
        XCTAssertTrue(glsl.source.contains("void vkf_prologue(int b, int h)"), glsl.source)
        let q = try device.tensor(randn(B * H * L * D), shape: [B, H, L, D], name: "q")
        let k = try device.tensor(randn(B * H * L * D), shape: [B, H, L, D], name: "k")
        let v = try device.tensor(randn(B * H * L * D), shape: [B, H, L, D], name: "v")
        let causal = try createBlockMask(MaskMod { _, _, qi, kvi in qi >= kvi }, B: 1, H: 1, qLen: L, kvLen: L, device: device,
                                         blockSize: BlockSize(16))
        let r = try flexAttention(q, k, v, scoreMod: mod, blockMask: causal)
        let ref = try flexAttentionReference(q, k, v, scoreMod: mod, blockMask: causal)
        XCTAssertLessThan(relativeL2Error(try r.output.toArray(), ref.output), 1e-5)

        let short = try device.tensor([0.5, -0.25], shape: [2], name: "short_slopes")
        let bad = try flexAttention(q, k, v, scoreMod: ScoreMod { s, _, h, _, _ in s + short[h] })
        XCTAssertThrowsError(try bad.output.toArray()) { e in
            XCTAssertTrue("\(e)".contains("is out of range for short_slopes (size 2)"), "\(e)")
        }
    }

    /// A tensor written call after call (`out:`, a training or decoding loop) with a mod that can
    /// fail keeps only the error flags of work not yet known clean: earlier ones go back to the
    /// pool instead of piling up (one more allocation per call, and every read re-reading them).
    /// A failure is still reported, on every later read of the tensor.
    func testAnOutputWrittenInALoopKeepsFewErrorFlags() throws {
        let (B, H, L, D) = (1, 2, 24, 8)
        let slope = try device.tensor([0.5, -0.25], shape: [2], name: "slope")
        let mod = ScoreMod { s, _, h, q, kv in s + slope[h] * (kv - q) }
        let q = try device.tensor(randn(B * H * L * D), shape: [B, H, L, D])
        let k = try device.tensor(randn(B * H * L * D), shape: [B, H, L, D])
        let v = try device.tensor(randn(B * H * L * D), shape: [B, H, L, D])
        let causal = try createBlockMask(MaskMod { _, _, qi, kvi in qi >= kvi }, B: 1, H: 1, qLen: L, kvLen: L, device: device, blockSize: BlockSize(16))
        let out = try device.empty(shape: [B, H, L, D], dtype: .float32)
        var allocations = 0
        for i in 0..<40 {
            if i == 20 { allocations = device.liveAllocations }   // after two synchronized rounds of 10
            _ = try flexAttention(q, k, v, scoreMod: mod, blockMask: causal, out: out)
            // The calls since the last completed work, or a few (pruned past 8), are all that is kept.
            XCTAssertLessThanOrEqual(out.pendingCheckCount, max(8, 1 + i % 10), "call \(i)")
            if i % 10 == 9 { try device.synchronize() }
        }
        // Steady: the flags and parameter blocks of 20 more calls came from the pool.
        XCTAssertLessThanOrEqual(device.liveAllocations - allocations, 2, "allocations held by 20 more calls")
        let ref = try flexAttentionReference(q, k, v, scoreMod: mod, blockMask: causal)
        XCTAssertLessThan(relativeL2Error(try out.toArray(), ref.output), 1e-5)
        XCTAssertEqual(out.pendingCheckCount, 0, "a clean read leaves nothing to check")
        // One failing call among clean ones: every read after it reports it.
        let short = try device.tensor([0.5], shape: [1], name: "short_slopes")
        _ = try flexAttention(q, k, v, scoreMod: ScoreMod { s, _, h, _, _ in s + short[h] }, out: out)
        _ = try flexAttention(q, k, v, scoreMod: mod, blockMask: causal, out: out)
        try device.synchronize()
        _ = try flexAttention(q, k, v, scoreMod: mod, blockMask: causal, out: out)
        for _ in 0..<2 {
            XCTAssertThrowsError(try out.toArray()) { XCTAssertTrue("\($0)".contains("is out of range for short_slopes (size 1)"), "\($0)") }
        }
    }

    /// The fragment order the cooperative-matrix kernel is written for, as measured on an H200
    /// (driver 580.159.04, `vkflex selftest`, 2026-11-21): lanes 0, 1 and 4 in full.
    func testCooperativeMatrixLayoutIsTheMeasuredOne() throws {
        typealias C = CooperativeMatrixLayout.Coordinate
        let m = CooperativeMatrixLayout.nvidiaMMA
        XCTAssertEqual(m.count, 32)
        XCTAssertEqual(m[0], [C(row: 0, column: 0), C(row: 0, column: 1), C(row: 0, column: 8), C(row: 0, column: 9),
                              C(row: 8, column: 0), C(row: 8, column: 1), C(row: 8, column: 8), C(row: 8, column: 9)])
        XCTAssertEqual(m[1], [C(row: 0, column: 2), C(row: 0, column: 3), C(row: 0, column: 10), C(row: 0, column: 11),
                              C(row: 8, column: 2), C(row: 8, column: 3), C(row: 8, column: 10), C(row: 8, column: 11)])
        XCTAssertEqual(m[4], [C(row: 1, column: 0), C(row: 1, column: 1), C(row: 1, column: 8), C(row: 1, column: 9),
                              C(row: 9, column: 0), C(row: 9, column: 1), C(row: 9, column: 8), C(row: 9, column: 9)])
        // Every element of the 16x16 matrix is held exactly once.
        XCTAssertEqual(Set(m.flatMap { $0.map { $0.row * 16 + $0.column } }), Set(0..<256))
        // The 16x8 layout is the left half of the 16x16 one: element e of a 16x8 fragment is
        // element (e % 2) + 4 * (e / 2) of the 16x16 fragment.
        let n = CooperativeMatrixLayout.nvidiaMMANarrow
        for lane in 0..<32 { XCTAssertEqual(n[lane], (0..<4).map { m[lane][$0 % 2 + 4 * ($0 / 2)] }) }
        XCTAssertEqual(Set(n.flatMap { $0.map { $0.row * 8 + $0.column } }), Set(0..<128))
        var measured = CooperativeMatrixLayout(float32: m, float16: m)
        XCTAssertFalse(measured.narrowMatchesNVIDIA)   // not measured: no narrow products
        measured.float32Narrow = n
        XCTAssertTrue(measured.narrowMatchesNVIDIA && measured.matches(CooperativeMatrixLayout.nvidiaMMA))
        // Lavapipe has no NV cooperative matrices: nothing to measure, and the kernel is not offered.
        XCTAssertNil(CooperativeMatrixLayout.of(device))
        // The measuring shader compiles with and without the 16x8 part.
        for narrow in ["0", "1"] {
            let source = ShaderSource(name: "coopmat_layout", text: try ShaderLibrary.standard.text("coopmat_layout.comp"), defines: [.init("NARROW", narrow)])
            XCTAssertEqual(try ShaderCompiler.shared.compile(source, library: .standard).first, 0x0723_0203)
        }
    }

    /// The plan alone makes the cooperative-matrix defines; the tuning variables are read once per
    /// device, checked there, and `VKFLEX_COOPMAT_DEFINES` is gone.
    func testCooperativeMatrixDefinesComeFromThePlan() throws {
        let tiles = try XCTUnwrap(CoopmatTiles(D: 64, sharedMemory: 48 << 10, forced: nil))
        let defines = try AttentionPlan.coopmat(D: 64, tiles: tiles, rawMax: true, exp16: false).source().defines.map { "\($0.name)=\($0.value)" }
        XCTAssertTrue(defines.contains("VKF_EXP16=0") && defines.contains("D=64"), "\(defines)")
        XCTAssertTrue(defines.contains("VKF_ALWAYS_RESCALE=1"), "NV path at D=64: O rescaled at every step")
        let khr = try AttentionPlan.coopmat(D: 64, tiles: tiles, rawMax: true, exp16: false, typedOperands: true).source().defines.map { "\($0.name)=\($0.value)" }
        XCTAssertTrue(khr.contains("VKF_ALWAYS_RESCALE=0") && khr.contains("VKF_ALWAYS_HALVES=1"), "KHR path: only when a row's max moves; \(khr)")
        // Row sums by products with ones only with 16x8 products and where no LSE is returned.
        func rowSums(narrowK: Bool, exact: Bool) throws -> String? {
            try AttentionPlan.coopmat(D: 64, tiles: tiles, rawMax: true, exp16: false, narrowK: narrowK, exactRowSums: exact)
                .source().defines.first { $0.name == "VKF_MMA_ROWSUM" }?.value
        }
        XCTAssertEqual(try rowSums(narrowK: true, exact: false), "1")
        XCTAssertEqual(try rowSums(narrowK: true, exact: true), "0")
        XCTAssertEqual(try rowSums(narrowK: false, exact: false), "0")
        for (env, fragment) in [(["VKFLEX_COOPMAT_DEFINES": "TAU=4"], "VKFLEX_COOPMAT_DEFINES is gone"), (["VKFLEX_KERNEL": "fastest"], "use portable, coopmat-nv, coopmat-generic, split-kv or auto"),
                                (["VKFLEX_COOPMAT_TILES": "33x1x1x1"], "VKFLEX_COOPMAT_TILES=33x1x1x1"), (["VKFLEX_PORTABLE_TILES": "axb"], "VKFLEX_PORTABLE_TILES=axb"),
                                (["VKFLEX_PUSH_PARAMS": "yes"], "VKFLEX_PUSH_PARAMS=yes")] {
            XCTAssertThrowsError(try AttentionTuning.parse(env), "\(env)") { XCTAssertTrue("\($0)".contains(fragment), "\($0)") }
        }
        let t = try AttentionTuning.parse(["VKFLEX_KERNEL": "coopmat-nv", "VKFLEX_PORTABLE_TILES": "16x16x64", "VKFLEX_PUSH_PARAMS": "0"])
        XCTAssertEqual(t.kernel, .coopmatNV)
        XCTAssertEqual(t.portableTiles?.WG, 64)
        XCTAssertFalse(t.pushParams)
    }

    /// A device reads the variables when it opens; a call never reads the environment.
    func testTuningIsReadWhenADeviceOpens() throws {
        setenv("VKFLEX_KERNEL", "portable", 1)
        let opened = try Device(selector: "llvmpipe", options: .init(validation: true))
        unsetenv("VKFLEX_KERNEL")
        XCTAssertEqual(opened.environment["VKFLEX_KERNEL"], "portable")
        XCTAssertEqual(try AttentionTuning.of(opened).kernel, .portable)
        setenv("VKFLEX_KERNEL", "nonsense", 1)
        defer { unsetenv("VKFLEX_KERNEL") }
        let q = try opened.tensor(randn(64 * 16), shape: [1, 1, 64, 16])
        XCTAssertEqual(try flexAttention(q, q, q).kernel, .portable, "the variable as it was when the device opened")
    }

    func testCooperativeMatrixHeadDims() {
        for D in [16, 48, 64, 80, 128, 144, 192, 240, 256] { XCTAssertNil(AttentionPlanner.shapeProblem(dtype: .float16, D: D, Dv: D), "\(D)") }
        for (D, Dv) in [(72, 72), (136, 136), (272, 272), (64, 32)] {
            let problem = AttentionPlanner.shapeProblem(dtype: .float16, D: D, Dv: Dv)
            XCTAssertEqual(problem, "the cooperative-matrix kernel needs head dim = value dim, a multiple of 16 up to 256 (got \(D)/\(Dv))")
        }
        XCTAssertEqual(AttentionPlanner.shapeProblem(dtype: .float32, D: 64, Dv: 64), "the cooperative-matrix kernel takes float16 and bfloat16 inputs (got float32)")
    }

    func testPortableTilesFromTheEnvironment() throws {
        let values = randn(2 * 40 * 64)
        let q = try device.tensor(values, shape: [1, 2, 40, 64])
        let reference = try flexAttentionReference(q, q, q)
        for tiles in ["16x16x64", "8x32x128", "32x32x128"] {
            let d = try device(with: ["VKFLEX_PORTABLE_TILES": tiles])
            let qd = try d.tensor(values, shape: [1, 2, 40, 64])
            XCTAssertLessThan(relativeL2Error(try flexAttention(qd, qd, qd).output.toArray(), reference.output), 1e-5, tiles)
        }
        for bad in ["32x32", "32x32x16", "0x32x128", "axbxc", "4096x4096x128"] {
            let d = try device(with: ["VKFLEX_PORTABLE_TILES": bad])
            let qd = try d.tensor(values, shape: [1, 2, 40, 64])
            XCTAssertThrowsError(try flexAttention(qd, qd, qd), bad) { XCTAssertTrue("\($0)".contains("VKFLEX_PORTABLE_TILES=\(bad)"), "\($0)") }
        }
    }

    func testPortableTileChoices() {
        func tiles(_ D: Int, _ shared: Int, _ inv: Int = 1024, _ qb: Int? = nil, half: Bool = false) -> String {
            let t = AttentionPlanner.portableTiles(D: D, Dv: D, sharedMemory: shared << 10, maxInvocations: inv, half: half, queryBlock: qb)
            return "\(t.BQ)x\(t.BKV)x\(t.WG)"
        }
        // float16 inputs keep fp16 in shared memory: 32 rows on 128 invocations (16 KiB at D=64).
        XCTAssertEqual(tiles(64, 48, half: true), "32x32x128")
        XCTAssertEqual(tiles(128, 32, half: true), "32x32x128", "24 KiB at D=128 fit lavapipe's 32")
        XCTAssertEqual(AttentionPlanner.portableSharedBytes(D: 64, Dv: 64, BQ: 32, BKV: 32, WG: 128, half: true), 16000, "the driver's figure on the H200")
        XCTAssertEqual(AttentionPlanner.portableSharedBytes(D: 128, Dv: 128, BQ: 32, BKV: 32, WG: 128, half: true), 24320, "the driver's figure on the H200")
        XCTAssertEqual(AttentionPlanner.portableSharedBytes(D: 64, Dv: 64, BQ: 64, BKV: 32, WG: 256, half: true), 27264, "the driver's figure on the H200")
        XCTAssertEqual(tiles(64, 48), "64x32x256", "64 rows on 256 invocations where 35 KiB fit")
        XCTAssertEqual(tiles(64, 32), "32x32x128", "lavapipe's 32 KiB")
        XCTAssertEqual(tiles(64, 48, 128), "32x32x128", "workgroups of at most 128")
        XCTAssertEqual(tiles(64, 48, 1024, 32), "32x32x128", "32-row BlockMask blocks")
        XCTAssertEqual(tiles(64, 48, 1024, 192), "64x32x256")
        XCTAssertEqual(tiles(32, 48), "64x32x256")
        XCTAssertEqual(tiles(96, 48), "32x32x128", "64 rows of fp32 at D=96 need 52 KiB")
        XCTAssertEqual(tiles(96, 48, half: true), "32x32x128")
        XCTAssertEqual(tiles(128, 48), "32x32x128")
        XCTAssertEqual(tiles(128, 32), "16x32x128")
        XCTAssertTrue(AttentionPlanner.portableBlocked(Dv: 64, BQ: 32, BKV: 32, WG: 128))
        XCTAssertTrue(AttentionPlanner.portableBlocked(Dv: 128, BQ: 16, BKV: 32, WG: 128))
        XCTAssertTrue(AttentionPlanner.portableBlocked(Dv: 32, BQ: 32, BKV: 32, WG: 128), "64 tasks of 4x4 for 128 invocations")
        XCTAssertTrue(AttentionPlanner.portableBlocked(Dv: 96, BQ: 32, BKV: 32, WG: 128), "192 tasks: two for some invocations")
        XCTAssertFalse(AttentionPlanner.portableBlocked(Dv: 66, BQ: 32, BKV: 32, WG: 128), "value dims not a multiple of 4")
        XCTAssertFalse(AttentionPlanner.portableBlocked(Dv: 64, BQ: 30, BKV: 32, WG: 128), "rows not a multiple of 4")
        XCTAssertFalse(AttentionPlanner.portableBlocked(Dv: 64, BQ: 8, BKV: 8, WG: 128), "fewer scores than 4 per invocation")
        XCTAssertEqual(AttentionPlanner.portableSharedBytes(D: 64, Dv: 64, BQ: 32, BKV: 32, WG: 128), 24320)
        XCTAssertEqual(AttentionPlanner.portableSharedBytes(D: 64, Dv: 64, BQ: 64, BKV: 32, WG: 256), 39680, "the driver's figure on the H200")
    }

    func testCooperativeMatrixTileChoices() {
        let d64 = CoopmatTiles(D: 64, sharedMemory: 48 << 10, forced: nil)
        XCTAssertEqual(d64?.description, "32x2x4x1x1x2")
        XCTAssertEqual(d64?.sharedBytes(D: 64), 18 << 10, "64 staged keys of K and V, rows padded to 9 units of 16 bytes")
        XCTAssertEqual(CoopmatTiles(D: 64, sharedMemory: 16 << 10, forced: nil)?.description, "32x1x4x1x1", "64 staged keys need 18 KiB")
        XCTAssertEqual(CoopmatTiles(D: 64, sharedMemory: 48 << 10, forced: "32x2x4x2")?.description, "32x2x4x2x1")
        XCTAssertEqual(CoopmatTiles(D: 64, sharedMemory: 48 << 10, forced: "16x2x4x1x0x4")?.description, "16x2x4x1x0x4")
        // Without a BlockMask the query tiles need not stay in 128-row blocks: 256 rows at D = 64.
        let dense64 = CoopmatTiles(D: 64, sharedMemory: 48 << 10, dense: true, forced: nil)
        XCTAssertEqual(dense64?.description, "32x2x8x1x1x2")
        XCTAssertEqual(dense64?.BQ, 256)
        XCTAssertEqual(dense64?.sharedBytes(D: 64), 18 << 10, "the K/V stage as at 128 rows; Q staged 16 rows per subgroup")
        XCTAssertEqual(CoopmatTiles(D: 128, sharedMemory: 48 << 10, dense: true, forced: nil)?.description, "16x2x4x1x0x2")
        XCTAssertEqual(CoopmatTiles(D: 32, sharedMemory: 48 << 10, dense: true, forced: nil)?.description, "32x2x4x1x1x2", "256 rows only at D=64")
        XCTAssertEqual(CoopmatTiles(D: 64, sharedMemory: 16 << 10, dense: true, forced: nil)?.description, "32x1x4x1x1")
        let d128 = CoopmatTiles(D: 128, sharedMemory: 48 << 10, forced: nil)
        XCTAssertEqual(d128?.description, "16x2x4x1x0x2")
        // Through VK_KHR_cooperative_matrix (typed B operands, no transposes) 32-key steps fit
        // the registers at 64 < D <= 128; D = 64 and D > 128 keep their tiles.
        for D in [80, 96, 128] {
            let t = CoopmatTiles(D: D, sharedMemory: 48 << 10, typedOperands: true, forced: nil)
            XCTAssertEqual(t?.description, "32x2x4x1x0", "D=\(D)")
            XCTAssertLessThanOrEqual(t?.sharedBytes(D: D) ?? .max, 24 << 10, "under the H200's shared-memory cliff")
        }
        XCTAssertEqual(CoopmatTiles(D: 64, sharedMemory: 48 << 10, typedOperands: true, forced: nil)?.description, "32x2x4x1x1x2")
        XCTAssertEqual(CoopmatTiles(D: 192, sharedMemory: 48 << 10, typedOperands: true, forced: nil)?.description,
                       CoopmatTiles(D: 192, sharedMemory: 48 << 10, forced: nil)?.description)
        XCTAssertEqual(CoopmatTiles(D: 128, sharedMemory: 48 << 10, typedOperands: true, forced: "16x2x4x1x0x2")?.description, "16x2x4x1x0x2")
        XCTAssertEqual(d128?.sharedBytes(D: 128), 17408, "32 staged keys of K and V, rows padded to 17 units of 16 bytes")
        // BlockMask query blocks that 128-row tiles would leave partly idle.
        func tiles(_ D: Int, _ rows: Int) -> String? { CoopmatTiles(D: D, sharedMemory: 48 << 10, queryBlock: rows, forced: nil)?.description }
        XCTAssertEqual(tiles(64, 128), "32x2x4x1x1x2")
        XCTAssertEqual(tiles(64, 256), "32x2x4x1x1x2")
        XCTAssertEqual(tiles(64, 64), "32x1x4x1x1x2")
        XCTAssertEqual(tiles(64, 192), "32x1x4x1x1x2")
        XCTAssertEqual(tiles(64, 48), "32x1x4x1x1x2")
        XCTAssertEqual(tiles(64, 32), "32x1x2x1x1x2")
        XCTAssertEqual(tiles(64, 96), "32x2x4x1x1x2", "64-row tiles would leave as many rows idle")
        XCTAssertEqual(tiles(128, 64), "16x1x4x1x1x2")
        XCTAssertEqual(tiles(128, 16), "16x1x2x1x1x2")
        XCTAssertEqual(tiles(256, 128), "16x1x4x1x0", "above 128: 64 rows, one row block per subgroup")
        XCTAssertEqual(tiles(256, 64), "16x1x4x1x0")
        XCTAssertEqual(tiles(256, 32), "16x1x2x1x0")
        XCTAssertEqual(CoopmatTiles(D: 256, sharedMemory: 48 << 10, forced: nil)?.sharedBytes(D: 256), 17408,
                       "16 keys of K and V at 33 units a row; Q staged 128 columns at a time (17 units)")
        // Between 128 and 256, Q and O stage in the largest multiple of 16 up to 128 dividing D.
        XCTAssertEqual([144, 160, 176, 192, 208, 224, 240, 256].map { CoopmatTiles.stagingColumns(D: $0) }, [48, 80, 16, 96, 16, 112, 80, 128])
        XCTAssertEqual([16, 64, 128].map { CoopmatTiles.stagingColumns(D: $0) }, [16, 64, 128])
        XCTAssertEqual(tiles(192, 128), "16x1x4x1x0")
        XCTAssertEqual(CoopmatTiles(D: 240, sharedMemory: 48 << 10, forced: nil)?.sharedBytes(D: 240), 2 * 16 * 31 * 16,
                       "16 keys of K and V at 31 units a row, more than 64 rows of Q at 11 units")
        XCTAssertEqual(CoopmatTiles(D: 64, sharedMemory: 48 << 10, queryBlock: 64, forced: "32x2x4x2")?.description, "32x2x4x2x1", "a forced choice wins")
        XCTAssertEqual(CoopmatTiles(D: 128, sharedMemory: 48 << 10, forced: "64x1x8x1")?.description, "64x1x8x1x1")
        XCTAssertEqual(CoopmatTiles(D: 128, sharedMemory: 48 << 10, forced: "32x2x4x1x0")?.description, "32x2x4x1x0")
        for bad in ["32x2x4", "33x1x4x1", "32x3x4x1", "32x1x9x1", "32x1x4x3", "32x1x4x1x2", "32xx4x1", "abc",
                    "32x2x4x1x1x0", "32x2x4x1x1x5", "64x2x4x1x1x4", "32x2x4x1x1x2x1"] {
            XCTAssertNil(CoopmatTiles.parse(bad), bad)
            XCTAssertNil(CoopmatTiles(D: 64, sharedMemory: 48 << 10, forced: bad), bad)
        }
        // A forced choice that does not fit is refused rather than built.
        XCTAssertNil(CoopmatTiles(D: 128, sharedMemory: 48 << 10, forced: "128x1x8x2"))
        // Less shared memory: a smaller fallback.
        if let small = CoopmatTiles(D: 128, sharedMemory: 16 << 10, forced: nil) {
            XCTAssertLessThanOrEqual(small.sharedBytes(D: 128), 16 << 10)
        } else {
            XCTFail("no tiles for 16 KiB of shared memory")
        }
    }
}

extension AttentionTests {
    /// prepareFlexAttention builds the call's kernel; the call itself then builds nothing, for any
    /// batch, heads or lengths that share the head dims, dtype and mods.
    func testPrepareBuildsTheKernelAheadOfTheCall() throws {
        // A constant no other test uses, so the kernel is new to this device.
        let bias = Double(UInt32.random(in: 1...1_000_000)) / 1e7
        let mod = ScoreMod { s, _, _, q, kv in s + bias * (kv - q) }
        let mask = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 48, kvLen: 48, device: device,
                                       blockSize: BlockSize(16))
        let q = try device.tensor(randn(2 * 48 * 16), shape: [1, 2, 48, 16], name: "q")
        let before = device.pipelineBuilds
        let kernel = try prepareFlexAttention(q, q, q, scoreMod: mod, blockMask: mask)
        XCTAssertEqual(kernel, .portable, "lavapipe has no cooperative matrices")
        XCTAssertEqual(device.pipelineBuilds, before + 1)
        XCTAssertNoThrow(try prepareFlexAttention(q, q, q, scoreMod: mod, blockMask: mask))
        XCTAssertEqual(device.pipelineBuilds, before + 1, "prepared once")

        let r = try flexAttention(q, q, q, scoreMod: mod, blockMask: mask)
        let ref = try flexAttentionReference(q, q, q, scoreMod: mod, blockMask: mask)
        XCTAssertLessThan(relativeL2Error(try r.output.toArray(), ref.output), 1e-5)
        // Other batch, heads and lengths: the same kernel.
        let mask2 = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 20, kvLen: 33, device: device,
                                        blockSize: BlockSize(16))
        let q2 = try device.tensor(randn(3 * 4 * 20 * 16), shape: [3, 4, 20, 16])
        let kv2 = try device.tensor(randn(3 * 4 * 33 * 16), shape: [3, 4, 33, 16])
        let builds = device.pipelineBuilds
        _ = try flexAttention(q2, kv2, kv2, scoreMod: mod, blockMask: mask2).output.toArray()
        XCTAssertEqual(device.pipelineBuilds, builds, "no kernel built for new lengths")
        // Bad arguments are the call's errors.
        XCTAssertThrowsError(try prepareFlexAttention(q, q2, q2)) { XCTAssertTrue("\($0)".contains("batch sizes differ"), "\($0)") }
        XCTAssertThrowsError(try prepareFlexAttention(q, q, q, scale: .infinity))
    }
}

extension AttentionTests {
    /// The guide's pattern: prepare on another task while this one fills the inputs.
    func testPrepareOnAnotherTaskWhileTheInputsAreFilled() async throws {
        let scale = Double(UInt32.random(in: 1...1_000_000)) / 1e6 + 0.5
        let softcap = ScoreMod { score, _, _, _, _ in 20 * tanh(score / 20) }
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 40, kvLen: 40, device: device)
        let (q, k, v) = try (device.empty(shape: [1, 2, 40, 8], dtype: .float32, name: "q"), device.empty(shape: [1, 2, 40, 8], dtype: .float32, name: "k"),
                             device.empty(shape: [1, 2, 40, 8], dtype: .float32, name: "v"))
        let before = device.pipelineBuilds
        let warm = Task.detached { try prepareFlexAttention(q, k, v, scoreMod: softcap, blockMask: causal, scale: -scale) }
        let values = [randn(2 * 40 * 8), randn(2 * 40 * 8), randn(2 * 40 * 8)]
        for (t, x) in zip([q, k, v], values) { try t.buffer.upload(x, byteOffset: t.byteOffset) }
        _ = try await warm.value
        let builds = device.pipelineBuilds
        XCTAssertGreaterThan(builds, before)
        let r = try flexAttention(q, k, v, scoreMod: softcap, blockMask: causal, scale: -scale)
        let ref = try flexAttentionReference(q, k, v, scoreMod: softcap, blockMask: causal, scale: -scale)
        XCTAssertLessThan(relativeL2Error(try r.output.toArray(), ref.output), 1e-5)
        XCTAssertEqual(device.pipelineBuilds, builds)
    }
}

/// PyTorch's rule for non-finite values: only `-inf` means masked. A NaN score on an unmasked pair
/// makes its row (and LSE) NaN; a non-finite value row makes the rows that attend it non-finite in
/// those dims; no row becomes "fully masked" by a NaN.
extension AttentionTests {
    func runNaNCase(dtype: DType, D: Int, mask: MaskMod?, score: ScoreMod?, poisonQ: (Int, Int)? = nil, poisonV: (Int, Int, Float)? = nil,
                    expectNaNRows: Set<Int>, expectBadDims: [Int: Int] = [:], unspecified: Set<Int> = [], line: UInt = #line) throws {
        let L = 40
        var qv = randn(L * D), vv = randn(L * D)
        if let (r, d) = poisonQ { qv[r * D + d] = .nan }
        if let (j, d, x) = poisonV { vv[j * D + d] = x }
        let q = try device.tensor(qv, shape: [1, 1, L, D], dtype: dtype)
        let k = try device.tensor(randn(L * D), shape: [1, 1, L, D], dtype: dtype)
        let v = try device.tensor(vv, shape: [1, 1, L, D], dtype: dtype)
        let bm = try mask.map { try createBlockMask($0, B: 1, H: 1, qLen: L, kvLen: L, device: device, blockSize: 16) }
        let r = try flexAttention(q, k, v, scoreMod: score, blockMask: bm, returnLSE: true)
        let o = try r.output.toArray(), l = try r.lse!.toArray()
        let ref = try flexAttentionReference(q, k, v, scoreMod: score, blockMask: bm)
        for i in 0..<L where !unspecified.contains(i) {
            let row = o[(i * D)..<((i + 1) * D)]
            if expectNaNRows.contains(i) {
                XCTAssertTrue(row.allSatisfy { $0.isNaN }, "row \(i) should be NaN: \(Array(row.prefix(4)))", line: line)
                XCTAssertTrue(l[i].isNaN, "LSE of row \(i) should be NaN, got \(l[i])", line: line)
                XCTAssertTrue(ref.lse[i].isNaN && ref.output[i * D].isNaN, "the reference agrees on row \(i)", line: line)
            } else if let d = expectBadDims[i] {
                XCTAssertFalse(row[i * D + d].isFinite, "row \(i) dim \(d) attends a non-finite value", line: line)
                XCTAssertTrue(l[i].isFinite, "row \(i): LSE \(l[i])", line: line)
            } else {
                XCTAssertTrue(row.allSatisfy { $0.isFinite } && l[i].isFinite, "row \(i) should be finite", line: line)
                let err = relativeL2Error(Array(row), Array(ref.output[(i * D)..<((i + 1) * D)]))
                XCTAssertLessThan(err, dtype == .float32 ? 1e-4 : 3e-3, "row \(i)", line: line)
            }
        }
    }

    func testNaNInputsAndScoresPropagateInsteadOfMasking() throws {
        let causal = MaskMod { _, _, q, kv in q >= kv }
        let nanAt = try ScoreMod(parsing: "where((q_idx == 9) & (kv_idx == 4), nan, score)")
        for (dtype, D) in [(DType.float32, 16), (.float16, 64), (.float32, 37)] {
            // A NaN in query row 5: row 5 only.
            try runNaNCase(dtype: dtype, D: D, mask: nil, score: nil, poisonQ: (5, 3), expectNaNRows: [5])
            try runNaNCase(dtype: dtype, D: D, mask: causal, score: nil, poisonQ: (5, 3), expectNaNRows: [5])
            // A score-mod NaN on an unmasked pair; the same pair masked leaves the row finite.
            try runNaNCase(dtype: dtype, D: D, mask: causal, score: nanAt, expectNaNRows: [9])
            let maskedAway = MaskMod { _, _, q, kv in (q >= kv) & ((q != 9) | (kv != 4)) }
            try runNaNCase(dtype: dtype, D: D, mask: maskedAway, score: nanAt, expectNaNRows: [])
            // An inf in value row 30: the rows that attend key 30 (causal: rows >= 30) are non-finite in
            // that dim; rows 16-29 visit its block with the key masked (0 · inf, unspecified, as in PyTorch).
            let bad = Dictionary(uniqueKeysWithValues: (30..<40).map { ($0, 2) })
            try runNaNCase(dtype: dtype, D: D, mask: causal, score: nil, poisonV: (30, 2, .infinity), expectNaNRows: [], expectBadDims: bad,
                           unspecified: Set(16..<30))
        }
    }

    func testNoKeysGivesFullyMaskedRows() throws {
        for dtype in [DType.float32, .float16] {
            let q = try device.tensor(randn(2 * 3 * 5 * 8), shape: [2, 3, 5, 8], dtype: dtype)
            let k = try device.empty(shape: [2, 3, 0, 8], dtype: dtype), v = try device.empty(shape: [2, 3, 0, 4], dtype: dtype)
            let r = try flexAttention(q, k, v, returnLSE: true)
            XCTAssertEqual(r.output.shape, [2, 3, 5, 4])
            XCTAssertEqual(try r.output.toArray(), [Float](repeating: 0, count: 2 * 3 * 5 * 4))
            XCTAssertEqual(try r.lse!.toArray(), [Float](repeating: -.infinity, count: 2 * 3 * 5))
            let ref = try flexAttentionReference(q, k, v)
            XCTAssertTrue(ref.lse.allSatisfy { $0 == -.infinity } && ref.output.allSatisfy { $0 == 0 })
        }
    }
}

/// Long key ranges: lavapipe stops a shader's loops after 65535 iterations in all, which cut the
/// walk short past ~17k keys (relative error 0.4, silently); the planner splits the keys across
/// dispatches and merges the partials.
extension AttentionTests {
    func testLongKeyRangesMatchTheReference() throws {
        let cases: [(String, Case)] = [
            ("dense fp32 D=32", Case(B: 1, Hq: 1, Hkv: 1, Lq: 5, Lkv: 140_000, D: 32, Dv: 32)),
            ("masked GQA fp32 ALiBi-like", Case(B: 1, Hq: 2, Hkv: 1, Lq: 6, Lkv: 131_075, D: 16, Dv: 24,
                                               score: try ScoreMod(parsing: "score + (q_idx - kv_idx) * 1e-5"),
                                               mask: try MaskMod(parsing: "(kv_idx % 7 != 3) | (q_idx == 0)"), blockSize: 1024)),
            ("dense fp16 D=48", Case(B: 1, Hq: 1, Hkv: 1, Lq: 4, Lkv: 131_072, D: 48, Dv: 48, dtype: .float16)),
        ]
        for (name, c) in cases { try check(c, name) }
    }

    func testATruncatedWalkIsReportedNotReturned() throws {
        ForwardKernel.ignoreLoopLimitForTesting = true
        defer { ForwardKernel.ignoreLoopLimitForTesting = false }
        let q = try device.tensor(randn(4 * 16), shape: [1, 1, 4, 16])
        let k = try device.tensor(randn(60_000 * 16), shape: [1, 1, 60_000, 16])
        let r = try flexAttention(q, k, k, options: FlexOptions(kernel: .portable))
        XCTAssertThrowsError(try r.output.toArray()) { error in
            guard case FlexError.limitExceeded(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("before it had read every key"), m)
        }
        // The split-KV kernel, splits for the cap off too: at one workgroup per compute unit
        // (VKFLEX_DECODE_WAVES=1) 4 KV heads fill lavapipe's compute units, so each walks its 100,000
        // keys in one split. Dense, that is about 3,100 rounds of 32 keys: every key is read.
        let one = try device(with: ["VKFLEX_DECODE_WAVES": "1"])
        let (qv, kv) = (randn(4 * 4 * 16), randn(4 * 100_000 * 16))
        let (q1, k1) = (try one.tensor(qv, shape: [1, 4, 4, 16]), try one.tensor(kv, shape: [1, 4, 100_000, 16]))
        let ref = try flexAttentionReference(q1, k1, k1)
        let dense = try flexAttention(q1, k1, k1, options: FlexOptions(kernel: .splitKV))
        XCTAssertLessThan(relativeL2Error(try dense.output.toArray(), ref.output), 1e-5)
        // Through a BlockMask of two-key blocks the walk takes a round and a cursor step per block,
        // 100,000 iterations of its loops: past the cap, reported.
        let everyKey = MaskMod { _, _, q, _ in q >= 0 }
        let tinyBlocks = try createBlockMask(everyKey, B: 1, H: 1, qLen: 4, kvLen: 100_000, device: one, blockSize: BlockSize(q: 4, kv: 2))
        let d = try flexAttention(q1, k1, k1, blockMask: tinyBlocks, options: FlexOptions(kernel: .splitKV))
        XCTAssertThrowsError(try d.output.toArray()) { error in
            guard case FlexError.limitExceeded(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("before it had read every key"), m)
        }
        // With the planner's splits the same call reads every key.
        ForwardKernel.ignoreLoopLimitForTesting = false
        let split = try flexAttention(q1, k1, k1, blockMask: tinyBlocks, options: FlexOptions(kernel: .splitKV))
        XCTAssertLessThan(relativeL2Error(try split.output.toArray(), ref.output), 1e-5)
    }
}

extension AttentionTests {
    /// NATTEN on a non-square image (16 rows x 32 columns, 7 x 7 kernel), as docs/guide.md writes
    /// it: every query sees exactly its clamped 7 x 7 neighbourhood, and attention through it
    /// matches the float64 reference.
    func testNATTENOnANonSquareImage() throws {
        let H = 16, W = 32, KH = 7, KW = 7
        let natten = MaskMod { _, _, q, kv in
            let row = clamp(floorDiv(q, W), KH / 2, (H - 1) - KH / 2)
            let col = clamp(q % W, KW / 2, (W - 1) - KW / 2)
            return (abs(row - floorDiv(kv, W)) <= KH / 2) & (abs(col - kv % W) <= KW / 2)
        }
        let eval = try Interpreter(natten.graph)
        for q in 0..<(H * W) {
            let (r, c) = (q / W, q % W)
            let r0 = min(max(r - KH / 2, 0), H - KH), c0 = min(max(c - KW / 2, 0), W - KW)
            for kv in 0..<(H * W) {
                let inside = (r0..<(r0 + KH)).contains(kv / W) && (c0..<(c0 + KW)).contains(kv % W)
                XCTAssertEqual(eval.bool(b: 0, h: 0, q: q, kv: kv), inside, "query (\(r), \(c)), key (\(kv / W), \(kv % W))")
                if eval.bool(b: 0, h: 0, q: q, kv: kv) != inside { return }
            }
        }
        try check(Case(B: 1, Hq: 2, Hkv: 2, Lq: H * W, Lkv: H * W, D: 16, Dv: 16, mask: natten, blockSize: 64), "NATTEN 16x32 k7")
    }
}

extension AttentionTests {
    /// PyTorch's `max_scores`: each row's largest score after scale, score-mod and mask, exact
    /// (not the kernels' running maximum), -inf on rows with no key.
    func testMaxScoresMatchTheReference() throws {
        let softcap = ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }
        let late = MaskMod { _, _, q, kv in (kv <= q - 30) | (q >= 60) }   // rows 0-29 have no key
        let cases: [(String, Case)] = [
            ("dense fp32", Case(Lq: 70, Lkv: 90)),
            ("masked fp16 soft-cap", Case(Hq: 4, Hkv: 2, Lq: 100, Lkv: 100, D: 64, Dv: 64, dtype: .float16, score: softcap, mask: late, blockSize: 32)),
            ("scale < 0", Case(Lq: 40, Lkv: 50, D: 8, Dv: 8, scale: -0.5)),
            ("long keys, split on lavapipe", Case(Lq: 3, Lkv: 70_000, D: 8, Dv: 8, mask: try MaskMod(parsing: "kv_idx % 5 != 1"), blockSize: 512)),
        ]
        for (name, c) in cases {
            let q = try device.tensor(randn(c.B * c.Hq * c.Lq * c.D, scale: 2), shape: [c.B, c.Hq, c.Lq, c.D], dtype: c.dtype)
            let k = try device.tensor(randn(c.B * c.Hkv * c.Lkv * c.D), shape: [c.B, c.Hkv, c.Lkv, c.D], dtype: c.dtype)
            let v = try device.tensor(randn(c.B * c.Hkv * c.Lkv * c.Dv), shape: [c.B, c.Hkv, c.Lkv, c.Dv], dtype: c.dtype)
            let mask = try c.mask.map { try createBlockMask($0, B: 1, H: 1, qLen: c.Lq, kvLen: c.Lkv, device: device, blockSize: c.blockSize) }
            let r = try flexAttention(q, k, v, scoreMod: c.score, blockMask: mask, scale: c.scale, enableGQA: c.Hq != c.Hkv, returnMaxScores: true)
            XCTAssertNil(r.lse)
            let got = try r.maxScores!.toArray()
            let ref = try flexAttentionReference(q, k, v, scoreMod: c.score, blockMask: mask, scale: c.scale, enableGQA: c.Hq != c.Hkv)
            XCTAssertEqual(got.count, ref.maxScores.count)
            var worst = 0.0
            for (a, b) in zip(got, ref.maxScores) {
                if b == -.infinity { XCTAssertEqual(a, -.infinity, name); continue }
                worst = max(worst, abs(Double(a) - b) / (1 + abs(b)))
            }
            XCTAssertLessThan(worst, c.dtype == .float32 ? 1e-5 : 1e-3, name)
            if name.hasPrefix("masked") { XCTAssertTrue(got.prefix(30).allSatisfy { $0 == -.infinity }, name) }
        }
    }
}

extension AttentionTests {
    /// Per-batch key lengths of a contiguous cache: keys at or past `kvLengths[b]` do not exist
    /// (a row left with none gives 0 / -inf), with masks, score-mods, GQA, every dtype, and long
    /// keys through lavapipe's key splits.
    func testPerBatchKeyLengths() throws {
        let alibi = ScoreMod { s, _, h, q, kv in s + (kv - q) * exp2(-(h + 1) * 1.0) }
        let cases: [(String, Int, Int, Int, Int, Int, DType, [Int32], MaskMod?)] = [
            ("fp32 dense", 4, 2, 2, 37, 100, .float32, [100, 0, 57, 1], nil),
            ("fp16 causal GQA", 3, 4, 2, 90, 90, .float16, [90, 33, 64], MaskMod { _, _, q, kv in q >= kv }),
            ("bf16 window", 2, 2, 2, 70, 120, .bfloat16, [5, 119], MaskMod { _, _, q, kv in kv <= q + 40 }),
            ("long keys, split on lavapipe", 2, 1, 1, 3, 40_000, .float32, [39_999, 21_000], nil),
        ]
        for (name, B, Hq, Hkv, Lq, Lkv, dtype, lens, mask) in cases {
            let D = 16
            let q = try device.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: dtype)
            let k = try device.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: dtype)
            let v = try device.tensor(randn(B * Hkv * Lkv * D), shape: [B, Hkv, Lkv, D], dtype: dtype)
            let bm = try mask.map { try createBlockMask($0, B: 1, H: 1, qLen: Lq, kvLen: Lkv, device: device, blockSize: 32) }
            let lengths = try device.tensor(lens, shape: [B], name: "kv_lens")
            // (Over 40k keys ALiBi's biases reach 2e4, where float32 scores carry 2e-3 of error.)
            let score = Lkv < 1000 ? alibi : nil
            let r = try flexAttention(q, k, v, scoreMod: score, blockMask: bm, enableGQA: Hq != Hkv, kvLengths: lengths, returnLSE: true)
            let ref = try flexAttentionReference(q, k, v, scoreMod: score, blockMask: bm, enableGQA: Hq != Hkv, kvLengths: lens.map(Int.init))
            let o = try r.output.toArray(), l = try r.lse!.toArray()
            XCTAssertLessThan(relativeL2Error(o, ref.output), dtype == .float32 ? 1e-4 : 1e-2, name)
            for (a, b) in zip(l, ref.lse) {
                if b == -.infinity { XCTAssertEqual(a, -.infinity, name) } else { XCTAssertLessThan(abs(Double(a) - b), 5e-2, name) }
            }
            if lens.contains(0) { XCTAssertTrue(ref.lse.contains(-.infinity), "\(name): a batch without keys") }
        }
        let q = try device.tensor(randn(2 * 4 * 8), shape: [2, 1, 4, 8])
        for (bad, fragment) in [([3, 9] as [Int32], "kvLengths[1] = 9 is outside 0...4"), ([-1, 2], "kvLengths[0] = -1"), ([1], "must be int32 [B] = [2]")] {
            let t = try device.tensor(bad, shape: [bad.count])
            XCTAssertThrowsError(try flexAttention(q, q, q, kvLengths: t), fragment) { XCTAssertTrue("\($0)".contains(fragment), "\($0)") }
        }
    }
}

extension AttentionTests {
    /// Attention sinks: a per-head logit with no value row joins every softmax denominator; the
    /// LSE includes it and a row with no key gives 0 / LSE = sink. Every dtype, GQA, masks with
    /// empty rows, max scores beside it, and long keys (the merge adds the sink once).
    func testSinksJoinEveryDenominator() throws {
        let late = MaskMod { _, _, q, kv in kv <= q - 20 }   // rows 0-19 have no key
        let cases: [(String, Int, Int, Int, Int, DType, MaskMod?)] = [
            ("fp32 dense", 2, 2, 40, 50, .float32, nil),
            ("fp16 GQA, empty rows", 4, 2, 64, 64, .float16, late),
            ("bf16", 2, 1, 30, 45, .bfloat16, late),
            ("long keys through the merge", 2, 2, 3, 30_000, .float32, nil),
        ]
        for (name, Hq, Hkv, Lq, Lkv, dtype, mask) in cases {
            let D = 16
            let q = try device.tensor(randn(Hq * Lq * D), shape: [1, Hq, Lq, D], dtype: dtype)
            let k = try device.tensor(randn(Hkv * Lkv * D), shape: [1, Hkv, Lkv, D], dtype: dtype)
            let v = try device.tensor(randn(Hkv * Lkv * D), shape: [1, Hkv, Lkv, D], dtype: dtype)
            let sinkValues: [Float] = (0..<Hq).map { [2.5, -1, 40, -.infinity][$0 % 4] }   // 40 dwarfs every score; -inf: no sink
            let sinks = try device.tensor(sinkValues, shape: [Hq], name: "sinks")
            let bm = try mask.map { try createBlockMask($0, B: 1, H: 1, qLen: Lq, kvLen: Lkv, device: device, blockSize: 16) }
            let r = try flexAttention(q, k, v, blockMask: bm, enableGQA: Hq != Hkv, sinks: sinks, returnLSE: true, returnMaxScores: true)
            let ref = try flexAttentionReference(q, k, v, blockMask: bm, enableGQA: Hq != Hkv, sinks: sinkValues)
            let o = try r.output.toArray(), l = try r.lse!.toArray(), mx = try r.maxScores!.toArray()
            XCTAssertFalse(o.contains { !$0.isFinite }, name)
            XCTAssertLessThan(relativeL2Error(o, ref.output), dtype == .float32 ? 1e-4 : 1e-2, name)
            for (row, (a, b)) in zip(l, ref.lse).enumerated() {
                if b == -.infinity { XCTAssertEqual(a, -.infinity, "\(name) row \(row)"); continue }
                XCTAssertLessThan(abs(Double(a) - b), 5e-3 * max(1, abs(b)), "\(name) row \(row)")
            }
            for (a, b) in zip(mx, ref.maxScores) {
                if b == -.infinity { XCTAssertEqual(a, -.infinity, name) } else { XCTAssertLessThan(abs(Double(a) - b), 1e-2 * max(1, abs(b)), "\(name): max scores exclude the sink") }
            }
            if mask != nil {
                // Row 0 of head 0 has no key: output 0 and LSE = the sink.
                XCTAssertEqual(Array(o[0..<D]), [Float](repeating: 0, count: D), name)
                XCTAssertEqual(l[0], sinkValues[0], accuracy: 1e-5, name)
            }
        }
        let q = try device.tensor(randn(2 * 4 * 8), shape: [1, 2, 4, 8])
        let bad = try device.tensor([1, 2, 3], shape: [3])
        XCTAssertThrowsError(try flexAttention(q, q, q, sinks: bad)) { XCTAssertTrue("\($0)".contains("sinks must be float32 [Hq] = [2]"), "\($0)") }
    }
}
