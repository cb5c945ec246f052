import Foundation
import VKFlexVulkan

/// The first-call check of the coopmat-generic kernel on a device the project could not test.
///
/// The generic kernel assumes only what the KHR cooperative-matrix specification guarantees, but
/// it has run on NVIDIA only. Before the planner picks it by itself on a device (AMD, Intel, a Mesa
/// driver), it runs it once per head dims on a small input — two query heads on one key/value head,
/// lengths that leave every tile and key step partly empty, no mask, then a causal one — against
/// the portable kernel. A mismatch (or a failure) keeps that device on the portable kernel for the
/// process, with one line on standard error naming the device and how to report it. A kernel forced
/// by `VKFLEX_KERNEL` or ``FlexOptions/kernel`` is not checked: that is how to reproduce a report.
enum GenericKernelCheck {
    /// Whether coopmat-generic matched the portable kernel on `device` at head dims D/Dv in
    /// `dtype` (checked the first time it is asked, then remembered for the device's lifetime).
    static func passes(D: Int, Dv: Int, dtype: DType, device: Device) -> Bool {
        verdict("coopmat-generic kernel", against: "portable kernel", key: "forward.\(D)x\(Dv).\(dtype.rawValue)", D: D, Dv: Dv, dtype: dtype, device: device) {
            try compare(D: D, Dv: Dv, dtype: dtype, device: device)
        }
    }

    /// Whether the backward's matrix passes matched the portable ones on `device` at head dims
    /// D/Dv (checked once, as ``passes(D:Dv:device:)``).
    static func backwardPasses(D: Int, Dv: Int, dtype: DType, device: Device) -> Bool {
        verdict("coopmat-generic backward", against: "portable backward", key: "backward.\(D)x\(Dv).\(dtype.rawValue)", D: D, Dv: Dv, dtype: dtype, device: device) {
            try compareBackward(D: D, Dv: Dv, dtype: dtype, device: device)
        }
    }

    /// Whether the split-KV matrix kernel matched the scalar one on `device` at head dims D/Dv (checked
    /// once, as ``passes(D:Dv:dtype:device:)``).
    static func decodePasses(D: Int, Dv: Int, dtype: DType, device: Device) -> Bool {
        verdict("split-KV matrix kernel", against: "scalar split-KV kernel", key: "decode.\(D)x\(Dv).\(dtype.rawValue)", D: D, Dv: Dv, dtype: dtype,
                device: device, reproduce: "VKFLEX_DECODE_TILE=mm vkflex selftest --kernel split-kv") {
            try compareDecode(D: D, Dv: Dv, dtype: dtype, device: device)
        }
    }

    /// Runs `compare` the first time `key` is asked on `device` and remembers whether it found
    /// nothing; a difference (or a failure) prints one line saying what to send.
    private static func verdict(_ what: String, against other: String, key: String, D: Int, Dv: Int, dtype: DType, device: Device,
                                reproduce: String = "VKFLEX_KERNEL=coopmat-generic vkflex selftest", compare: () throws -> String?) -> Bool {
        (try? device.memoized("vkflex.coopmat-generic.check.\(key)") { () -> Bool in
            let problem: String?
            do { problem = try compare() } catch { problem = "it failed: \(error)" }
            guard let problem else { return true }
            let caps = device.capabilities
            let line = "vkflex: the \(what) disagreed with the \(other) on \(caps.name) (\(caps.driverName) \(caps.driverInfo)) "
                + "at head dims \(D)/\(Dv) in \(dtype.rawValue): \(problem); using the \(other). Please report it with the output of "
                + "`vkflex devices --json` and `\(reproduce)`.\n"
            FileHandle.standardError.write(Data(line.utf8))
            return false
        }) ?? false
    }

