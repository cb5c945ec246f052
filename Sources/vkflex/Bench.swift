import ArgumentParser
import Foundation
import VKFlex

/// `vkflex bench`: the seed suite of ../shared/bench/SUITE.md (names, shapes, FLOP convention and
/// JSON fields are a contract with the PyTorch side), or a custom case.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Time flex attention (device timestamps, median after warm-up).",
        discussion: """
        Examples:
          vkflex bench --suite seed --json results.jsonl
          vkflex bench --suite seed --cases causal,alibi_causal --repeat 20
          vkflex bench --suite decode --json decode.jsonl        # contiguous and paged rows, GB/s
          vkflex bench --b 2 --h 8 --s 4096 --d 64 --mask-mod "q_idx >= kv_idx" --score-mod "score * 0.5"
        On a CPU device (lavapipe) the suite runs at small sizes unless --full-size is given.
        """)

    @Option(name: .long, help: "Run a named suite: seed (prefill) or decode (few rows against a long KV cache, contiguous and paged).") var suite: String?
    @Option(name: .long, help: "Comma-separated case names of the suite.") var cases: String?
    @Option(name: .long, help: "Append one JSON object per case to this file.") var json: String?
    @Option(name: .long, help: "Timed runs per case (after warm-up).") var `repeat`: Int = 10
    @Option(name: .long, help: "Decode suite: run each case this many times, each round with new buffers (the spread across allocations).") var rounds: Int = 1
    @Flag(name: .long, help: "Use the suite's full sizes even on a CPU device.") var fullSize = false
    @Flag(name: .long, help: "Use small sizes (B=1, H=2, S=512) whatever the device.") var small = false
    @Option(name: .customLong("b"), help: "Custom case: batch.") var batch: Int = 1
    @Option(name: .customLong("h"), help: "Custom case: heads.") var heads: Int = 8
    @Option(name: .customLong("s"), help: "Custom case: sequence length.") var seq: Int = 2048
    @Option(name: .customLong("d"), help: "Custom case: head dim.") var dim: Int = 64
    @Option(name: .long, help: "float16 (default), bfloat16 or float32, for the suite's cases and a custom one.") var dtype: String?
    @Option(name: .long, help: "Custom case: mask_mod expression.") var maskMod: String?
    @Option(name: .long, help: "Custom case: score_mod expression.") var scoreMod: String?
    @OptionGroup var captures: CaptureOptions
    @Option(name: .long, help: "Block size for the masks (default 128).") var blockSize: String?
    @Flag(name: .long, help: "Skip the float64 check of a slice of the output.") var noCheck = false
    @Flag(name: .long, help: "Also time the backward pass (bw_ms: every backward dispatch, no forward; bw_tflops at 2.5x the forward FLOPs).")
    var backward = false
    @Flag(name: .long, help: "Time forward calls that also return the LSE, as a training forward does.")
    var returnLSE = false
    @OptionGroup var deviceOptions: DeviceOptions

    struct BenchCase {
        var name: String
        var B: Int, H: Int, S: Int, D: Int
        var dtype: DType = .float16
        var mask: String?
        var score: String?
        var doc = false
        var slope = false
    }

    static let seed: [BenchCase] = [
        BenchCase(name: "full", B: 16, H: 16, S: 8192, D: 64),
        BenchCase(name: "full", B: 8, H: 16, S: 8192, D: 128),
        BenchCase(name: "causal", B: 16, H: 16, S: 8192, D: 64, mask: "q_idx >= kv_idx"),
        BenchCase(name: "causal", B: 8, H: 16, S: 8192, D: 128, mask: "q_idx >= kv_idx"),
        BenchCase(name: "sliding_window_1024", B: 16, H: 16, S: 8192, D: 64, mask: "(q_idx >= kv_idx) & (q_idx - kv_idx <= 1024)"),
        BenchCase(name: "prefix_lm_2048", B: 16, H: 16, S: 8192, D: 64, mask: "(kv_idx <= 2048) | (q_idx >= kv_idx)"),
        BenchCase(name: "document_causal", B: 16, H: 16, S: 8192, D: 64, mask: "(doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)", doc: true),
        BenchCase(name: "alibi_causal", B: 16, H: 16, S: 8192, D: 64, mask: "q_idx >= kv_idx", score: "score + slope[h] * (kv_idx - q_idx)", slope: true),
        BenchCase(name: "softcap20_causal", B: 16, H: 16, S: 8192, D: 64, mask: "q_idx >= kv_idx", score: "20 * tanh(score / 20)"),
    ]

    func run() throws {
        try reportingErrors {
            guard `repeat` >= 1 else { throw CLIError("--repeat must be at least 1") }
            guard rounds >= 1 else { throw CLIError("--rounds must be at least 1") }
            if rounds > 1 && suite != "decode" { throw CLIError("--rounds applies to --suite decode only") }
            let device = try deviceOptions.open()
            let bs = try parseBlockSize(blockSize)
            var list: [BenchCase]
            var custom = false
            if suite == "decode" {
                if backward { throw CLIError("--backward: the decode suite has no backward") }
                for row in try runDecodeSuite(device: device) { try append(row) }
                return
            }
            if let suite {
                guard suite == "seed" else { throw CLIError("unknown suite '\(suite)' (known: seed, decode)") }
                list = Bench.seed
                if let cases {
                    let wanted = cases.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
                    for w in wanted where !Bench.seed.contains(where: { $0.name == w }) {
                        throw CLIError("unknown case '\(w)' (known: \(Set(Bench.seed.map(\.name)).sorted().joined(separator: ", ")))")
                    }
                    list = list.filter { wanted.contains($0.name) }
                }
                if let dt = try benchDType() { list = list.map { var c = $0; c.dtype = dt; return c } }
                if small || (device.capabilities.type == .cpu && !fullSize) {
                    list = list.map { var c = $0; c.B = 1; c.H = 2; c.S = 512; return c }
                    print("(small sizes: B=1, H=2, S=512\(device.capabilities.type == .cpu ? " on a CPU device; --full-size for the suite's" : ""))")
                }
            } else {
                let dt = try benchDType() ?? .float16
                guard batch > 0, heads > 0, seq > 0, (1...256).contains(dim) else { throw CLIError("--b, --h, --s must be positive and --d in 1...256") }
                list = [BenchCase(name: "custom", B: batch, H: heads, S: seq, D: dim, dtype: dt, mask: maskMod, score: scoreMod)]
                custom = true
            }
            for c in list { _ = try Bench.checkSize(c, device: device) }
            let caps = device.capabilities
            print("vkflex bench on \(caps.name) (\(caps.driverName) \(caps.driverInfo)), \(`repeat`) timed runs per case")
            print("case                  B   H      S    D  density   fw ms  fw TFLOP/s  mask ms  rel_err  kernel          host µs")
            var rows: [String] = []
            for c in list {
                let row = try runCase(c, device: device, blockSize: bs, custom: custom)
                rows.append(row)
                try append(row)
            }
        }
    }

    /// Appends a JSON row to `--json`, if given.
    func append(_ row: String) throws {
        guard let json else { return }
        let url = URL(fileURLWithPath: json)
        if !FileManager.default.fileExists(atPath: json) { _ = FileManager.default.createFile(atPath: json, contents: nil) }
        let handle = try FileHandle(forWritingTo: url)
        handle.seekToEndOfFile()
        handle.write(Data((row + "\n").utf8))
        try handle.close()
    }

    /// Refuses a case whose tensors cannot be held, before anything is allocated: the host keeps
    /// three float32 arrays of the inputs, the device four tensors (q, k, v, out).
    static func checkSize(_ c: BenchCase, device: Device) throws -> Int {
        let (n1, o1) = c.B.multipliedReportingOverflow(by: c.H)
        let (n2, o2) = n1.multipliedReportingOverflow(by: c.S)
        let (n, o3) = n2.multipliedReportingOverflow(by: c.D)
        let caps = device.capabilities
        let flags = "--b \(c.B) --h \(c.H) --s \(c.S) --d \(c.D)"
        guard !(o1 || o2 || o3), n < 1 << 40 else { throw CLIError("\(flags): B·H·S·D does not fit in 64 bits; choose smaller sizes") }
        let hostBytes = 3 * n * 4, tensorBytes = n * c.dtype.size
        let hostLimit = Int(ProcessInfo.processInfo.physicalMemory) * 3 / 4
        if hostBytes > hostLimit {
            throw CLIError("\(flags): the inputs need \(formatBytes(hostBytes)) of host memory; this machine has \(formatBytes(Int(ProcessInfo.processInfo.physicalMemory))) (choose smaller sizes)")
        }
        if tensorBytes > caps.maxMemoryAllocation {
            throw CLIError("\(flags): each of q, k, v and the output is \(formatBytes(tensorBytes)) (\(c.dtype.rawValue)); \(caps.name) allocates at most \(formatBytes(caps.maxMemoryAllocation)) at once (choose smaller sizes)")
        }
        if caps.deviceLocalMemory > 0 && 4 * tensorBytes > caps.deviceLocalMemory {
            throw CLIError("\(flags): q, k, v and the output need \(formatBytes(4 * tensorBytes)); \(caps.name) has \(formatBytes(caps.deviceLocalMemory)) (choose smaller sizes)")
        }
        return n
    }

    /// `--dtype`, checked.
    func benchDType() throws -> DType? {
        guard let dtype else { return nil }
        guard let d = DType(rawValue: dtype), d.isFloat else { throw CLIError("--dtype \(dtype): use float16, bfloat16 or float32") }
        return d
    }

    func runCase(_ c: BenchCase, device: Device, blockSize: BlockSize, custom: Bool) throws -> String {
        let n = try Bench.checkSize(c, device: device)
        var rng = FastRandom(seed: UInt64(c.S * 31 + c.D))
        let qv = rng.normals(n), kv = rng.normals(n), vv = rng.normals(n)
        let q = try device.tensor(qv, shape: [c.B, c.H, c.S, c.D], dtype: c.dtype, name: "q")
        let k = try device.tensor(kv, shape: [c.B, c.H, c.S, c.D], dtype: c.dtype, name: "k")
        let v = try device.tensor(vv, shape: [c.B, c.H, c.S, c.D], dtype: c.dtype, name: "v")
        var caps = try captures.load(on: device)
        if c.doc {
            let splits = [c.S / 8, c.S / 4, c.S / 2]
            caps["doc"] = try device.tensor((0..<c.S).map { i in Int32(splits.filter { i >= $0 }.count) }, shape: [c.S], name: "doc")
        }
        if c.slope {
            caps["slope"] = try device.tensor((0..<c.H).map { Float(exp2(-Double($0 + 1) * 8 / Double(c.H))) }, shape: [c.H], name: "slope")
        }
        let score = try c.score.map { try ScoreMod(parsing: $0, captures: caps) }
        let maskMod = try c.mask.map { try MaskMod(parsing: $0, captures: caps) }

        // Mask build time: median of wall-clock builds after a warm-up build (pipelines compiled).
        var blockMask: BlockMask?
        var maskMs: Double?
        var maskGPUMs: Double?
        if let maskMod {
            let B = maskMod.graph.uses(.b) ? c.B : 1, H = maskMod.graph.uses(.h) ? c.H : 1
            blockMask = try createBlockMask(maskMod, B: B, H: H, qLen: c.S, kvLen: c.S, device: device, blockSize: blockSize)
            try device.synchronize()
            var times: [Double] = []
            for _ in 0..<7 {
                // Wall clock from the call to the mask being ready on the device.
                let t0 = DispatchTime.now().uptimeNanoseconds
                blockMask = try createBlockMask(maskMod, B: B, H: H, qLen: c.S, kvLen: c.S, device: device, blockSize: blockSize)
                try device.synchronize()
                times.append(Double(DispatchTime.now().uptimeNanoseconds - t0) * 1e-6)
            }
            try blockMask!.kvNumBlocks.checkErrors()
            maskMs = median(times)
            // The same build measured on the device alone (no submission or host overhead).
            var gpuTimes: [Double] = []
            for _ in 0..<5 {
                let a = try device.record { try $0.timestamp() }
                blockMask = try createBlockMask(maskMod, B: B, H: H, qLen: c.S, kvLen: c.S, device: device, blockSize: blockSize)
                let b = try device.record { try $0.timestamp() }
                gpuTimes.append(try device.seconds(from: a, to: b) * 1e3)
            }
            maskGPUMs = median(gpuTimes)
        }
        // Density over 128x128 blocks, as the suite's FLOP convention defines it.
        let density: Double
        if let maskMod {
            let m128 = blockSize == 128 ? blockMask! : try createBlockMask(maskMod, B: 1, H: 1, qLen: c.S, kvLen: c.S, device: device)
            density = try m128.blockDensity()
        } else {
            density = 1
        }

        let out = try device.empty(shape: [c.B, c.H, c.S, c.D], dtype: c.dtype, name: "out")
        // First call: shader compile + pipeline creation (+ the run), wall clock.
        try device.synchronize()
        let compileBefore = ShaderCompiler.shared.compilations
        let forward = { try flexAttention(q, k, v, scoreMod: score, blockMask: blockMask, returnLSE: returnLSE, out: out) }
        let t0 = DispatchTime.now().uptimeNanoseconds
        var kernel = try forward().kernel
        try device.synchronize()
        let firstCallMs = Double(DispatchTime.now().uptimeNanoseconds - t0) * 1e-6
        let compiled = ShaderCompiler.shared.compilations > compileBefore
        let firstPipeline = compiled ? device.lastBuiltPipeline : nil
        try Bench.warmUp(device: device) { kernel = try forward().kernel }
        let (seconds, hostUs, _) = try Bench.timeSteady(`repeat`, device: device) { _ = try forward() }
        let profile = try Bench.profileLine(`repeat`, device: device) { _ = try forward() }
        // A kernel that reported an error (and so did no work) must not pass for a fast one.
        try out.checkErrors()
        let ms = median(seconds) * 1e3
        let flops = density * Double(c.B * c.H * c.D) * Double(c.S) * Double(c.S)
        let tflops = 4 * flops / (ms * 1e-3) / 1e12

        // Backward: every dispatch of the backward (no forward), device timestamps, median after a
        // warm-up (Bench.warmUp); dO random, the LSE from one forward call.
        var bwMs: Double?, bwHostUs: Double?, bwKernel: FlexKernel?, bwProfile: String?
        if backward {
            let fwd = try flexAttention(q, k, v, scoreMod: score, blockMask: blockMask, returnLSE: true)
            let dO = try device.tensor(rng.normals(n), shape: [c.B, c.H, c.S, c.D], dtype: c.dtype, name: "grad_out")
            // dO's host-side generation above idles the GPU (most likely what let its clocks drop):
            // after two warm-up calls, sliding window's backward (14 ms of passes) was timed at
            // 1.3-4.3x its passes' device time on an H100 (2026-12-07); the warm-up cured it.
            try Bench.warmUp(device: device) {
                _ = try flexAttentionBackward(q, k, v, output: fwd.output, lse: fwd.lse!, gradOutput: dO, scoreMod: score, blockMask: blockMask)
            }
            var times: [(GPUTimestamp, GPUTimestamp)] = []
            var hostTimes: [Double] = []
            var last: FlexGradients?
            for _ in 0..<max(5, `repeat` / 2) {
                let a = try device.record { try $0.timestamp() }
                // The host's share (the call up to its submission): where it passes the device's
                // time, the device waits and bw_ms counts the wait.
                let h0 = DispatchTime.now().uptimeNanoseconds
                last = try flexAttentionBackward(q, k, v, output: fwd.output, lse: fwd.lse!, gradOutput: dO, scoreMod: score, blockMask: blockMask)
                hostTimes.append(Double(DispatchTime.now().uptimeNanoseconds - h0) * 1e-3)
                let b = try device.record { try $0.timestamp() }
                times.append((a, b))
            }
            bwHostUs = median(hostTimes)
            try device.synchronize()
            try last?.dq.checkErrors()
            bwKernel = last?.kernel
            bwMs = median(try times.map { try device.seconds(from: $0.0, to: $0.1) * 1e3 })
            bwProfile = try Bench.profileLine(3, device: device) {
                _ = try flexAttentionBackward(q, k, v, output: fwd.output, lse: fwd.lse!, gradOutput: dO, scoreMod: score, blockMask: blockMask)
            }
        }
        var relErr: Double?
        if !noCheck {
            relErr = try checkSlice(c, qv: qv, kv: kv, vv: vv, out: out, score: score, mask: blockMask)
        }
        let printedMask = maskMs.map { String(format: "%8.2f", $0) } ?? "       -"
        let printedErr = relErr.map { String(format: "%.1e", $0) } ?? "-"
        print("\(pad(c.name, 20)) \(String(format: "%2d %3d %6d %4d  %7.4f %7.2f %11.1f", c.B, c.H, c.S, c.D, density, ms, tflops)) \(printedMask)  \(printedErr)  \(pad(kernel.rawValue, 15)) \(String(format: "%7.1f", median(hostUs)))")
        if let profile { print(profile) }
        var obj: [String: Any] = ["case": c.name, "B": c.B, "H": c.H, "S": c.S, "D": c.D, "dtype": c.dtype.rawValue,
                                  "density": (density * 1e4).rounded() / 1e4, "fw_ms": (ms * 1e3).rounded() / 1e3,
                                  "fw_tflops": (tflops * 10).rounded() / 10, "device": device.capabilities.name, "kernel": kernel.rawValue,
                                  "host_us": (median(hostUs) * 10).rounded() / 10]
        if returnLSE { obj["return_lse"] = true }
        if let maskMs { obj["mask_ms"] = (maskMs * 1e3).rounded() / 1e3 }
        if let maskGPUMs { obj["mask_gpu_ms"] = (maskGPUMs * 1e3).rounded() / 1e3 }
        if let bwMs {
            let bwTflops: Double = 10 * flops / (bwMs * 1e-3) / 1e12
            obj["bw_ms"] = (bwMs * 1e3).rounded() / 1e3
            obj["bw_tflops"] = (bwTflops * 10).rounded() / 10
            obj["bw_kernel"] = bwKernel?.rawValue
            if let bwHostUs { obj["bw_host_us"] = (bwHostUs * 10).rounded() / 10 }
            print("\(pad(c.name, 20)) backward " + String(format: "%.2f ms, %.2f TFLOP/s", bwMs, bwTflops) + " (\(bwKernel?.rawValue ?? "?")), host "
                  + String(format: "%.1f µs", bwHostUs ?? .nan))
            if let bwProfile { print(bwProfile) }
        }
        if compiled {
            obj["first_call_ms"] = (firstCallMs * 100).rounded() / 100
            if let p = firstPipeline {
                obj["compile_ms"] = (p.compileSeconds * 1e5).rounded() / 100
                obj["pipeline_ms"] = (p.createSeconds * 1e5).rounded() / 100
            }
        }
        if let relErr { obj["rel_err"] = relErr }
        if custom {
            if let s = c.score { obj["score_mod"] = s }
            if let m = c.mask { obj["mask_mod"] = m }
        }
        let data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    /// Relative L2 error of 64 query rows of batch 0, head 0 against a float64 reference.
    func checkSlice(_ c: BenchCase, qv: [Float], kv: [Float], vv: [Float], out: Tensor, score: ScoreMod?, mask: BlockMask?) throws -> Double {
        let rows = Array(Set((0..<64).map { $0 * c.S / 64 + ($0 * 37) % max(1, c.S / 64) })).sorted().filter { $0 < c.S }
        func host(_ a: [Float]) -> [Float] {
            switch c.dtype {
            case .float16: return a.map { Float(Float16($0)) }
            case .bfloat16: return a.map(\.roundedToBFloat16)
            default: return a
            }
        }
        let headQ = host(Array(qv[0..<(c.S * c.D)])), headK = host(Array(kv[0..<(c.S * c.D)])), headV = host(Array(vv[0..<(c.S * c.D)]))
        let q = rows.flatMap { headQ[($0 * c.D)..<(($0 + 1) * c.D)] }
        let all = try out.toArray()
        var got: [Float] = []
        for r in rows { got += all[(r * c.D)..<((r + 1) * c.D)] }
        let ref = try attentionReferenceRows(q: q, rows: rows, k: headK, v: headV, Lkv: c.S, D: c.D, Dv: c.D,
                                             scoreMod: score, blockMask: mask)
        return relativeL2Error(got, ref)
    }
}

extension Bench {
    /// Runs `call` `n` times between device timestamps: each call's device seconds, and what it
    /// cost the calling thread in µs (checks, plan, pipeline lookup, recording; no waiting).
    static func time(_ n: Int, device: Device, _ call: () throws -> Void) throws -> (seconds: [Double], hostUs: [Double]) {
        var stamps: [(GPUTimestamp, GPUTimestamp)] = []
        var hostUs: [Double] = []
        for _ in 0..<n {
            let start = try device.record { try $0.timestamp() }
            let h0 = DispatchTime.now().uptimeNanoseconds
            try call()
            hostUs.append(Double(DispatchTime.now().uptimeNanoseconds - h0) * 1e-3)
            stamps.append((start, try device.record { try $0.timestamp() }))
        }
        try device.synchronize()
        return (try stamps.map { try device.seconds(from: $0.0, to: $0.1) }, hostUs)
    }
}

extension Bench {
    /// Warm-up before a timing: at least 3 calls and `seconds` (500 ms for attention, 300 for
    /// decode), so that the GPU's clocks are up after the idle time of a pipeline compile or of
    /// host work (short cases timed right after one ran up to 3x slow). Calls go back to back, 8
    /// per wait, like the timed runs (and triton's do_bench): with a wait after each call a 4 ms
    /// case keeps the GPU partly idle. Twice on 2026-11-22 (H200) the sliding-window forward was
    /// timed at 2.8x its time with a 300 ms warm-up that waited after each call, both times right
    /// after its pipeline was compiled cold.
    static func warmUp(device: Device, seconds: Double = 0.5, _ call: () throws -> Void) throws {
        let start = DispatchTime.now().uptimeNanoseconds
        var calls = 0
        while calls < 3 || Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9 < seconds {
            for _ in 0..<8 {
                try call()
                calls += 1
            }
            try device.synchronize()
        }
    }

    /// Timed groups of `n` calls (``time(_:device:_:)``) after a warm-up: on a GPU, groups for at
    /// least `minSeconds` and then until two in a row agree within 3% (at most `maxSeconds`), and
    /// the group with the lowest median; on a CPU device one group. An H100's SM clock idles at
    /// 345 MHz and came up only after a varying part of a second of load (nvidia-smi, 2026-12-06):
    /// groups timed before it did ran up to 3x slow yet agreed with each other, and a group right
    /// after ran at full speed. The fastest group is the steady state; groups that reached it
    /// agree within 1-3%.
    static func timeSteady(_ n: Int, device: Device, minSeconds: Double = 1, maxSeconds: Double = 4,
                           _ call: () throws -> Void) throws -> (seconds: [Double], hostUs: [Double], groups: Int) {
        let start = DispatchTime.now().uptimeNanoseconds
        func elapsed() -> Double { Double(DispatchTime.now().uptimeNanoseconds - start) * 1e-9 }
        var best = try time(n, device: device, call)
        guard device.capabilities.type != .cpu else { return (best.seconds, best.hostUs, 1) }
        var last = median(best.seconds), groups = 1
        while elapsed() < maxSeconds {
            let next = try time(n, device: device, call)
            groups += 1
            let m = median(next.seconds)
            if m < median(best.seconds) { best = next }
            if elapsed() >= minSeconds && abs(m - last) <= 0.03 * m { break }
            last = m
        }
        return (best.seconds, best.hostUs, groups)
    }

    /// `VKFLEX_PROFILE=1`: `n` more calls, each dispatch timed on the device, as a line of the
    /// device time per call by shader (nil without `VKFLEX_PROFILE=1`).
    /// With `VKFLEX_RESIDENCY`, one more call and a line per probed pipeline: how its workgroups
    /// sat on the compute units.
    static func profileLine(_ n: Int, device: Device, _ call: () throws -> Void) throws -> String? {
        var lines: [String] = []
        if device.profilesDispatches {
            try device.synchronize()
            _ = try device.takeDispatchProfile()
            for _ in 0..<n { try call() }
            try device.synchronize()
            let parts = try device.takeDispatchProfile().map {
                "\($0.shader) \(String(format: "%.1f", $0.seconds / Double(n) * 1e6)) us (\($0.dispatches / n)x)"
            }
            lines.append("  device time per call: " + parts.joined(separator: ", "))
        }
        if device.probesResidency {
            _ = try device.takeResidency()
            try call()
            let reports = try device.takeResidency()
            lines += reports.isEmpty ? ["  residency: no pipeline of this call is one VKFLEX_RESIDENCY names (\(device.environment["VKFLEX_RESIDENCY"] ?? ""))"]
                : reports.map { "  residency " + $0.summary }
        }
        return lines.isEmpty ? nil : lines.joined(separator: "\n")
    }
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    return s.isEmpty ? .nan : s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// xorshift64* and Box-Muller: fast normal samples for large benchmark inputs.
struct FastRandom {
    var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }
    mutating func next() -> UInt64 {
        state ^= state >> 12; state ^= state << 25; state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }
    mutating func uniform() -> Float { Float(next() >> 40) * (1.0 / Float(1 << 24)) }
    mutating func normals(_ n: Int) -> [Float] {
        var out = [Float](repeating: 0, count: n)
        var i = 0
        while i < n {
            let u1 = max(uniform(), 1e-7), u2 = uniform()
            let r = (-2 * Foundation.log(u1)).squareRoot()
            out[i] = r * Foundation.cos(2 * .pi * u2)
            if i + 1 < n { out[i + 1] = r * Foundation.sin(2 * .pi * u2) }
            i += 2
        }
        return out
    }
}
