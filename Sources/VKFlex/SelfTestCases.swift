import Foundation
import VKFlexExpr
import VKFlexVulkan

/// The attention cases `vkflex selftest` runs: every seed example of the attention-gym notebook
/// plus GQA, odd lengths, an odd head dim and float16, each against the float64 reference.
public enum AttentionSelfTest {
    public struct Outcome: Sendable {
        public var name: String
        /// The kernel the case ran through (or was meant for, when skipped).
        public var kernel: FlexKernel? = nil
        /// The case does not apply to that kernel (`detail` says why); neither passed nor failed.
        public var skipped = false
        public var passed: Bool
        public var seconds: Double
        public var relativeError: Double
        public var lseError: Double
        public var detail: String
    }

    struct Spec {
        var name: String
        var B = 1, Hq = 4, Hkv = 4, Lq = 256, Lkv = 256, D = 32, Dv = 32
        var dtype: DType = .float32
        var score: (Device) throws -> ScoreMod? = { _ in nil }
        var mask: (Device, Int, Int) throws -> MaskMod? = { _, _, _ in nil }
        var blockSize: BlockSize = 64
        /// Q, K, V as permuted views of [B, L, H, D] buffers (the layout models keep).
        var strided = false
        /// A NaN written into this query row (of every batch and head): that row must come out NaN
        /// with a NaN LSE, never as a fully masked row.
        var nanQueryRow: Int? = nil
        /// Per-batch key lengths (`kvLengths:`), one per batch.
        var kvLengths: [Int32]? = nil
        /// Per-head sink logits (`sinks:`), one per query head.
        var sinks: [Float]? = nil
        /// Query offsets (`qOffset:`), one per batch: decode rows at positions of a sequence of
        /// `Lkv` keys, the BlockMask built for all of it.
        var qOffsets: [Int]? = nil
        /// Read K and V through a page table with pages of this many keys (randomly permuted, unused
        /// pages NaN), each batch's length from `kvLengths`.
        var pageSize: Int? = nil
    }

