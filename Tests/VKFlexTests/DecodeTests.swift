import Foundation
import XCTest
@testable import VKFlex
import VKFlexSPIRV

/// The split-KV decode kernel against the prefill kernel and the float64 reference: GQA packing,
/// per-head masks, offsets, key lengths, empty splits, fully masked rows, NaN, sinks.
final class DecodeTests: FlexTestCase {
    struct Case {
        var name: String
        var B = 2, Hq = 8, Hkv = 2, Lq = 1, Lkv = 700, D = 64
        var dtype: DType = .float32
        var score: ScoreMod? = nil
        var mask: MaskMod? = nil
        var perHeadMask = false
        var offsets: [Int]? = nil
        var kvLengths: [Int]? = nil
        var sinks: [Float]? = nil
        var nanKeyRow: Int? = nil
        /// Through the split-KV matrix kernel (emulated on lavapipe), else the planner's choice.
        var matrices: Bool? = nil
    }

    func check(_ c: Case, line: UInt = #line) throws {
        let qv = randn(c.B * c.Hq * c.Lq * c.D)
        var kv = randn(c.B * c.Hkv * c.Lkv * c.D)
        if let j = c.nanKeyRow { kv[j * c.D] = .nan }   // batch 0, KV head 0, key j
        let q = try device.tensor(qv, shape: [c.B, c.Hq, c.Lq, c.D], dtype: c.dtype)
        let k = try device.tensor(kv, shape: [c.B, c.Hkv, c.Lkv, c.D], dtype: c.dtype)
        let v = try device.tensor(randn(c.B * c.Hkv * c.Lkv * c.D), shape: [c.B, c.Hkv, c.Lkv, c.D], dtype: c.dtype)
        let qLen = (c.offsets?.max() ?? 0) + c.Lq
        let bm = try c.mask.map { try createBlockMask($0, B: 1, H: c.perHeadMask ? c.Hq : 1, qLen: qLen, kvLen: c.Lkv, device: device, blockSize: 64) }
        let offset = try c.offsets.map { QueryOffset.perBatch(try device.tensor($0, shape: [c.B])) }
        let lengths = try c.kvLengths.map { try device.tensor($0, shape: [c.B]) }
        let sinks = try c.sinks.map { try device.tensor($0, shape: [c.Hq]) }
        func run(_ kernel: FlexKernel) throws -> FlexResult {
            try flexAttention(q, k, v, scoreMod: c.score, blockMask: bm, enableGQA: c.Hq != c.Hkv, kvLengths: lengths, qOffset: offset,
                              sinks: sinks, returnLSE: true, returnMaxScores: true, options: FlexOptions(kernel: kernel))
        }
        // (The matrix kernel's cases skip the prefill kernel: CI's time; the scalar one's compare them.)
        let decode = try AttentionPlanner.$forcedDecodeMatrices.withValue(c.matrices) { try run(.splitKV) }
        let prefill = c.matrices == true ? decode : try run(.portable)
        XCTAssertEqual(decode.kernel, .splitKV, line: line)
        let ref = try flexAttentionReference(q, k, v, scoreMod: c.score, blockMask: bm, enableGQA: c.Hq != c.Hkv, kvLengths: c.kvLengths,
                                             sinks: c.sinks, qOffsets: c.offsets)
        let o = try decode.output.toArray(), l = try decode.lse!.toArray(), po = try prefill.output.toArray()
        // Each row's largest score: the reference's (NaN rows NaN, rows with no key -inf).
        for (row, (got, want)) in zip(try decode.maxScores!.toArray(), ref.maxScores).enumerated() {
            if want.isNaN { XCTAssertTrue(got.isNaN, "\(c.name): max score of row \(row)", line: line) }
            else if want == -.infinity { XCTAssertEqual(got, -.infinity, "\(c.name): max score of row \(row)", line: line) }
            else { XCTAssertEqual(Double(got), want, accuracy: 1e-3 * max(1, abs(want)), "\(c.name): max score of row \(row)", line: line) }
        }
        var kept: [Float] = [], keptRef: [Double] = [], keptPrefill: [Float] = []
        for (row, e) in ref.lse.enumerated() {
            let range = (row * c.D)..<((row + 1) * c.D)
            if e.isNaN {
                XCTAssertTrue(l[row].isNaN && o[range].allSatisfy(\.isNaN), "\(c.name): row \(row) must be NaN", line: line)
            } else if e == -.infinity {
                XCTAssertEqual(l[row], -.infinity, "\(c.name): row \(row) has no key", line: line)
                XCTAssertTrue(o[range].allSatisfy { $0 == 0 }, "\(c.name): row \(row) has no key", line: line)
            } else {
                kept += o[range]; keptRef += ref.output[range]; keptPrefill += po[range]
                XCTAssertEqual(Double(l[row]), e, accuracy: 1e-4 * max(1, abs(e)), "\(c.name): LSE of row \(row)", line: line)
            }
        }
        // The matrix kernel rounds P to 16 bits for its product with V (bfloat16: 8 bits of mantissa).
        let tol = c.dtype == .float32 ? 1e-5 : c.matrices == true && c.dtype == .bfloat16 ? 1e-2 : 2e-3
        XCTAssertLessThanOrEqual(relativeL2Error(kept, keptRef), tol, "\(c.name) against the reference", line: line)
        XCTAssertLessThanOrEqual(relativeL2Error(kept, keptPrefill.map(Double.init)), 2 * tol, "\(c.name) against the prefill kernel", line: line)
    }

