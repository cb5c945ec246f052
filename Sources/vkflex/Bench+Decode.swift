import Foundation
import VKFlex

/// `vkflex bench --suite decode`: the decode suite of ../shared/bench/SUITE.md (serving shapes, a
/// few query rows at the end of a long KV cache), contiguous and paged, with the KV bytes read, the
/// bandwidth and the host cost of a call.
extension Bench {
    struct DecodeCase: Sendable {
        var name: String
        var B: Int, Hq: Int, Hkv: Int, Lq: Int, Lkv: Int, D = 128
        /// The mask and score-mod for a cache of `Lkv` keys (the rows sit at its end: the
        /// expressions carry the offset, as the suite writes them).
        var mask: (@Sendable (Int) -> String)? = nil
        var score: (@Sendable (Int) -> String)? = nil
        var slope = false
    }

    static let decode: [DecodeCase] = [
        DecodeCase(name: "decode_dense_4k", B: 8, Hq: 32, Hkv: 8, Lq: 1, Lkv: 4096),
        DecodeCase(name: "decode_dense_32k", B: 8, Hq: 32, Hkv: 8, Lq: 1, Lkv: 32768),
        DecodeCase(name: "decode_long_128k", B: 1, Hq: 32, Hkv: 8, Lq: 1, Lkv: 131072),
        DecodeCase(name: "decode_sliding_4k_of_32k", B: 8, Hq: 32, Hkv: 8, Lq: 1, Lkv: 32768,
                   mask: { L in "(q_idx + \(L - 1) >= kv_idx) & (q_idx + \(L - 1) - kv_idx <= \(L / 8))" }),
        DecodeCase(name: "decode_alibi_32k", B: 8, Hq: 32, Hkv: 8, Lq: 1, Lkv: 32768,
                   score: { L in "score + slope[h] * (kv_idx - q_idx - \(L - 1))" }, slope: true),
        DecodeCase(name: "specdec_4_of_8k", B: 8, Hq: 32, Hkv: 8, Lq: 4, Lkv: 8192, mask: { L in "q_idx + \(L - 4) >= kv_idx" }),
        DecodeCase(name: "decode_mqa_32k", B: 8, Hq: 16, Hkv: 1, Lq: 1, Lkv: 32768),
    ]