    static var specs: [Spec] {
        let causal: (Device, Int, Int) throws -> MaskMod? = { _, _, _ in MaskMod { _, _, q, kv in q >= kv } }
        let W = 16
        var all: [Spec] = []
        all.append(Spec(name: "noop", score: { _ in .identity }))
        all.append(Spec(name: "causal", mask: causal))
        all.append(Spec(name: "sliding window 64", mask: { _, _, _ in MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 64) } }))
        all.append(Spec(name: "prefix-LM 100", mask: { _, _, _ in MaskMod { _, _, q, kv in (kv <= 100) | (q >= kv) } }))
        all.append(Spec(name: "document", mask: { d, S, _ in
                let splits = [S / 8, S / 4, S / 2]
                let ids: [Int32] = (0..<S).map { i in Int32(splits.filter { i >= $0 }.count) }
                let doc = try d.tensor(ids, shape: [S], name: "doc")
                return MaskMod { _, _, q, kv in (doc[q] == doc[kv]) & (q >= kv) }
            }))
        all.append(Spec(name: "SASA 16x16", mask: { _, _, _ in
                MaskMod { _, _, q, kv in (abs(floorDiv(q, W) - floorDiv(kv, W)) <= 3) & (abs(q % W - kv % W) <= 3) } }))
        all.append(Spec(name: "NATTEN 16x16 k5", mask: { _, _, _ in
                MaskMod { _, _, q, kv in
                    (abs(clamp(floorDiv(q, W), 2, W - 3) - floorDiv(kv, W)) <= 2) & (abs(clamp(q % W, 2, W - 3) - kv % W) <= 2) } }))
        all.append(Spec(name: "ALiBi captured", score: { d in
                let slopes = try d.tensor((0..<4).map { Float(exp2(-Double($0 + 1) * 2)) }, shape: [4], name: "alibi_slopes")
                return ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }
            }, mask: causal))
        all.append(Spec(name: "relative bias table captured", score: { d in
                let table = try d.tensor((0..<511).map { Float(sin(Double($0) / 40)) }, shape: [511], name: "rel_bias")
                return ScoreMod { s, _, _, q, kv in s + table[q - kv + 255] }
            }, mask: causal))
        all.append(Spec(name: "ALiBi functional", score: { _ in ScoreMod { s, _, h, q, kv in s + (kv - q) * exp2(-((h + 1) * 8.0 / 4)) } }, mask: causal))
        all.append(Spec(name: "tanh soft-cap 20", score: { _ in ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) } }, mask: causal))
        all.append(Spec(name: "jagged offsets", mask: { d, S, _ in
                let bounds = [0, S / 5, S / 2, S - 7, S]
                let offsets = try d.tensor(bounds.map(Int32.init), shape: [bounds.count], name: "offsets")
                let seq = try d.tensor((0..<S).map { i in Int32(bounds.lastIndex { $0 <= i }!) }, shape: [S], name: "seq_idx")
                return MaskMod { _, _, q, kv in (q - offsets[seq[q]] >= kv - offsets[seq[kv]]) & (seq[q] == seq[kv]) }
            }))
        all.append(Spec(name: "Flamingo cross-attention", Lq: 96, Lkv: 60, mask: { d, Lq, Lkv in
                let images = try d.tensor((0..<Lkv).map { Int32($0 * 3 / Lkv) }, shape: [Lkv], name: "image_of_token")
                let iv = try d.tensor([0, Int32(Lq / 2), Int32(Lq / 4), Int32(Lq), Int32(Lq * 3 / 4), Int32(Lq)], shape: [3, 2], name: "intervals")
                return MaskMod { _, _, q, kv in (q >= iv[images[kv], 0]) & (q < iv[images[kv], 1]) }
            }, blockSize: 32))
        all.append(Spec(name: "GQA 8 query / 2 kv heads", Hq: 8, Hkv: 2, mask: causal))
        all.append(Spec(name: "odd lengths 201 x 173", B: 2, Lq: 201, Lkv: 173, mask: { _, _, _ in MaskMod { _, _, q, kv in q + 28 >= kv } }, blockSize: BlockSize(q: 32, kv: 64)))
        all.append(Spec(name: "odd head dims 47 / 23", Lq: 100, Lkv: 100, D: 47, Dv: 23, mask: causal))
        all.append(Spec(name: "float16", Lq: 256, Lkv: 256, D: 64, Dv: 64, dtype: .float16, mask: causal))
        all.append(Spec(name: "float16 D32 Lq != Lkv", Lq: 130, Lkv: 200, D: 32, Dv: 32, dtype: .float16,
                        mask: { _, _, _ in MaskMod { _, _, q, kv in kv <= q + 70 } }, blockSize: 64))
        all.append(Spec(name: "float16 D96 GQA prefix-LM", Hq: 6, Hkv: 3, Lq: 200, Lkv: 200, D: 96, Dv: 96, dtype: .float16,
                        mask: { _, _, _ in MaskMod { _, _, q, kv in (kv <= 40) | (q >= kv) } }, blockSize: 64))
        all.append(Spec(name: "float16 strided views", B: 2, Hq: 4, Hkv: 4, Lq: 150, Lkv: 150, D: 64, Dv: 64, dtype: .float16,
                        mask: causal, blockSize: 128, strided: true))
        all.append(Spec(name: "float16 D128 odd lengths", Lq: 300, Lkv: 277, D: 128, Dv: 128, dtype: .float16,
                        mask: { _, _, _ in MaskMod { _, _, q, kv in q + 50 >= kv } }, blockSize: 128))
        all.append(Spec(name: "float16 D256 soft-cap 50", Lq: 200, Lkv: 200, D: 256, Dv: 256, dtype: .float16,
                        score: { _ in ScoreMod { s, _, _, _, _ in 50 * tanh(s / 50) } }, mask: causal, blockSize: 128))
        all.append(Spec(name: "float16 D192 sliding window", Lq: 230, Lkv: 230, D: 192, Dv: 192, dtype: .float16,
                        mask: { _, _, _ in MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 100) } }, blockSize: 128))
        all.append(Spec(name: "float16 soft-cap GQA", Hq: 8, Hkv: 2, Lq: 256, Lkv: 256, D: 64, Dv: 64, dtype: .float16,
                        score: { _ in ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) } }, mask: causal, blockSize: 128))
        all.append(Spec(name: "float16 document ALiBi", Lq: 384, Lkv: 384, D: 64, Dv: 64, dtype: .float16, score: { d in
            let slopes = try d.tensor((0..<4).map { Float(exp2(-Double($0 + 1) * 2)) }, shape: [4], name: "alibi_slopes")
            return ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }
        }, mask: { d, S, _ in
            let ids: [Int32] = (0..<S).map { Int32($0 * 3 / S) }
            let doc = try d.tensor(ids, shape: [S], name: "doc")
            return MaskMod { _, _, q, kv in (doc[q] == doc[kv]) & (q >= kv) }
        }, blockSize: 128))
        all.append(Spec(name: "bfloat16 causal", Lq: 256, Lkv: 256, D: 64, Dv: 64, dtype: .bfloat16, mask: causal, blockSize: 128))
        all.append(Spec(name: "bfloat16 ALiBi GQA D128", Hq: 8, Hkv: 2, Lq: 200, Lkv: 200, D: 128, Dv: 128, dtype: .bfloat16, score: { d in
            let slopes = try d.tensor((0..<8).map { Float(exp2(-Double($0 + 1))) }, shape: [8], name: "alibi_slopes")
            return ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }
        }, mask: causal, blockSize: 128))
        all.append(Spec(name: "float16 per-batch key lengths", B: 3, Hq: 4, Hkv: 2, Lq: 64, Lkv: 300, D: 64, Dv: 64, dtype: .float16,
                        mask: causal, blockSize: 128, kvLengths: [300, 0, 129]))
        all.append(Spec(name: "float16 sinks, empty rows", Hq: 4, Hkv: 2, Lq: 200, Lkv: 200, D: 64, Dv: 64, dtype: .float16,
                        mask: { _, _, _ in MaskMod { _, _, q, kv in kv <= q - 30 } }, blockSize: 128, sinks: [1.5, -2, 30, -.infinity]))
        all.append(Spec(name: "decode: float16 GQA 8/2, 1 row at the end", B: 2, Hq: 8, Hkv: 2, Lq: 1, Lkv: 1000, D: 64, Dv: 64, dtype: .float16,
                        mask: causal, blockSize: 128, qOffsets: [999, 500]))
        all.append(Spec(name: "decode: 4 rows, sliding window, ALiBi", B: 2, Hq: 4, Hkv: 1, Lq: 4, Lkv: 600, score: { d in
                let slopes = try d.tensor((0..<4).map { Float(exp2(-Double($0 + 1) * 2)) }, shape: [4], name: "alibi_slopes")
                return ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }
            }, mask: { _, _, _ in MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 200) } }, blockSize: 64, qOffsets: [596, 301]))
        // 16 rows per KV head at D = 128 (speculative decoding), a cache in 16s: what the NVIDIA-layout
        // split-KV kernel takes, its last-16-keys path included (lengths 1024 and 700).
        all.append(Spec(name: "decode: float16 4 heads x 4 rows, D128, ALiBi, key lengths", B: 2, Hq: 8, Hkv: 2, Lq: 4, Lkv: 1024, D: 128, Dv: 128,
                        dtype: .float16, score: { d in
                let slopes = try d.tensor((0..<8).map { Float(exp2(-Double($0 + 1))) }, shape: [8], name: "alibi_slopes")
                return ScoreMod { s, _, h, q, kv in s + slopes[h] * (kv - q) }
            }, mask: causal, blockSize: 128, kvLengths: [1024, 700], qOffsets: [1020, 696]))
        // One query row of 16 heads on one KV head (multi-query attention): 16 rows per KV head too,
        // which the NVIDIA-layout kernel takes by default (one-row calls with 8 or more).
        all.append(Spec(name: "decode: float16 MQA 16 heads x 1 row, D128, key lengths", B: 2, Hq: 16, Hkv: 1, Lq: 1, Lkv: 768, D: 128, Dv: 128,
                        dtype: .float16, mask: causal, blockSize: 128, kvLengths: [768, 317], qOffsets: [767, 316]))
        all.append(Spec(name: "paged decode: float16 GQA, pages of 64", B: 3, Hq: 8, Hkv: 2, Lq: 1, Lkv: 640, D: 64, Dv: 64, dtype: .float16,
                        mask: causal, blockSize: BlockSize(q: 128, kv: 64), kvLengths: [640, 1, 333], qOffsets: [639, 0, 332], pageSize: 64))
        all.append(Spec(name: "paged prefill: sliding window, pages of 16", B: 2, Lq: 96, Lkv: 96,
                        mask: { _, _, _ in MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 40) } }, blockSize: 16, kvLengths: [96, 50], pageSize: 16))
        all.append(Spec(name: "NaN query row stays NaN", Lq: 200, Lkv: 200, mask: causal, nanQueryRow: 77))
        all.append(Spec(name: "float16 NaN query row", Lq: 256, Lkv: 256, D: 64, Dv: 64, dtype: .float16, mask: causal, blockSize: 128,
                        nanQueryRow: 130))
        return all
    }

    /// The case names, in order.
    public static var names: [String] { specs.map(\.name) }

    /// Runs every case through each of `kernels` (nil: the kernel each call would choose);
    /// `progress` sees each outcome as it completes. A case a kernel cannot take is reported
    /// skipped, with the reason.
    public static func run(on device: Device, kernels: [FlexKernel]? = nil, progress: (Outcome) -> Void = { _ in }) -> [Outcome] {
        var outcomes: [Outcome] = []
        for spec in specs {
            for kernel in kernels.map({ $0.map { Optional($0) } }) ?? [nil] {
                let t0 = Date()
                var outcome = Outcome(name: spec.name, kernel: kernel, passed: false, seconds: 0, relativeError: .nan, lseError: .nan, detail: "")
                do {
                    outcome = try run(spec, device: device, kernel: kernel)
                } catch let FlexError.unsupported(reason) where kernel != nil {
                    outcome.skipped = true
                    outcome.detail = reason
                } catch {
                    outcome.detail = "\(error)"
                }
                outcome.seconds = Date().timeIntervalSince(t0)
                progress(outcome)
                outcomes.append(outcome)
            }
        }
        return outcomes
    }

    /// The cases whose backward the selftest checks (the portable kernels run it on every device).
    /// Where the score-mod captures float tensors (ALiBi slopes, a relative bias table), their
    /// gradients (`gradCaptures:`) are checked too.
    static let backwardCases = ["causal", "document", "ALiBi captured", "relative bias table captured", "tanh soft-cap 20",
                                "GQA 8 query / 2 kv heads", "odd head dims 47 / 23", "float16", "bfloat16 causal"]

    /// The cases the matrix passes' backward (coopmat-nv, coopmat-generic) checks too: their head
    /// dims, partial tiles, GQA, mods and captured biases in 16 bits.
    static let matrixBackwardCases = ["float16 D32 Lq != Lkv", "float16 D96 GQA prefix-LM", "float16 D128 odd lengths", "float16 soft-cap GQA",
                                      "float16 document ALiBi", "bfloat16 ALiBi GQA D128"]

    /// Runs the backward of the ``backwardCases`` (with a matrix kernel also the
    /// ``matrixBackwardCases``) against the float64 reference; `progress` sees each outcome as it
    /// completes. `kernel`: the dQ and dK/dV passes' (`.portable`, `.coopmatNV` or
    /// `.coopmatGeneric`; nil: the planner's); a case the forced kernel does not take is skipped.
    public static func runBackward(on device: Device, kernel: FlexKernel? = nil, progress: (Outcome) -> Void = { _ in }) -> [Outcome] {
        let names = backwardCases + (kernel == .coopmatNV || kernel == .coopmatGeneric ? matrixBackwardCases : [])
        return specs.filter { names.contains($0.name) }.map { spec in
            let t0 = Date()
            var outcome = Outcome(name: "backward: " + spec.name, kernel: kernel ?? .portable, passed: false, seconds: 0, relativeError: .nan,
                                  lseError: .nan, detail: "")
            do {
                outcome = try runBackward(spec, kernel: kernel, device: device)
            } catch FlexError.unsupported(let why) where kernel != nil {
                outcome.skipped = true; outcome.detail = why
            } catch { outcome.detail = "\(error)" }
            outcome.seconds = Date().timeIntervalSince(t0)
            progress(outcome)
            return outcome
        }
    }

    static func runBackward(_ s: Spec, kernel: FlexKernel? = nil, device: Device) throws -> Outcome {
        var rng = SystemRandomNumberGenerator()
        func randn(_ n: Int) -> [Float] {
            (0..<n).map { _ in
                let u1 = Float.random(in: Float.ulpOfOne..<1, using: &rng), u2 = Float.random(in: 0..<1, using: &rng)
                return (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * .pi * u2)
            }
        }
        let q = try device.tensor(randn(s.B * s.Hq * s.Lq * s.D), shape: [s.B, s.Hq, s.Lq, s.D], dtype: s.dtype, name: "q")
        let k = try device.tensor(randn(s.B * s.Hkv * s.Lkv * s.D), shape: [s.B, s.Hkv, s.Lkv, s.D], dtype: s.dtype, name: "k")
        let v = try device.tensor(randn(s.B * s.Hkv * s.Lkv * s.Dv), shape: [s.B, s.Hkv, s.Lkv, s.Dv], dtype: s.dtype, name: "v")
        let dO = try device.tensor(randn(s.B * s.Hq * s.Lq * s.Dv), shape: [s.B, s.Hq, s.Lq, s.Dv], dtype: s.dtype, name: "grad_out")
        let maskMod = try s.mask(device, s.Lq, s.Lkv)
        let score = try s.score(device)
        let blockMask = try maskMod.map { try createBlockMask($0, B: 1, H: 1, qLen: s.Lq, kvLen: s.Lkv, device: device, blockSize: s.blockSize) }
        let gqa = s.Hq != s.Hkv
        let forward = try flexAttention(q, k, v, scoreMod: score, blockMask: blockMask, enableGQA: gqa, returnLSE: true)
        let learnt = (score?.graph.captures ?? []).compactMap { $0.storage.object as? Tensor }.filter { $0.dtype != .int32 }
        let grads = try forward.backward(gradOutput: dO, gradCaptures: learnt, options: FlexOptions(kernel: kernel))
        let ref = try flexAttentionBackwardReference(q, k, v, gradOutput: dO, scoreMod: score, blockMask: blockMask, enableGQA: gqa,
                                                     gradCaptures: learnt)
        var worst = 0.0
        var problems: [String] = []
        let captureGrads = zip(learnt, zip(grads.captures, ref.captures)).map { ("d" + $0.name, $1.0, $1.1) }
        for (name, t, r) in [("dq", grads.dq, ref.dq), ("dk", grads.dk, ref.dk), ("dv", grads.dv, ref.dv)] + captureGrads {
            let got = try t.toArray()
            if got.contains(where: { !$0.isFinite }) { problems.append("\(name) is not finite") }
            worst = max(worst, relativeL2Error(got, r))
        }
        let tol = s.dtype == .float32 ? 1e-4 : s.dtype == .float16 ? 5e-3 : 2e-2
        if !(worst <= tol) { problems.append(String(format: "relative error %.2e > %.0e", worst, tol)) }
        let shape = "B\(s.B) H\(s.Hq)/\(s.Hkv) L\(s.Lq)x\(s.Lkv) D\(s.D)/\(s.Dv) \(s.dtype.rawValue), forward \(forward.kernel.rawValue), backward \(grads.kernel.rawValue)"
            + (learnt.isEmpty ? "" : ", gradients of " + learnt.map(\.name).joined(separator: ", ")) + (learnt.isEmpty ? "" : device.enabledFeatures.floatAtomicAdd ? " (atomics)" : " (slices)")
        return Outcome(name: "backward: " + s.name, kernel: grads.kernel, passed: problems.isEmpty, seconds: 0, relativeError: worst, lseError: 0,
                       detail: problems.isEmpty ? shape : problems.joined(separator: "; ") + " (\(shape))")
    }

    /// `k` and `v` ([B, H, L, D]) copied into physical caches of randomly permuted pages of
    /// `pageSize` keys, one spare page, unused rows NaN; with the page table (−1 past each length).
    static func pagedCopies(_ k: Tensor, _ v: Tensor, lengths: [Int], pageSize P: Int, device: Device) throws -> (Tensor, Tensor, PageTable) {
        let (B, H, L) = (k.shape[0], k.shape[1], k.shape[2])
        let maxPages = (L + P - 1) / P
        let pages = lengths.map { ($0 + P - 1) / P }.reduce(0, +) + 1
        var order = Array(0..<pages).shuffled()
        var table = [Int32](repeating: -1, count: B * maxPages)
        for b in 0..<B { for page in 0..<((lengths[b] + P - 1) / P) { table[b * maxPages + page] = Int32(order.removeLast()) } }
        func cache(_ t: Tensor) throws -> Tensor {
            let D = t.shape[3], x = try t.toArray()
            var out = [Float](repeating: .nan, count: H * pages * P * D)
            for b in 0..<B { for j in 0..<lengths[b] { for h in 0..<H {
                let row = Int(table[b * maxPages + j / P]) * P + j % P
                for d in 0..<D { out[((h * pages * P) + row) * D + d] = x[((b * H + h) * L + j) * D + d] }
            } } }
            return try device.tensor(out, shape: [1, H, pages * P, D], dtype: t.dtype, name: t.name + "_pages")
        }
        let pageTable = PageTable(table: try device.tensor(table, shape: [B, maxPages], name: "page_table"),
                                  lengths: try device.tensor(lengths, shape: [B], name: "seq_lens"), pageSize: P)
        return (try cache(k), try cache(v), pageTable)
    }

    static func run(_ s: Spec, device: Device, kernel: FlexKernel?) throws -> Outcome {
        var rng = SystemRandomNumberGenerator()
        func randn(_ n: Int) -> [Float] {
            (0..<n).map { _ in
                let u1 = Float.random(in: Float.ulpOfOne..<1, using: &rng), u2 = Float.random(in: 0..<1, using: &rng)
                return (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * .pi * u2)
            }
        }
        func input(_ H: Int, _ L: Int, _ D: Int, _ name: String) throws -> Tensor {
            if name == "q", let row = s.nanQueryRow {
                var values = randn(s.B * H * L * D)
                for bh in 0..<(s.B * H) { values[(bh * L + row) * D + D / 2] = .nan }
                return try device.tensor(values, shape: [s.B, H, L, D], dtype: s.dtype, name: name)
            }
            if s.strided {
                return try device.tensor(randn(s.B * L * H * D), shape: [s.B, L, H, D], dtype: s.dtype, name: name).permuted(0, 2, 1, 3)
            }
            return try device.tensor(randn(s.B * H * L * D), shape: [s.B, H, L, D], dtype: s.dtype, name: name)
        }
        let q = try input(s.Hq, s.Lq, s.D, "q"), k = try input(s.Hkv, s.Lkv, s.D, "k"), v = try input(s.Hkv, s.Lkv, s.Dv, "v")
        let maskMod = try s.mask(device, s.Lq, s.Lkv)
        let score = try s.score(device)
        // With query offsets the mask covers every position up to the last row's.
        let maskLength = (s.qOffsets?.max() ?? 0) + s.Lq
        let blockMask = try maskMod.map { try createBlockMask($0, B: 1, H: 1, qLen: maskLength, kvLen: s.Lkv, device: device, blockSize: s.blockSize) }
        if kernel == .coopmatNV, s.qOffsets != nil || s.pageSize != nil { throw FlexError.unsupported("qOffset: and pageTable: run the portable and split-kv kernels") }
        if let kernel, let why = kernel.problem(q, k, v, blockMask: s.qOffsets == nil ? blockMask : nil, enableGQA: s.Hq != s.Hkv) { throw FlexError.unsupported(why) }
        // Poison the output so that an unwritten element shows as NaN.
        let out = try device.tensor([Float](repeating: .nan, count: s.B * s.Hq * s.Lq * s.Dv), shape: [s.B, s.Hq, s.Lq, s.Dv], dtype: s.dtype)
        var lengths = try s.kvLengths.map { try device.tensor($0, shape: [$0.count], name: "kv_lens") }
        var (kIn, vIn, pageTable): (Tensor, Tensor, PageTable?) = (k, v, nil)
        if let P = s.pageSize, let lens = s.kvLengths {
            (kIn, vIn, pageTable) = try pagedCopies(k, v, lengths: lens.map(Int.init), pageSize: P, device: device)
            lengths = nil
        }
        let sinks = try s.sinks.map { try device.tensor($0, shape: [$0.count], name: "sinks") }
        let offsets = try s.qOffsets.map { QueryOffset.perBatch(try device.tensor($0, shape: [$0.count], name: "q_offsets")) }
        let r = try flexAttention(q, kIn, vIn, scoreMod: score, blockMask: blockMask, enableGQA: s.Hq != s.Hkv, kvLengths: lengths, qOffset: offsets,
                                  pageTable: pageTable, sinks: sinks, returnLSE: true, out: out, options: FlexOptions(kernel: kernel))
        let o = try r.output.toArray(), l = try r.lse!.toArray()
        let ref = try flexAttentionReference(q, k, v, scoreMod: score, blockMask: blockMask, enableGQA: s.Hq != s.Hkv,
                                             kvLengths: s.kvLengths?.map(Int.init), sinks: s.sinks, qOffsets: s.qOffsets)
        // Rows the reference makes NaN (a NaN score) must be NaN with a NaN LSE; the rest compare.
        var nanOK = true
        var kept: [Float] = [], keptRef: [Double] = []
        for (i, b) in ref.lse.enumerated() {
            let row = o[(i * s.Dv)..<((i + 1) * s.Dv)]
            if b.isNaN {
                if !(l[i].isNaN && row.allSatisfy { $0.isNaN }) { nanOK = false }
            } else {
                kept += row; keptRef += ref.output[(i * s.Dv)..<((i + 1) * s.Dv)]
            }
        }
        let err = relativeL2Error(kept, keptRef)
        var lseErr = 0.0
        var maskedOK = true
        for (i, (a, b)) in zip(l, ref.lse).enumerated() where !b.isNaN {
            if b == -.infinity {
                if a != -.infinity || o[(i * s.Dv)..<((i + 1) * s.Dv)].contains(where: { $0 != 0 }) { maskedOK = false }
            } else {
                lseErr = max(lseErr, abs(Double(a) - b))
            }
        }
        let tol = s.dtype == .float32 ? 1e-4 : s.dtype == .float16 ? 2e-3 : 1e-2
        let lseTol = s.dtype == .float32 ? 1e-3 : s.dtype == .float16 ? 2e-2 : 5e-2
        var problems: [String] = []
        if kept.contains(where: { $0.isNaN }) { problems.append("NaN in the output") }
        if !nanOK { problems.append("a row with a NaN score is not NaN with a NaN LSE") }
        if s.nanQueryRow != nil && !ref.lse.contains(where: { $0.isNaN }) { problems.append("the reference has no NaN row") }
        if !(err <= tol) { problems.append(String(format: "relative error %.2e > %.0e", err, tol)) }
        if !(lseErr <= lseTol) { problems.append(String(format: "LSE error %.2e > %.0e", lseErr, lseTol)) }
        if !maskedOK { problems.append("a fully masked row is not 0 / -inf") }
        let sparsity = try blockMask?.sparsity()
        let shape = "B\(s.B) H\(s.Hq)/\(s.Hkv) L\(s.Lq)x\(s.Lkv) D\(s.D)/\(s.Dv) \(s.dtype.rawValue), \(r.kernel.rawValue)" + (sparsity.map { String(format: ", sparsity %.1f%%", $0) } ?? "")
        return Outcome(name: s.name, kernel: r.kernel, passed: problems.isEmpty, seconds: 0, relativeError: err, lseError: lseErr,
                       detail: problems.isEmpty ? shape : problems.joined(separator: "; ") + " (\(shape))")
    }
}