    func testDecodeMatchesPrefillAndReference() throws {
        let L = 700
        let slopes = try device.tensor((0..<8).map { Float(exp2(-Double($0 + 1))) }, shape: [8], name: "slopes")
        let cases = [
            Case(name: "GQA 8/2, one row at the end", offsets: [L - 1, 300]),
            Case(name: "MQA 16/1, float16, D 128", B: 1, Hq: 16, Hkv: 1, D: 128, dtype: .float16),
            Case(name: "8/8, 4 rows, causal with offsets", Hq: 4, Hkv: 4, Lq: 4, mask: MaskMod { _, _, q, kv in q >= kv }, offsets: [L - 4, 61]),
            Case(name: "16 rows of one head: head chunks", B: 1, Hq: 4, Hkv: 1, Lq: 16, mask: MaskMod { _, _, q, kv in q >= kv }, offsets: [L - 16]),
            Case(name: "sliding window: most splits empty", Lq: 2, score: ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) },
                 mask: MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 50) }, offsets: [L - 2, 500]),
            Case(name: "per-head mask: no packing", Hq: 4, Hkv: 2, Lq: 3, mask: MaskMod { _, h, q, kv in (kv % 4 != h) & (q >= kv) }, perHeadMask: true,
                 offsets: [L - 3, 100]),
            Case(name: "key lengths, an empty batch, sinks", B: 3, Lq: 2, kvLengths: [L, 0, 33], sinks: [0.5, -1, 2, 0, 0, 1, -2, 3]),
            Case(name: "fully masked rows", Lq: 3, mask: MaskMod { _, _, q, kv in kv < q - 1 }),
            Case(name: "NaN key: its rows are NaN", B: 1, Hq: 4, Hkv: 1, nanKeyRow: 123),
            Case(name: "head dim 13: the merge's columns one at a time", B: 1, Hq: 4, Hkv: 2, Lq: 2, D: 13, sinks: [0.5, -1, 2, 0]),
            Case(name: "bfloat16 rows straddling a block", B: 1, Hq: 2, Hkv: 1, Lq: 5, dtype: .bfloat16, mask: MaskMod { _, _, q, kv in q >= kv },
                 offsets: [62]),
        ]
        for c in cases { try check(c) }
    }

    /// The split-KV matrix kernel (flex_attention_decode_mm.comp, its products emulated here) on
    /// what the scalar one takes: speculative decoding's 16 rows a KV head with a score-mod and a
    /// causal mask at offsets, one head's 16 rows under a per-head mask, key lengths with an empty
    /// batch, sinks and a NaN key (batch 0's rows NaN) in bfloat16, against the float64 reference and the prefill kernel;
    /// its first-call check against the scalar kernel; fp32 refused when forced.
    func testTheMatrixKernel() throws {
        let L = 300
        let slopes = try device.tensor((0..<8).map { Float(exp2(-Double($0 + 1))) }, shape: [8], name: "slopes")
        let cases = [
            Case(name: "specdec 4 heads x 4 rows, ALiBi, causal", B: 2, Hq: 8, Hkv: 2, Lq: 4, Lkv: L, D: 64, dtype: .float16,
                 score: ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }, mask: MaskMod { _, _, q, kv in q >= kv }, offsets: [L - 4, 101], matrices: true),
            Case(name: "16 rows of one head, per-head mask", B: 1, Hq: 2, Hkv: 1, Lq: 16, Lkv: L, D: 32, dtype: .float16,
                 mask: MaskMod { _, h, q, kv in (kv % 4 != h) & (q >= kv) }, perHeadMask: true, offsets: [L - 16], matrices: true),
            Case(name: "key lengths, an empty batch, sinks, bfloat16, a NaN key", B: 3, Hq: 8, Hkv: 1, Lq: 2, Lkv: L, D: 48, dtype: .bfloat16,
                 kvLengths: [L, 0, 33], sinks: [0.5, -1, 2, 0, 0, 1, -2, 3], nanKeyRow: 77, matrices: true),
        ]
        for c in cases { try check(c) }
        // The first-call check (emulated here), remembered for the device.
        XCTAssertTrue(GenericKernelCheck.decodePasses(D: 64, Dv: 64, dtype: .float16, device: device))
        XCTAssertEqual(try device.memoized("vkflex.coopmat-generic.check.decode.64x64.float16") { false }, true)
        let q = try device.tensor(randn(4 * 16), shape: [1, 4, 1, 16]), k = try device.tensor(randn(100 * 16), shape: [1, 1, 100, 16])
        XCTAssertThrowsError(try AttentionPlanner.$forcedDecodeMatrices.withValue(true) {
            try flexAttention(q, k, k, enableGQA: true, options: FlexOptions(kernel: .splitKV))
        }) { XCTAssertTrue("\($0)".contains("float16 and bfloat16 inputs only (got float32)"), "\($0)") }
        // Not by itself on a device without cooperative matrices (its products would be emulated).
        let q16 = try device.tensor(randn(16 * 64), shape: [1, 16, 1, 64], dtype: .float16), k16 = try device.tensor(randn(100 * 64), shape: [1, 1, 100, 64], dtype: .float16)
        XCTAssertEqual(try flexAttention(q16, k16, k16, enableGQA: true).kernel, .splitKV)
        let shape = try AttentionShape(q16, k16, k16, blockMask: nil, enableGQA: true)
        XCTAssertEqual(AttentionPlanner.decodeMMByDefault(shape, device: device, tuning: AttentionTuning()),
                       AttentionPlanner.decodeMMMeasuredFaster && device.cooperativeMatrixAPI != nil)
    }

    /// The matrix kernel's tiles for the subgroup sizes and shapes AMD, Intel and NVIDIA list: one
    /// subgroup a workgroup, steps a multiple of the shape, inside 48 KiB of shared memory.
    func testMatrixKernelTilesForEveryVendor() {
        func shape(_ m: Int, _ n: Int, _ k: Int) -> CooperativeMatrixShape {
            CooperativeMatrixShape(m: m, n: n, k: k, a: "float16", b: "float16", c: "float32", result: "float32")
        }
        for (sg, shapes) in [(32, [shape(16, 16, 16), shape(16, 8, 16)]), (64, [shape(16, 16, 16)]), (16, [shape(8, 16, 16)]), (8, [shape(8, 8, 16)])] {
            for (D, Dv) in [(64, 64), (128, 128), (256, 256), (48, 80)] {
                guard let t = AttentionPlanner.decodeMMTiles(D: D, Dv: Dv, subgroupSize: sg, shapes: shapes, sharedMemory: 49152, maxInvocations: 1024) else {
                    XCTFail("no tiles for subgroup \(sg), D \(D)/\(Dv)"); continue
                }
                XCTAssertEqual(t.SG, sg); XCTAssertEqual(t.NSG, 1)
                XCTAssertEqual(t.BKV % t.M, 0); XCTAssertEqual(t.BKV % t.N, 0); XCTAssertEqual(t.BKV % t.K, 0)
                XCTAssertEqual(D % t.K, 0); XCTAssertEqual(Dv % t.N, 0); XCTAssertEqual(t.BKV % max(1, sg / t.M), 0)
                XCTAssertLessThanOrEqual(GenericTiles.sharedBytes(D: D, Dv: Dv, M: t.M, NSG: 1, BKV: t.BKV, emulated: false), 49152 - 256)
            }
        }
        // VKFLEX_DECODE_TILE=mm16 / mm32: keys a step, and the shared memory that goes with them at D = 128.
        for (keys, bytes) in [(16, 10_752), (32, 20_992)] {
            let t = AttentionPlanner.decodeMMTiles(D: 128, Dv: 128, subgroupSize: 32, shapes: [shape(16, 16, 16)], sharedMemory: 49152,
                                                   maxInvocations: 1024, keys: keys)
            XCTAssertEqual(t?.BKV, keys); XCTAssertEqual(t?.NSG, 1)
            XCTAssertEqual(t.map { GenericTiles.sharedBytes(D: 128, Dv: 128, M: $0.M, NSG: 1, BKV: $0.BKV, emulated: false) }, bytes)
        }
        // mmNxS: S subgroups, each with tiles of its own — 4 of 16 keys fit 48 KiB at D = 128, 4 of 32 do not.
        func mm(_ keys: Int, _ sgs: Int) -> GenericTiles? {
            AttentionPlanner.decodeMMTiles(D: 128, Dv: 128, subgroupSize: 32, shapes: [shape(16, 16, 16)], sharedMemory: 49152,
                                           maxInvocations: 1024, keys: keys, subgroups: sgs)
        }
        XCTAssertEqual(mm(16, 4)?.NSG, 4); XCTAssertEqual(mm(16, 4)?.WG, 128); XCTAssertEqual(mm(32, 2)?.NSG, 2)
        XCTAssertNil(mm(32, 4))
        XCTAssertNil(AttentionPlanner.decodeMMTiles(D: 40, Dv: 40, subgroupSize: 32, shapes: [shape(16, 16, 16)], sharedMemory: 32768, maxInvocations: 1024))
        XCTAssertNil(AttentionPlanner.decodeMMTiles(D: 64, Dv: 64, subgroupSize: 24, shapes: [shape(16, 16, 16)], sharedMemory: 32768, maxInvocations: 1024))
    }

    /// The planner picks split-KV for few rows; forcing it on many rows is a clear error.
    func testThePlannerPicksSplitKVForFewRows() throws {
        let q1 = try device.tensor(randn(2 * 8 * 16), shape: [1, 2, 8, 16]), q2 = try device.tensor(randn(2 * 40 * 16), shape: [1, 2, 40, 16])
        let k = try device.tensor(randn(2 * 100 * 16), shape: [1, 2, 100, 16])
        XCTAssertEqual(try flexAttention(q1, k, k).kernel, .splitKV)
        XCTAssertEqual(try flexAttention(q2, k, k).kernel, .portable)
        XCTAssertEqual(try flexAttention(q1, k, k, returnMaxScores: true).kernel, .splitKV)
        XCTAssertThrowsError(try flexAttention(q2, k, k, options: FlexOptions(kernel: .splitKV))) {
            XCTAssertTrue("\($0)".contains("split-kv takes at most 16 query rows"), "\($0)")
        }
        XCTAssertEqual(FlexKernel(name: "split-kv"), .splitKV)
        XCTAssertNotNil(FlexKernel.splitKV.problem(q2, k, k))
        // VKFLEX_DECODE_WAVES: workgroups per compute unit the key splits aim at (4 unless set; the
        // NVIDIA-layout kernel one wave of eight subgroups a compute unit unless set).
        XCTAssertNil(try AttentionTuning.parse([:]).decodeWaves)
        // H100 (132 SMs): speculative decoding's 64 workgroups take 16 splits (not 17: a second wave),
        // one-row MQA's 8 take 132; the scalar kernel's 128 invocations one wave of four a compute
        // unit, rounded down (8 splits of 64 workgroups: 512 of 528; 9 was a wave and a tail).
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 64, computeUnits: 132, workgroupSize: 32, subgroups: 1, nvidiaLayout: true, waves: nil), 16)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 8, computeUnits: 132, workgroupSize: 32, subgroups: 1, nvidiaLayout: true, waves: nil), 132)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 2000, computeUnits: 132, workgroupSize: 32, subgroups: 1, nvidiaLayout: true, waves: nil), 1)
        // Half a wave where the wave's splits would walk fewer than 4 key blocks each: MQA's 256
        // blocks over 132 splits (2 each) become 66; speculative decoding's 64 over 16 (4 each) stay;
        // the scalar kernel and the older rule are not affected; the key blocks cap what is left.
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 8, computeUnits: 132, workgroupSize: 32, subgroups: 1, nvidiaLayout: true, waves: nil, kvBlocks: 256), 66)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 8, computeUnits: 132, workgroupSize: 32, subgroups: 1, nvidiaLayout: true, waves: nil, kvBlocks: 528), 132)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 64, computeUnits: 132, workgroupSize: 32, subgroups: 1, nvidiaLayout: true, waves: nil, kvBlocks: 64), 16)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 8, computeUnits: 132, workgroupSize: 128, subgroups: 1, nvidiaLayout: false, waves: nil, kvBlocks: 256), 66)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 8, computeUnits: 132, workgroupSize: 32, subgroups: 1, nvidiaLayout: true, waves: 4, kvBlocks: 256), 264)
        XCTAssertEqual(AttentionPlanner.decodeSplits(wanted: AttentionPlanner.decodeWantedSplits(workgroups: 8, computeUnits: 132, workgroupSize: 32, subgroups: 1,
                                                                                                 nvidiaLayout: true, waves: nil, kvBlocks: 32),
                                                     kvBlocks: 32, partialBytesPerSplit: 64 << 10, subgroups: 1), 32)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 64, computeUnits: 132, workgroupSize: 32, subgroups: 1, nvidiaLayout: true, waves: 4), 33)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 64, computeUnits: 132, workgroupSize: 128, subgroups: 1, nvidiaLayout: false, waves: nil), 8)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 8, computeUnits: 132, workgroupSize: 128, subgroups: 1, nvidiaLayout: false, waves: nil), 66)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 64, computeUnits: 132, workgroupSize: 128, subgroups: 1, nvidiaLayout: false, waves: 4), 9)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 64, computeUnits: 132, workgroupSize: 128, subgroups: 4, nvidiaLayout: false, waves: nil), 32)
        XCTAssertEqual(AttentionPlanner.decodeWantedSplits(workgroups: 200, computeUnits: 2, workgroupSize: 128, subgroups: 1, nvidiaLayout: false, waves: nil), 1)
        // The merge: groups enough that each takes about eight splits (their loads issued together).
        for (splits, Dv, layout) in [(132, 128, [32, 8, 1]), (16, 128, [32, 2, 4]), (8, 128, [32, 1, 8]), (9, 64, [16, 2, 8]), (3, 13, [16, 1, 16])] {
            let l = ForwardKernel.mergeLayout(splits: splits, Dv: Dv, wg: 256)
            XCTAssertEqual([l.ul, l.groups, l.rows], layout, "\(splits) splits, Dv \(Dv)")
        }
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_DECODE_WAVES": "8"]).decodeWaves, 8)
        for bad in ["0", "x", "65", "-1"] {
            XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_DECODE_WAVES": bad])) { XCTAssertTrue("\($0)".contains("VKFLEX_DECODE_WAVES=\(bad)"), "\($0)") }
        }
    }

    /// `VKFLEX_DECODE_SPLITS` forces the key splits (one, three, more than the KV blocks: capped)
    /// with the reference's answers; `VKFLEX_PROFILE=1` times each dispatch (the decode pass and
    /// the merge, once a call) and hands the times over once; a device without it records none.
    /// The NVIDIA-layout split-KV kernel (flex_attention_decode_nv.comp: K and V loaded straight
    /// into matrices) compiles for NV and KHR, float16 and bfloat16, with every option; the host's
    /// rules for the inputs and calls it takes, its key splits; lavapipe never gets it (`vkflex
    /// selftest` on an NVIDIA GPU runs it: by default on speculative decoding's rows, or with
    /// `VKFLEX_DECODE_TILE=nv`).
    func testTheNVLayoutKernelCompilesAndItsRules() throws {
        let slopes = try device.tensor([0.5, 0.25, 0.125, 0.0625], shape: [4], name: "slopes")
        let mods = try SplicedMods(score: ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }, mask: MaskMod { _, _, q, kv in q >= kv },
                                   firstBinding: AttentionBinding.firstCapture, errorBinding: AttentionBinding.errors.rawValue, device: device)
        var library = ShaderLibrary.standard
        library.files.merge(mods.includes) { _, new in new }
        var compiled = 0
        // nvr's words in every load width: K 16-byte (D = 128, 64, 32) and 8-byte (48) units,
        // V 16-byte (128, 64), 8-byte (96) and 4-byte (16).
        for (nsg, prefetch, registers, rotate) in [(1, true, false, false), (1, false, false, false), (4, true, false, false),
                                                   (1, true, true, false), (1, false, true, false), (2, true, true, true)] {
            var tuning = AttentionTuning()
            tuning.decodeNV = (nsg, prefetch, registers, rotate)
            let t = AttentionPlanner.decodeNVTiles(tuning)
            XCTAssertEqual([t.M, t.BKV, t.SG, t.NSG], [16, 16, 32, nsg])
            XCTAssertEqual([t.nvRegisters, t.nvRotate], [registers, rotate])
            for (D, Dv, dtype) in [(128, 128, DType.float16), (64, 64, .bfloat16), (32, 96, .float16)] + (registers ? [(48, 16, .float16)] : []) {
                for flags in [false, true] {
                    let plan = AttentionPlan(pass: .forwardPartial, kernel: .splitKV, dtype: dtype, D: D, Dv: Dv, tiles: .decodeMM(t), typedOperands: true,
                                             maxScores: flags, kvLengths: flags, qOffsets: flags, paged: flags, pushParams: true, mods: mods.glsl.source)
                    let source = try plan.source()
                    XCTAssertEqual(source.name, "flex_attention_decode_nv")
                    XCTAssertTrue(source.defines.contains { $0.name == "DEC_PREFETCH" && $0.value == (rotate ? "2" : prefetch ? "1" : "0") })
                    XCTAssertTrue(source.defines.contains { $0.name == "DEC_REGLOAD" && $0.value == (registers ? "1" : "0") })
                    let spirv = try ShaderCompiler.shared.compile(source, library: library)
                    XCTAssertTrue(CooperativeMatrixKHRRewriter.usesNVCooperativeMatrix(spirv))
                    let khr = try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: 32)
                    try CooperativeMatrixKHRRewriter.verify(khr)
                    if plan.bfloat16Operands, !registers { try assertBFloat16Operands(try BFloat16Retyper.retype(khr), "decode nv D=\(D)") }
                    compiled += 1
                }
            }
        }
        // nv2: two 16-key chunks a step, V's rows past a chunk's keys zeroed through either B layout.
        for (bT, registers) in [(false, false), (true, false), (true, true)] {
            var tuning = try AttentionTuning.parse(["VKFLEX_DECODE_TILE": registers ? "nvr2" : "nv2"])
            XCTAssertEqual(tuning.decodeNVChunks, 2)
            var t = AttentionPlanner.decodeNVTiles(tuning)
            t.nvBTransposed = bT
            XCTAssertEqual([t.nvChunks, t.NSG], [2, 1])
            XCTAssertFalse(t.prefetch)
            XCTAssertEqual(t.nvRegisters, registers)
            tuning.decodeNVChunks = 1
            // (nvr2: float16 only, as nvr; D = 48 for its 8-byte K units.)
            for (D, Dv, dtype) in registers ? [(128, 128, DType.float16), (48, 96, .float16)] : [(128, 128, DType.float16), (64, 64, .bfloat16), (32, 96, .float16)] {
                for flags in [false, true] {
                    let plan = AttentionPlan(pass: .forwardPartial, kernel: .splitKV, dtype: dtype, D: D, Dv: Dv, tiles: .decodeMM(t), typedOperands: true,
                                             maxScores: flags, kvLengths: flags, qOffsets: flags, paged: flags, pushParams: true, mods: mods.glsl.source)
                    let source = try plan.source()
                    XCTAssertTrue(source.defines.contains { $0.name == "DEC_CHUNKS" && $0.value == "2" })
                    XCTAssertTrue(source.defines.contains { $0.name == "DEC_REGLOAD" && $0.value == (registers ? "1" : "0") })
                    XCTAssertTrue(source.defines.contains { $0.name == "DEC_B_T" && $0.value == (bT ? "1" : "0") })
                    let spirv = try ShaderCompiler.shared.compile(source, library: library)
                    let khr = try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: 32)
                    try CooperativeMatrixKHRRewriter.verify(khr)
                    if plan.bfloat16Operands { try assertBFloat16Operands(try BFloat16Retyper.retype(khr), "decode nv2 D=\(D)") }
                    compiled += 1
                }
            }
        }
        // nvrd (two chunks' words in flight) is gone: NVIDIA's compiler crashed on it (H100, 2026-12-07).
        for bad in ["nvd", "nvrd", "nvx2rd", "nvrx2d"] { XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_DECODE_TILE": bad]), bad) }
        // VKFLEX_DECODE_KLINES=1: K's words eight lanes a row, then shuffled (D a multiple of 64;
        // elsewhere, and for coopMatLoadNV's or two chunks' steps, the define stays 0).
        XCTAssertFalse(try AttentionTuning.parse([:]).decodeKLines)
        XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_DECODE_KLINES": "yes"])) { XCTAssertTrue("\($0)".contains("VKFLEX_DECODE_KLINES=yes"), "\($0)") }
        for (tile, D, on) in [("nvrh", 128, true), ("nvr", 64, true), ("nvrs", 128, true), ("nvrh", 96, false), ("nv", 128, false), ("nvr2", 128, false)] {
            var tuning = try AttentionTuning.parse(["VKFLEX_DECODE_TILE": tile, "VKFLEX_DECODE_KLINES": "1"])
            XCTAssertTrue(tuning.decodeKLines)
            if tile == "nvr2" { tuning.decodeNV = (1, false, true, false) }
            let plan = AttentionPlan(pass: .forwardPartial, kernel: .splitKV, dtype: .float16, D: D, Dv: 128, tiles: .decodeMM(AttentionPlanner.decodeNVTiles(tuning)),
                                     typedOperands: true, pushParams: true, mods: mods.glsl.source)
            let source = try plan.source()
            XCTAssertTrue(source.defines.contains { $0.name == "DEC_KLINES" && $0.value == (on ? "1" : "0") }, "\(tile) D=\(D)")
            let spirv = try ShaderCompiler.shared.compile(source, library: library)
            try CooperativeMatrixKHRRewriter.verify(try CooperativeMatrixKHRRewriter.rewrite(spirv, subgroupSize: 32))
        }
        XCTAssertEqual(compiled, 58)
        // VKFLEX_DECODE_UNROLL: 1 or 0 for both kernels' step loops; unset, each its default.
        XCTAssertNil(try AttentionTuning.parse([:]).decodeDriverUnroll)
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_DECODE_UNROLL": "0"]).decodeDriverUnroll, false)
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_DECODE_UNROLL": "1"]).decodeDriverUnroll, true)
        XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_DECODE_UNROLL": "2"])) { XCTAssertTrue("\($0)".contains("VKFLEX_DECODE_UNROLL=2"), "\($0)") }
        for noUnroll in [false, true] {
            let plan = AttentionPlan(pass: .forwardPartial, kernel: .splitKV, dtype: .float16, D: 128, Dv: 128,
                                     tiles: .decode(rows: 4, KPL: 2, WG: 128, LK: 16, scatter: false, noUnroll: noUnroll), pushParams: true, mods: mods.glsl.source)
            let source = try plan.source()
            XCTAssertEqual(source.defines.contains { $0.name == "DEC_DONT_UNROLL" && $0.value == "1" }, noUnroll)
            _ = try ShaderCompiler.shared.compile(source, library: library)
        }
        // The inputs it takes: contiguous, 16-byte aligned rows; blocks, pages or the cache in 16s.
        let k = try device.tensor(randn(2 * 2 * 64 * 16), shape: [2, 2, 64, 16], dtype: .float16, name: "k")
        XCTAssertNil(AttentionPlanner.decodeNVInputs(k: k, v: k, Lkv: 64, kvBlockSize: nil, pageSize: nil).problem)
        XCTAssertNil(AttentionPlanner.decodeNVInputs(k: k, v: k, Lkv: 64, kvBlockSize: 32, pageSize: 16).problem)
        XCTAssertNotNil(AttentionPlanner.decodeNVInputs(k: k, v: k, Lkv: 63, kvBlockSize: nil, pageSize: nil).problem)
        XCTAssertNotNil(AttentionPlanner.decodeNVInputs(k: k, v: k, Lkv: 64, kvBlockSize: 24, pageSize: nil).problem)
        XCTAssertNotNil(AttentionPlanner.decodeNVInputs(k: k, v: k, Lkv: 64, kvBlockSize: nil, pageSize: 8).problem)
        let odd = try k.asStrided(shape: [2, 2, 60, 16], strides: [2 * 64 * 16, 64 * 16, 16, 1], byteOffset: 8)
        XCTAssertEqual(AttentionPlanner.decodeNVInputs(k: odd, v: k, Lkv: 64, kvBlockSize: nil, pageSize: nil).problem,
                       "k's rows are not contiguous and 16-byte aligned")
        let shape = try AttentionShape(k, k, k, blockMask: nil, enableGQA: false)
        XCTAssertNotNil(AttentionPlanner.decodeNVProblem(shape, device: device))   // no inputs checked; and lavapipe has no matrices
        AttentionPlanner.$decodeNVInputs.withValue(AttentionPlanner.DecodeNVInputs(problem: nil)) {
            XCTAssertEqual(AttentionPlanner.decodeNVProblem(shape, device: device) == nil, device.cooperativeMatrixAPI != nil
                           && CooperativeMatrixLayout.of(device)?.matches(CooperativeMatrixLayout.nvidiaMMA) == true)
        }
        // By default: 8 or more rows per KV head (speculative decoding, multi-query attention).
        func decodeCall(_ Hq: Int, _ Hkv: Int, _ Lq: Int) throws -> AttentionShape {
            let kv = try device.tensor(randn(Hkv * 64 * 16), shape: [1, Hkv, 64, 16], dtype: .float16)
            return try AttentionShape(try device.tensor(randn(Hq * Lq * 16), shape: [1, Hq, Lq, 16], dtype: .float16), kv, kv, blockMask: nil, enableGQA: true)
        }
        XCTAssertTrue(AttentionPlanner.decodeNVByDefault(try decodeCall(8, 2, 4)))
        XCTAssertTrue(AttentionPlanner.decodeNVByDefault(try decodeCall(16, 1, 1)))    // one row of 16 heads (MQA)
        XCTAssertFalse(AttentionPlanner.decodeNVByDefault(try decodeCall(4, 1, 1)))    // 4 rows: the scalar kernel was faster
        XCTAssertFalse(AttentionPlanner.decodeNVByDefault(try decodeCall(2, 2, 4)))    // 4 rows a KV head
        // Key splits: about four workgroups a compute unit, at most one a KV block, and partials
        // within the pooled buffers (a larger scratch is an allocation per call).
        XCTAssertEqual(AttentionPlanner.decodeSplits(wanted: 33, kvBlocks: 64, partialBytesPerSplit: 512 << 10, subgroups: 1), 32)
        XCTAssertEqual(AttentionPlanner.decodeSplits(wanted: 33, kvBlocks: 20, partialBytesPerSplit: 512 << 10, subgroups: 1), 20)
        XCTAssertEqual(AttentionPlanner.decodeSplits(wanted: 9, kvBlocks: 64, partialBytesPerSplit: 128 << 10, subgroups: 1), 9)
        XCTAssertEqual(AttentionPlanner.decodeSplits(wanted: 64, kvBlocks: 64, partialBytesPerSplit: 3 << 20, subgroups: 4), 4)
        XCTAssertEqual(AttentionPlanner.decodeSplits(wanted: 0, kvBlocks: 64, partialBytesPerSplit: 64 << 20, subgroups: 1), 1)
        XCTAssertEqual(Device.maxPooledBufferBytes, 16 << 20)
        // VKFLEX_DECODE_TILE=nv[r][xS][s|h].
        for (text, nsg, prefetch, registers, rotate) in [("nv", 1, true, false, false), ("NVs", 1, false, false, false), ("nvx2", 2, true, false, false),
                                                          ("nvx4s", 4, false, false, false), ("nvr", 1, true, true, false), ("nvrs", 1, false, true, false),
                                                          ("nvrh", 1, true, true, true), ("nvrx2h", 2, true, true, true)] {
            let t = try AttentionTuning.parse(["VKFLEX_DECODE_TILE": text])
            XCTAssertEqual(t.decodeNV?.nsg, nsg, text); XCTAssertEqual(t.decodeNV?.prefetch, prefetch, text); XCTAssertEqual(t.decodeMatrices, false, text)
            XCTAssertEqual(t.decodeNV?.registers, registers, text); XCTAssertEqual(t.decodeNV?.rotate, rotate, text)
        }
        for bad in ["nvx3", "nvx", "nv2x2", "nv2s", "nvss", "nvh", "nvrr", "nvx2rh"] {
            XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_DECODE_TILE": bad])) { XCTAssertTrue("\($0)".contains("use nv"), "\($0)") }
        }
    }

    func testForcedSplitsAndDispatchProfile() throws {
        XCTAssertNil(try AttentionTuning.parse([:]).decodeSplits)
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_DECODE_SPLITS": "3"]).decodeSplits, 3)
        for bad in ["0", "x", "-2", "70000"] {
            XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_DECODE_SPLITS": bad])) { XCTAssertTrue("\($0)".contains("VKFLEX_DECODE_SPLITS=\(bad)"), "\($0)") }
        }
        _ = try flexAttention(try device.tensor(randn(64), shape: [1, 1, 1, 64]), try device.tensor(randn(640), shape: [1, 1, 10, 64]),
                              try device.tensor(randn(640), shape: [1, 1, 10, 64]))
        XCTAssertTrue(try device.takeDispatchProfile().isEmpty)
        for splits in ["1", "3", "100"] {
            let dev = try device(with: ["VKFLEX_DECODE_SPLITS": splits, "VKFLEX_PROFILE": "1"])
            XCTAssertTrue(dev.profilesDispatches)
            let q = try dev.tensor(randn(2 * 4 * 32), shape: [2, 4, 1, 32])
            let k = try dev.tensor(randn(2 * 2 * 700 * 32), shape: [2, 2, 700, 32]), v = try dev.tensor(randn(2 * 2 * 700 * 32), shape: [2, 2, 700, 32])
            let r = try flexAttention(q, k, v, enableGQA: true, returnLSE: true, options: FlexOptions(kernel: .splitKV))
            let ref = try flexAttentionReference(q, k, v, enableGQA: true)
            XCTAssertLessThan(relativeL2Error(try r.output.toArray(), ref.output), 1e-5, "splits \(splits)")
            XCTAssertLessThan(relativeL2Error(try r.lse!.toArray(), ref.lse), 1e-6, "splits \(splits)")
            guard dev.capabilities.timestamps else { continue }
            let profile = try dev.takeDispatchProfile()
            XCTAssertEqual(profile.map(\.shader).sorted(), ["flex_attention_decode", "flex_attention_merge"], "splits \(splits)")
            XCTAssertTrue(profile.allSatisfy { $0.dispatches == 1 && $0.seconds > 0 }, "\(profile)")
            XCTAssertTrue(try dev.takeDispatchProfile().isEmpty)
        }
    }

    /// The merge of many splits, several rounds of loads a group: one-row MQA (16 heads on one KV
    /// head) in 150 splits of 16-key blocks (8 groups of 32 invocations at Dv = 128, about 19
    /// splits each: three rounds of eight, merged against a running maximum), a mask that keeps
    /// fewer blocks than splits (the later splits keyless: O 0, LSE -inf), a shorter cache for one
    /// batch, and a NaN query row, whose output and LSE stay NaN while the other rows match the
    /// float64 reference.
    func testMergeOfManySplitsInRounds() throws {
        XCTAssertEqual(ForwardKernel.mergeLayout(splits: 150, Dv: 128, wg: 256).groups, 8)
        let dev = try device(with: ["VKFLEX_DECODE_SPLITS": "150"])
        let (B, Hq, Lkv, D) = (2, 16, 2400, 128)
        var qv = randn(B * Hq * D)
        let nanRow = 3   // (b 0, h 3)
        qv[nanRow * D + 5] = .nan
        let q = try dev.tensor(qv, shape: [B, Hq, 1, D])
        let k = try dev.tensor(randn(B * Lkv * D), shape: [B, 1, Lkv, D]), v = try dev.tensor(randn(B * Lkv * D), shape: [B, 1, Lkv, D])
        let bm = try createBlockMask(MaskMod { _, _, _, ki in ki >= 700 }, B: 1, H: 1, qLen: 1, kvLen: Lkv, device: dev, blockSize: 16)
        let lengths = [2400, 1900]
        let r = try flexAttention(q, k, v, blockMask: bm, enableGQA: true, kvLengths: try dev.tensor(lengths, shape: [B]), returnLSE: true,
                                  options: FlexOptions(kernel: .splitKV))
        let ref = try flexAttentionReference(q, k, v, blockMask: bm, enableGQA: true, kvLengths: lengths)
        let out = try r.output.toArray(), lse = try r.lse!.toArray()
        XCTAssertTrue(out[(nanRow * D)..<((nanRow + 1) * D)].allSatisfy(\.isNaN))
        XCTAssertTrue(lse[nanRow].isNaN)
        let rows = (0..<(B * Hq)).filter { $0 != nanRow }
        let o = rows.flatMap { out[($0 * D)..<(($0 + 1) * D)] }, oRef = rows.flatMap { ref.output[($0 * D)..<(($0 + 1) * D)] }
        XCTAssertLessThan(relativeL2Error(o, oRef), 1e-5)
        XCTAssertLessThan(relativeL2Error(rows.map { lse[$0] }, rows.map { ref.lse[$0] }), 1e-6)
    }

    /// The matrix kernel with two subgroups a workgroup (`VKFLEX_DECODE_TILE=mm16x2`, emulated on
    /// lavapipe), each walking a split of its own: GQA rows, a sliding window written with query
    /// offsets, key lengths, paged K/V, and more splits than KV blocks (subgroups with nothing to walk).
    /// With `p` (`mm16p`, `mm16x2p`), each step's K and V are loaded a step ahead (`DEC_PREFETCH`).
    func testMatrixKernelWithSubgroupsOfItsOwn() throws {
        for (tile, splits) in [("mm16x2", ""), ("mm16x2", "40"), ("mm16p", "4"), ("mm16x2p", "40")] {
            var env = ["VKFLEX_DECODE_TILE": tile]
            if !splits.isEmpty { env["VKFLEX_DECODE_SPLITS"] = splits }
            let dev = try device(with: env)
            let (B, Hq, Hkv, Lq, Lkv, D) = (2, 8, 2, 2, 700, 32)
            let q = try dev.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: .float16)
            let kv = randn(B * Hkv * Lkv * D), vv = randn(B * Hkv * Lkv * D)
            let k = try dev.tensor(kv, shape: [B, Hkv, Lkv, D], dtype: .float16), v = try dev.tensor(vv, shape: [B, Hkv, Lkv, D], dtype: .float16)
            let offsets = [600, 301], lengths = [650, 700]
            let mask = MaskMod { _, _, qi, ki in (qi >= ki) & (qi - ki <= 300) }
            let bm = try createBlockMask(mask, B: 1, H: 1, qLen: 700, kvLen: Lkv, device: dev, blockSize: 64)
            let r = try flexAttention(q, k, v, blockMask: bm, enableGQA: true, kvLengths: try dev.tensor(lengths, shape: [B]),
                                      qOffset: .perBatch(try dev.tensor(offsets, shape: [B])), returnLSE: true, options: FlexOptions(kernel: .splitKV))
            let ref = try flexAttentionReference(q, k, v, blockMask: bm, enableGQA: true, kvLengths: lengths, qOffsets: offsets)
            XCTAssertLessThan(relativeL2Error(try r.output.toArray(), ref.output), 2e-3, "\(tile), splits \(splits)")
            XCTAssertLessThan(relativeL2Error(try r.lse!.toArray(), ref.lse), 1e-4, "\(tile), splits \(splits)")
            // The same cache through a permuted page table.
            let P = 64, pages = Lkv / P + 1, perm = Array((0..<(B * pages)).reversed())
            var kp = [Float](repeating: .nan, count: B * pages * P * Hkv * D), vp = kp
            for b in 0..<B { for h in 0..<Hkv { for j in 0..<Lkv {
                let page = perm[b * pages + j / P], src = ((b * Hkv + h) * Lkv + j) * D, dst = (h * B * pages * P + page * P + j % P) * D
                for d in 0..<D { kp[dst + d] = kv[src + d]; vp[dst + d] = vv[src + d] }
            } } }
            let table = try dev.tensor((0..<(B * pages)).map { Int32(perm[$0]) }, shape: [B, pages])
            let kc = try dev.tensor(kp, shape: [1, Hkv, B * pages * P, D], dtype: .float16), vc = try dev.tensor(vp, shape: [1, Hkv, B * pages * P, D], dtype: .float16)
            let logical = try createBlockMask(mask, B: 1, H: 1, qLen: 700, kvLen: pages * P, device: dev, blockSize: 64)
            let paged = try flexAttention(q, kc, vc, blockMask: logical, enableGQA: true, qOffset: .perBatch(try dev.tensor(offsets, shape: [B])),
                                          pageTable: PageTable(table: table, lengths: try dev.tensor(lengths, shape: [B]), pageSize: P),
                                          options: FlexOptions(kernel: .splitKV))
            XCTAssertLessThan(relativeL2Error(try paged.output.toArray(), ref.output), 2e-3, "\(tile) paged, splits \(splits)")
        }
    }

    /// Every tile shape (`VKFLEX_DECODE_TILE`), each dtype, and the paths without 16-byte loads:
    /// head dims that are not multiples of 8 (odd ones too: a row's last unit is mostly padding),
    /// a value dim unlike the key's, against the float64 reference.
    func testKeyTilesDtypesAndOddHeadDims() throws {
        // The default tiles for every dtype and shape; others for one each (every variant is a
        // pipeline to build: CI's time). 2x1: one key per slot, a head's two rows a workgroup, and
        // one invocation per key (D = 8); 8x3: rows left empty, a key count per round that is not a
        // power of two; 4x2x8: NVIDIA's two keys per slot (lavapipe's default is one), more
        // invocations per key than a 40-wide float32 row has units;
        // the reduce-scatter (s) with fewer rows than invocations per key (4 rows, 8 invocations
        // on lavapipe), more (16 rows, 8; 8 rows, 4) and as many (8, 8).
        let shapes: [(DType, Int, Int)] = [(.float16, 64, 64), (.float32, 40, 24), (.bfloat16, 33, 17), (.float16, 8, 136)]
        let runs: [(String?, [(DType, Int, Int)])] = [(nil, shapes), ("2x1", [shapes[2], (.float16, 8, 8)]), ("8x3", [shapes[0]]), ("4x2x8", [shapes[1]]),
                                                      ("4x2xs", [shapes[0]]), ("8x1xs", [shapes[1]]), ("8x2xs", [shapes[2]])]
        for (tile, cases) in runs {
            let d: Device = try tile.map { try device(with: ["VKFLEX_DECODE_TILE": $0]) } ?? device
            for (dtype, D, Dv) in cases {
                let (B, Hq, Hkv, Lq, L) = (2, 4, 2, 2, 301)
                let q = try d.tensor(randn(B * Hq * Lq * D), shape: [B, Hq, Lq, D], dtype: dtype)
                let k = try d.tensor(randn(B * Hkv * L * D), shape: [B, Hkv, L, D], dtype: dtype)
                let v = try d.tensor(randn(B * Hkv * L * Dv), shape: [B, Hkv, L, Dv], dtype: dtype)
                let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: L, kvLen: L, device: d, blockSize: 64)
                let r = try flexAttention(q, k, v, blockMask: causal, enableGQA: true, qOffset: .values([L - Lq, 150]), returnLSE: true)
                XCTAssertEqual(r.kernel, .splitKV)
                let ref = try flexAttentionReference(q, k, v, blockMask: causal, enableGQA: true, qOffsets: [L - Lq, 150])
                let tol = dtype == .float32 ? 1e-5 : dtype == .float16 ? 2e-3 : 1e-2
                let what = "VKFLEX_DECODE_TILE=\(tile ?? "default") \(dtype) D \(D)/\(Dv)"
                XCTAssertLessThanOrEqual(relativeL2Error(try r.output.toArray(), ref.output), tol, what)
                for (got, want) in zip(try r.lse!.toArray(), ref.lse) { XCTAssertEqual(Double(got), want, accuracy: 1e-3 * max(1, abs(want)), what) }
            }
        }
        func parsed(_ text: String) throws -> [Int]? {
            try AttentionTuning.parse(["VKFLEX_DECODE_TILE": text]).decodeTile.map { [$0.rows, $0.keys, $0.lanes ?? 0, $0.scatter ? 1 : 0] }
        }
        XCTAssertEqual(try parsed("8x2"), [8, 2, 0, 0])
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_DECODE_TILE": "mm"]).decodeMatrices, true)
        XCTAssertNil(try AttentionTuning.parse(["VKFLEX_DECODE_TILE": "mm"]).decodeMMKeys)
        // mmN[xS]: the matrix kernel with N keys a step (and S subgroups a workgroup).
        for n in [16, 32] {
            let t = try AttentionTuning.parse(["VKFLEX_DECODE_TILE": "mm\(n)"])
            XCTAssertEqual(t.decodeMatrices, true); XCTAssertEqual(t.decodeMMKeys, n); XCTAssertNil(t.decodeMMSubgroups)
            for sgs in [1, 2, 4] {
                let u = try AttentionTuning.parse(["VKFLEX_DECODE_TILE": "mm\(n)x\(sgs)"])
                XCTAssertEqual(u.decodeMatrices, true); XCTAssertEqual(u.decodeMMKeys, n); XCTAssertEqual(u.decodeMMSubgroups, sgs)
            }
        }
        for (text, keys, sgs) in [("mmp", nil, nil), ("mm16p", 16, nil), ("mm32x4p", 32, 4)] as [(String, Int?, Int?)] {
            let u = try AttentionTuning.parse(["VKFLEX_DECODE_TILE": text])
            XCTAssertEqual([u.decodeMMKeys, u.decodeMMSubgroups], [keys, sgs], text); XCTAssertTrue(u.decodeMMPrefetch, text)
        }
        XCTAssertFalse(try AttentionTuning.parse(["VKFLEX_DECODE_TILE": "mm16x4"]).decodeMMPrefetch)
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_DECODE_TILE": "Scalar"]).decodeMatrices, false)
        XCTAssertEqual(try AttentionTuning.parse(["VKFLEX_DECODE_TILE": "8x2"]).decodeMatrices, false)
        XCTAssertNil(try AttentionTuning.parse([:]).decodeMatrices)
        XCTAssertEqual(try parsed("4x2x8"), [4, 2, 8, 0])
        XCTAssertEqual(try parsed("16x1xs"), [16, 1, 0, 1])
        XCTAssertEqual(try parsed("4x2x8xs"), [4, 2, 8, 1])
        for bad in ["0", "16", "3x2", "32x1", "4x0", "4x9", "4x2x3", "4x2x128", "4xs", "4x2xsx8", "x", "mm8", "mm64", "mm16x8", "mm16x", "mm16x2x2", "mmx2", "mm16pp", "mm16px2", "4x2p"] {
            XCTAssertThrowsError(try AttentionTuning.parse(["VKFLEX_DECODE_TILE": bad])) { XCTAssertTrue("\($0)".contains("VKFLEX_DECODE_TILE=\(bad): use nv (the NVIDIA-layout kernel; nv2: two 16-key chunks a step, nvr2: with word loads; nvr: its matrices loaded word by word; nvx2, nvx4: 2 or 4 subgroups a workgroup; a final s: no prefetch, h: nvr's next step loaded as this one's is consumed), mm (the matrix kernel; mm16 or mm32: with 16 or 32 keys a step, mm16x4: and 1, 2 or 4 subgroups a workgroup, a final p: each step's K and V loaded a step ahead), scalar, or RxK[xL][xs]"), "\($0)") }
        }
        // Tiles: invocations per key = 16-byte units per row up to the smallest subgroup (NVIDIA's
        // 32, AMD's 32 or 64, Intel's 8, lavapipe's 8); 4 rows whatever the call's (more go to further workgroups).
        func tiles(_ D: Int, _ dtype: DType, sub: Int, Lq: Int = 1, Dv: Int? = nil) -> [Int]? {
            AttentionPlanner.decodeTiles(D: D, Dv: Dv ?? D, Lq: Lq, dtype: dtype, minSubgroupSize: sub, sharedMemory: 48 << 10, maxInvocations: 1024)
                .map { [$0.rows, $0.keys, $0.WG, $0.lanes] }
        }
        XCTAssertEqual(tiles(128, .float16, sub: 32), [4, 2, 128, 16])
        XCTAssertEqual(tiles(128, .float32, sub: 32), [4, 2, 128, 32])
        XCTAssertEqual(tiles(128, .float16, sub: 8), [4, 2, 128, 8])
        XCTAssertEqual(AttentionPlanner.decodeTiles(D: 128, Dv: 128, Lq: 1, dtype: .float16, minSubgroupSize: 8, sharedMemory: 32 << 10,
                                                    maxInvocations: 1024, cpu: true).map { [$0.rows, $0.keys] }, [4, 1], "a CPU: one key per slot")
        XCTAssertEqual(tiles(256, .float32, sub: 64), [4, 2, 128, 64])
        XCTAssertEqual(tiles(96, .float16, sub: 32), [4, 2, 128, 8])   // 12 units: 8 invocations, some with two
        XCTAssertEqual(tiles(33, .bfloat16, sub: 16, Dv: 17), [4, 2, 128, 4])
        XCTAssertEqual(tiles(128, .float16, sub: 32, Lq: 5), [4, 2, 128, 16])
        XCTAssertEqual(tiles(128, .float16, sub: 32, Lq: 16), [4, 2, 128, 16])
        XCTAssertNil(tiles(128, .float16, sub: 32, Lq: 17))
        func forced(_ f: (Int, Int, Int?), Lq: Int = 1, sub: Int = 32) -> [Int]? {
            AttentionPlanner.decodeTiles(D: 128, Dv: 128, Lq: Lq, dtype: .float16, minSubgroupSize: sub, sharedMemory: 48 << 10, maxInvocations: 1024,
                                         forced: (f.0, f.1, f.2, false)).map { [$0.rows, $0.keys, $0.WG, $0.lanes] }
        }
        XCTAssertEqual(forced((8, 4, nil)), [8, 4, 128, 16])
        XCTAssertEqual(forced((4, 2, 8)), [4, 2, 128, 8])
        XCTAssertEqual(forced((4, 2, 32)), [4, 2, 128, 32], "more invocations than units: some hold none")
        XCTAssertEqual(forced((2, 2, nil), Lq: 8), [2, 2, 128, 16], "fewer rows than the call's: more workgroups")
        XCTAssertNil(forced((4, 2, 16), sub: 8), "more invocations per key than the smallest subgroup")
        // Shared memory: per subgroup row maxima and sums, the rows' P·V; a 4096-wide value row does not fit 48 KiB at 16 rows.
        XCTAssertNotNil(tiles(64, .float32, sub: 32, Lq: 16, Dv: 2048))
        XCTAssertNil(AttentionPlanner.decodeTiles(D: 64, Dv: 4096, Lq: 1, dtype: .float32, minSubgroupSize: 32, sharedMemory: 48 << 10,
                                                  maxInvocations: 1024, forced: (16, 1, nil, false)), "16 rows of 4096-wide values")
    }

    /// `prepareFlexAttention` with what a decode step passes builds the split-KV kernel and its
    /// merge: the steps compile nothing.
    func testPrepareBuildsTheDecodeKernels() throws {
        let cache = try PagedKVCache(device: device, kvHeads: 2, headDim: 32, pageSize: 16, pages: 16, entries: 2, maxLength: 128, dtype: .float16)
        let q = try device.tensor(randn(2 * 8 * 32), shape: [2, 8, 1, 32], dtype: .float16)
        // A score-mod of its own, so that no earlier test built these variants.
        let bias = ScoreMod { s, _, h, q, kv in s + 0.0123 * (h + 1) * (kv - q) }
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: 128, kvLen: 128, device: device, blockSize: 16)
        XCTAssertEqual(try prepareFlexAttention(q, cache.k, cache.v, scoreMod: bias, blockMask: causal, enableGQA: true, qOffset: .uniform(1),
                                                pageTable: try cache.pageTable()), .splitKV)
        try cache.append(keys: try device.tensor(randn(2 * 2 * 5 * 32), shape: [2, 2, 5, 32], dtype: .float16),
                         values: try device.tensor(randn(2 * 2 * 5 * 32), shape: [2, 2, 5, 32], dtype: .float16))
        let before = ShaderCompiler.shared.compilations
        let r = try flexAttention(q, cache: cache, scoreMod: bias, blockMask: causal, enableGQA: true, qOffset: .perBatch(try device.tensor([4, 4] as [Int], shape: [2])))
        XCTAssertFalse(try r.output.toArray().contains { $0.isNaN })
        XCTAssertEqual(ShaderCompiler.shared.compilations, before, "the step compiled a shader")
    }

    /// Strided views (the [B, L, H, D] layout models keep) for q, k, v and a caller's output.
    func testStridedViewsAndACallersOutput() throws {
        let (B, Hq, Hkv, Lq, L, D) = (2, 4, 2, 3, 150, 32)
        let qv = randn(B * Lq * Hq * D), kv = randn(B * L * Hkv * D), vv = randn(B * L * Hkv * D)
        let q = try device.tensor(qv, shape: [B, Lq, Hq, D]).permuted(0, 2, 1, 3)
        let k = try device.tensor(kv, shape: [B, L, Hkv, D]).permuted(0, 2, 1, 3)
        let v = try device.tensor(vv, shape: [B, L, Hkv, D]).permuted(0, 2, 1, 3)
        let outBSHD = try device.empty(shape: [B, Lq, Hq, D], dtype: .float32)
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: L, kvLen: L, device: device, blockSize: 32)
        let r = try flexAttention(q, k, v, blockMask: causal, enableGQA: true, qOffset: .values([L - Lq, 70]), returnLSE: true,
                                  out: try outBSHD.permuted(0, 2, 1, 3))
        XCTAssertEqual(r.kernel, .splitKV)
        // The same through contiguous copies and the reference.
        func contiguous(_ t: Tensor) throws -> Tensor { try device.tensor(try t.toArray(), shape: t.shape) }
        let ref = try flexAttentionReference(try contiguous(q), try contiguous(k), try contiguous(v), blockMask: causal, enableGQA: true,
                                             qOffsets: [L - Lq, 70])
        XCTAssertLessThanOrEqual(relativeL2Error(try r.output.toArray(), ref.output), 1e-5)
    }

    /// Long caches on lavapipe: the splits keep each workgroup under the loop cap.
    func testLongCache() throws {
        try check(Case(name: "40,000 keys", B: 1, Hq: 4, Hkv: 1, Lq: 1, Lkv: 40_000, D: 64,
                       mask: MaskMod { _, _, q, kv in q >= kv }, offsets: [39_999]))
    }
}