    /// Runs the decode suite: each case contiguous, then through a paged cache (pages of 128 keys,
    /// randomly permuted), `rounds` times with new buffers each round. Returns the JSON rows.
    func runDecodeSuite(device: Device) throws -> [String] {
        var list = Bench.decode
        if let cases {
            let wanted = cases.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            for w in wanted where !Bench.decode.contains(where: { $0.name == w }) {
                throw CLIError("unknown case '\(w)' (known: \(Bench.decode.map(\.name).joined(separator: ", ")))")
            }
            list = list.filter { wanted.contains($0.name) }
        }
        let dtype = try benchDType() ?? .float16
        if small || (device.capabilities.type == .cpu && !fullSize) {
            // One KV head with its group of query heads, 1/16 of the keys.
            list = list.map { var c = $0; c.B = 1; c.Hq = c.Hq / c.Hkv; c.Hkv = 1; c.Lkv = max(512, c.Lkv / 16); return c }
            print("(small sizes: B=1, one KV head and its query heads, Lkv/16\(device.capabilities.type == .cpu ? " on a CPU device; --full-size for the suite's" : ""))")
        }
        let caps = device.capabilities
        print("vkflex bench --suite decode on \(caps.name) (\(caps.driverName) \(caps.driverInfo)), \(`repeat`) timed runs per case")
        print("case                       B  Hq/Hkv Lq    Lkv  paged  density     µs     KV GB    GB/s  rel_err  host µs")
        var rows: [String] = []
        for c in list {
            for round in 0..<rounds {
                for paged in [false, true] { rows.append(try runDecodeCase(c, dtype: dtype, paged: paged, round: rounds > 1 ? round : nil, device: device)) }
            }
        }
        return rows
    }

    func runDecodeCase(_ c: DecodeCase, dtype: DType, paged: Bool, round: Int?, device: Device) throws -> String {
        let P = 128
        let maxPages = (c.Lkv + P - 1) / P, logical = maxPages * P
        let kvRows = paged ? c.B * maxPages * P : c.B * c.Lkv   // per KV head
        let nKV = c.Hkv * kvRows * c.D, nQ = c.B * c.Hq * c.Lq * c.D
        _ = try Bench.checkSize(BenchCase(name: c.name, B: 1, H: c.Hkv, S: kvRows, D: c.D, dtype: dtype), device: device)
        var rng = FastRandom(seed: UInt64(c.Lkv * 7 + c.Hq))
        let qv = rng.normals(nQ), kv = rng.normals(nKV), vv = rng.normals(nKV)
        let q = try device.tensor(qv, shape: [c.B, c.Hq, c.Lq, c.D], dtype: dtype, name: "q")
        // Contiguous [B, Hkv, Lkv, D], or physical pages [1, Hkv, B·maxPages·128, D] (the pages of
        // batch b are a random permutation's; every batch holds Lkv keys).
        let k: Tensor, v: Tensor
        var pageTable: PageTable?
        var table: [Int32] = []
        if paged {
            k = try device.tensor(kv, shape: [1, c.Hkv, kvRows, c.D], dtype: dtype, name: "k_pages")
            v = try device.tensor(vv, shape: [1, c.Hkv, kvRows, c.D], dtype: dtype, name: "v_pages")
            var order = Array(0..<(c.B * maxPages))
            for i in stride(from: order.count - 1, to: 0, by: -1) { order.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
            table = order.map(Int32.init)
            pageTable = PageTable(table: try device.tensor(table, shape: [c.B, maxPages], name: "page_table"),
                                  lengths: try device.tensor([Int](repeating: c.Lkv, count: c.B), shape: [c.B], name: "seq_lens"), pageSize: P)
        } else {
            k = try device.tensor(kv, shape: [c.B, c.Hkv, c.Lkv, c.D], dtype: dtype, name: "k")
            v = try device.tensor(vv, shape: [c.B, c.Hkv, c.Lkv, c.D], dtype: dtype, name: "v")
        }
        let keys = paged ? logical : c.Lkv
        var capsByName: [String: Tensor] = [:]
        if c.slope {
            capsByName["slope"] = try device.tensor((0..<c.Hq).map { Float(exp2(-Double($0 + 1) * 8 / Double(c.Hq))) }, shape: [c.Hq], name: "slope")
        }
        let score = try c.score.map { try ScoreMod(parsing: $0(c.Lkv), captures: capsByName) }
        let maskMod = try c.mask.map { try MaskMod(parsing: $0(c.Lkv), captures: capsByName) }
        let blockMask = try maskMod.map { try createBlockMask($0, B: 1, H: 1, qLen: c.Lq, kvLen: keys, device: device, blockSize: 128) }
        // KV blocks read: the mask's kept blocks over the cache's own keys.
        let density = try blockMask.map { try $0.blockDensity() * Double(keys) / Double(c.Lkv) } ?? 1
        let out = try device.empty(shape: [c.B, c.Hq, c.Lq, c.D], dtype: dtype, name: "out")
        func call() throws -> FlexResult {
            try flexAttention(q, k, v, scoreMod: score, blockMask: blockMask, enableGQA: c.Hq != c.Hkv, pageTable: pageTable, out: out)
        }
        var kernel = try call().kernel
        try device.synchronize()
        try Bench.warmUp(device: device, seconds: 0.3) { kernel = try call().kernel }
        let (seconds, hostUs, groups) = try Bench.timeSteady(`repeat`, device: device) { _ = try call() }
        let profile = try Bench.profileLine(`repeat`, device: device) { _ = try call() }
        try out.checkErrors()
        let us = median(seconds) * 1e6
        let kvGB = density * Double(c.B * c.Hkv * c.Lkv * c.D) * 2 * 2 / 1e9
        let gbps = kvGB / (us * 1e-6)
        // Check batch 0, head 0 (KV head 0) against float64, its keys gathered through the table.
        var relErr: Double?
        if !noCheck {
            func host(_ a: ArraySlice<Float>) -> [Float] {
                switch dtype {
                case .float16: return a.map { Float(Float16($0)) }
                case .bfloat16: return a.map(\.roundedToBFloat16)
                default: return Array(a)
                }
            }
            var headK: [Float] = [], headV: [Float] = []
            for j in 0..<c.Lkv {
                let row = paged ? Int(table[j / P]) * P + j % P : j
                headK += host(kv[(row * c.D)..<((row + 1) * c.D)]); headV += host(vv[(row * c.D)..<((row + 1) * c.D)])
            }
            let refMask = try maskMod.map { try createBlockMask($0, B: 1, H: 1, qLen: c.Lq, kvLen: c.Lkv, device: device, blockSize: 128) }
            let ref = try attentionReferenceRows(q: host(qv[0..<(c.Lq * c.D)]), rows: Array(0..<c.Lq), k: headK, v: headV, Lkv: c.Lkv, D: c.D, Dv: c.D,
                                                 scoreMod: score, blockMask: refMask)
            relErr = relativeL2Error(Array(try out.toArray()[0..<(c.Lq * c.D)]), ref)
        }
        print("\(pad(c.name, 25)) \(String(format: "%2d %3d/%-3d %2d %6d  ", c.B, c.Hq, c.Hkv, c.Lq, c.Lkv))\(pad(paged ? "yes" : "no", 5))\(String(format: " %7.4f %7.1f %8.4f %7.2f", density, us, kvGB, gbps)) \(relErr.map { String(format: "%.1e", $0) } ?? "-")  \(String(format: "%7.1f", median(hostUs)))")
        if let profile { print(profile) }
        var obj: [String: Any] = ["case": c.name, "B": c.B, "H": c.Hq, "Hkv": c.Hkv, "Lq": c.Lq, "S": c.Lkv, "D": c.D, "dtype": dtype.rawValue,
                                  "density": (density * 1e4).rounded() / 1e4, "fw_ms": (us).rounded() / 1e3, "kv_gb": (kvGB * 1e4).rounded() / 1e4,
                                  "gbps": gbps.rounded(), "paged": paged, "device": device.capabilities.name, "kernel": kernel.rawValue,
                                  "host_us": (median(hostUs) * 10).rounded() / 10,
                                  // The spread of the timed runs (a median can hide a bimodal run).
                                  "fw_ms_min": ((seconds.min() ?? 0) * 1e6).rounded() / 1e3, "fw_ms_max": ((seconds.max() ?? 0) * 1e6).rounded() / 1e3]
        if let relErr { obj["rel_err"] = relErr }
        if let round { obj["round"] = round }
        obj["groups"] = groups
        let data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }
}