    /// The checks' input: two query heads on one key/value head, in `dtype`, uniform in [-1, 1)
    /// from a fixed seed, with lengths (77 rows, 93 keys) that leave every tile and step partly
    /// empty, dO, and a causal mask aligned to the last key.
    private static func inputs(D: Int, Dv: Int, dtype: DType, device: Device) throws -> (q: Tensor, k: Tensor, v: Tensor, dO: Tensor, causal: BlockMask) {
        var rng = CheckInputs(seed: 0x5EED_0F_0C0E)
        func values(_ n: Int) -> [Float] { (0..<n).map { _ in Float(rng.nextUnit() * 2 - 1) } }
        let (Lq, Lkv) = (77, 93)
        let q = try device.tensor(values(2 * Lq * D), shape: [1, 2, Lq, D], dtype: dtype, name: "check_q")
        let k = try device.tensor(values(Lkv * D), shape: [1, 1, Lkv, D], dtype: dtype, name: "check_k")
        let v = try device.tensor(values(Lkv * Dv), shape: [1, 1, Lkv, Dv], dtype: dtype, name: "check_v")
        let dO = try device.tensor(values(2 * Lq * Dv), shape: [1, 2, Lq, Dv], dtype: dtype, name: "check_do")
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q + (Lkv - Lq) >= kv }, B: 1, H: 1, qLen: Lq, kvLen: Lkv, device: device,
                                         blockSize: 32, backend: .cpu())
        return (q, k, v, dO, causal)
    }

    /// What differs between the backward's matrix passes and the portable ones on a small input
    /// (GQA, partial tiles, a causal mask), or nil.
    static func compareBackward(D: Int, Dv: Int, dtype: DType, device: Device) throws -> String? {
        let (q, k, v, dO, causal) = try inputs(D: D, Dv: Dv, dtype: dtype, device: device)
        let forward = try flexAttention(q, k, v, blockMask: causal, enableGQA: true, returnLSE: true, options: FlexOptions(kernel: .portable))
        let run = { (kernel: FlexKernel) in
            try flexAttentionBackward(q, k, v, output: forward.output, lse: forward.lse!, gradOutput: dO, blockMask: causal, enableGQA: true,
                                      options: FlexOptions(kernel: kernel))
        }
        let mm = try run(.coopmatGeneric), portable = try run(.portable)
        for (name, a, b) in [("dq", mm.dq, portable.dq), ("dk", mm.dk, portable.dk), ("dv", mm.dv, portable.dv)] {
            let (x, y) = (try a.toArray(), try b.toArray())
            var err: Float = 0, scale: Float = 1e-6
            for (u, w) in zip(x, y) { err = u.isNaN ? .infinity : max(err, abs(u - w)); scale = max(scale, abs(w)) }
            // dS is rounded to fp16 (bf16) for its product (both sum in fp32): a few ulps of the largest gradient.
            if err > (dtype == .bfloat16 ? 4e-2 : 1e-2) * scale { return String(format: "largest difference %.3g in %@ (largest element %.3g)", err, name, scale) }
        }
        return nil
    }

    /// What differs between the split-KV matrix and scalar kernels on a small decode call — 8 query
    /// heads on one KV head, 2 query rows each (16 rows a workgroup), 93 keys in blocks of 32 (the
    /// last step partly empty), the rows at the end of the sequence under a causal mask (two full
    /// blocks, walked without it, and a partial one) — or nil.
    static func compareDecode(D: Int, Dv: Int, dtype: DType, device: Device) throws -> String? {
        var rng = CheckInputs(seed: 0x5EED_0F_DEC0)
        func values(_ n: Int) -> [Float] { (0..<n).map { _ in Float(rng.nextUnit() * 2 - 1) } }
        let (Hq, Lq, Lkv) = (8, 2, 93)
        let q = try device.tensor(values(Hq * Lq * D), shape: [1, Hq, Lq, D], dtype: dtype, name: "check_q")
        let k = try device.tensor(values(Lkv * D), shape: [1, 1, Lkv, D], dtype: dtype, name: "check_k")
        let v = try device.tensor(values(Lkv * Dv), shape: [1, 1, Lkv, Dv], dtype: dtype, name: "check_v")
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: Lkv, kvLen: Lkv, device: device,
                                         blockSize: 32, backend: .cpu())
        let run = { (matrices: Bool) in
            try AttentionPlanner.$forcedDecodeMatrices.withValue(matrices) {
                try flexAttention(q, k, v, blockMask: causal, enableGQA: true, qOffset: .uniform(Lkv - Lq), returnLSE: true,
                                  options: FlexOptions(kernel: .splitKV))
            }
        }
        let mm = try run(true), scalar = try run(false)
        let (mo, so) = (try mm.output.toArray(), try scalar.output.toArray())
        let (ml, sl) = (try mm.lse!.toArray(), try scalar.lse!.toArray())
        let (outErr, lseErr) = (largestDifference(mo, so), largestDifference(ml, sl))
        // P is rounded to fp16 (bf16) for its product with V; the scalar kernel keeps it in fp32.
        if outErr > (dtype == .bfloat16 ? 3e-2 : 1e-2) || lseErr > 1e-2 {
            return String(format: "largest difference %.3g in the output, %.3g in the LSE", outErr, lseErr)
        }
        return nil
    }

    /// What differs between coopmat-generic and the portable kernel on a small input, or nil.
    static func compare(D: Int, Dv: Int, dtype: DType, device: Device) throws -> String? {
        let (q, k, v, _, causal) = try inputs(D: D, Dv: Dv, dtype: dtype, device: device)
        for mask in [nil, causal] {
            let run = { (kernel: FlexKernel) in
                try flexAttention(q, k, v, blockMask: mask, enableGQA: true, returnLSE: true, options: FlexOptions(kernel: kernel))
            }
            let generic = try run(.coopmatGeneric), portable = try run(.portable)
            let (go, po) = (try generic.output.toArray(), try portable.output.toArray())
            let (gl, pl) = (try generic.lse!.toArray(), try portable.lse!.toArray())
            let (outErr, lseErr) = (largestDifference(go, po), largestDifference(gl, pl))
            // fp16 outputs of magnitude below 1 round at 2^-11, bf16 ones at 2^-8 (and P at 2^-9);
            // both kernels sum in fp32.
            if outErr > (dtype == .bfloat16 ? 3e-2 : 1e-2) || lseErr > 1e-2 {
                return String(format: "largest difference %.3g in the output, %.3g in the LSE (%@)", outErr, lseErr, mask == nil ? "no mask" : "causal")
            }
        }
        return nil
    }

    /// The largest |a - b| over two outputs; infinite where `a` has a NaN.
    private static func largestDifference(_ a: [Float], _ b: [Float]) -> Float {
        var err: Float = 0
        for (x, y) in zip(a, b) { err = x.isNaN ? .infinity : max(err, abs(x - y)) }
        return err
    }
}

/// A small seeded generator (SplitMix64): the check's inputs are the same on every run.
private struct CheckInputs {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    mutating func nextUnit() -> Double { Double(next() >> 11) / Double(1 << 53) }
}
