import ArgumentParser
import Foundation
import VKFlex

/// `NAME=FILE.npy` captures shared by attend, mask and bench.
struct CaptureOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("A tensor the mods index, as NAME=FILE.npy (float32, float16 or int32, rank 1-4).", valueName: "NAME=FILE.npy"))
    var capture: [String] = []

    func load(on device: Device) throws -> [String: Tensor] {
        var out: [String: Tensor] = [:]
        for item in capture {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                throw CLIError("--capture \(item): write NAME=FILE.npy")
            }
            let name = parts[0]
            guard name.first!.isLetter || name.first == "_", name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }) else {
                throw CLIError("--capture \(item): '\(name)' is not a valid name")
            }
            guard out[name] == nil else { throw CLIError("--capture: \(name) is given twice") }
            let array = try NPYArray(contentsOf: URL(fileURLWithPath: parts[1]))
            guard (1...4).contains(array.shape.count) else {
                throw CLIError("--capture \(name): \(parts[1]) has rank \(array.shape.count); captures have rank 1 to 4")
            }
            guard array.shape.reduce(1, *) > 0 else { throw CLIError("--capture \(name): \(parts[1]) is empty") }
            out[name] = try device.tensor(array, name: name)
        }
        return out
    }
}

func parseBlockSize(_ text: String?) throws -> BlockSize {
    guard let text else { return 128 }
    return try BlockSize(parsing: text)
}

struct Attend: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run flex attention on .npy inputs.",
        discussion: """
        Inputs are (B, H, L, D) float32 or float16 .npy files; outputs are float32 .npy: the output \
        (B, Hq, Lq, Dv) and the log-sum-exp (B, Hq, Lq), natural log, -inf on fully masked rows.
        Example:
          vkflex attend --q q.npy --k k.npy --v v.npy --mask-mod "q_idx >= kv_idx" \\
                        --score-mod "20 * tanh(score / 20)" --out out.npy --lse lse.npy
        """)

    @Option(name: .long, help: "Query .npy, shape (B, Hq, Lq, D).") var q: String
    @Option(name: .long, help: "Key .npy, shape (B, Hkv, Lkv, D).") var k: String
    @Option(name: .long, help: "Value .npy, shape (B, Hkv, Lkv, Dv).") var v: String
    @Option(name: .long, help: "score_mod expression, e.g. \"score + slope[h] * (kv_idx - q_idx)\".") var scoreMod: String?
    @Option(name: .long, help: "mask_mod expression, e.g. \"q_idx >= kv_idx\".") var maskMod: String?
    @OptionGroup var captures: CaptureOptions
    @Option(name: .long, help: "Softmax scale (default 1/sqrt(D)).") var scale: Double?
    @Option(name: .long, help: "Compute in this dtype: float32, float16 or bfloat16 (default: the files'). The inputs are rounded to it on upload; .npy has no bfloat16, so bfloat16 outputs are written as float32 holding bfloat16 values.")
    var dtype: String?
    @Flag(name: .long, help: "Allow fewer key/value heads than query heads (grouped-query attention).") var gqa = false
    @Option(name: .long, help: "Per-batch key lengths: an int32 .npy of shape (B,); keys at or past a batch's length do not exist.")
    var kvLens: String?
    @Option(name: .long, help: ArgumentHelp("Query offsets (decoding): N, or an int32 .npy of shape (B,). Query row i of batch b is position i + offset[b]: the mods see it as q_idx, and the --mask-mod's BlockMask is built for positions up to the last one.", valueName: "N|FILE.npy"))
    var qOffset: String?
    @Option(name: .long, help: "Paged K/V: an int32 .npy (B, maxPages) mapping each batch's logical pages to physical pages of --k/--v, which are then physical caches (1, Hkv, pages * page size, D); -1 pads pages past a batch's length. Needs --seq-lens and --page-size.")
    var pageTable: String?
    @Option(name: .long, help: "Paged K/V: each batch's number of keys, an int32 .npy of shape (B,).") var seqLens: String?
    @Option(name: .long, help: "Paged K/V: keys per page.") var pageSize: Int?
    @Option(name: .long, help: "Attention sinks: a float32 .npy of shape (Hq,), one logit per query head that joins every softmax denominator.")
    var sinks: String?
    @Option(name: .long, help: "Backward: dLoss/dOutput, an .npy of the output's shape (B, Hq, Lq, Dv) in q's dtype; writes --dq/--dk/--dv.")
    var gradOut: String?
    @Option(name: .long, help: "Backward: dLoss/dLSE, a float32 .npy of shape (B, Hq, Lq).") var gradLse: String?
    @Option(name: .long, help: "Backward: write dLoss/dq here (float32 .npy, q's shape).") var dq: String?
    @Option(name: .long, help: "Backward: write dLoss/dk here (float32 .npy, k's shape).") var dk: String?
    @Option(name: .long, help: "Backward: write dLoss/dv here (float32 .npy, v's shape).") var dv: String?
    @Option(name: .long, help: "Backward: write dLoss/dsinks here (float32 .npy, shape (Hq,); with --sinks).") var gradSinks: String?
    @Option(name: .long, help: ArgumentHelp("Backward: write the gradient of a float capture the score-mod reads (a learnable bias) here, as NAME=FILE.npy (float32, the capture's shape). Repeat for several.", valueName: "NAME=FILE.npy"))
    var gradCapture: [String] = []
    @Option(name: .long, help: "BlockMask block size: N or QxKV (default 128).") var blockSize: String?
    @Option(name: .long, help: "Write the output here (float32 .npy).") var out: String?
    @Option(name: .long, help: "Write the log-sum-exp here (float32 .npy).") var lse: String?
    @Option(name: .long, help: "Write each row's maximum score here (after scale, score-mod and mask; float32 .npy, -inf on rows with no key).")
    var maxScores: String?
    @OptionGroup var deviceOptions: DeviceOptions

    func run() throws {
        try reportingErrors {
            let bs = try parseBlockSize(blockSize)
            if let scale, !scale.isFinite { throw CLIError("--scale must be a finite number") }
            if gradOut == nil, dq != nil || dk != nil || dv != nil || gradLse != nil || gradSinks != nil || !gradCapture.isEmpty {
                throw CLIError("--dq, --dk, --dv, --grad-lse, --grad-sinks and --grad-capture need --grad-out (dLoss/dOutput)")
            }
            if gradSinks != nil && sinks == nil { throw CLIError("--grad-sinks needs --sinks") }
            let arrays = try [("--q", q), ("--k", k), ("--v", v)].map { flag, path -> NPYArray in
                let a = try NPYArray(contentsOf: URL(fileURLWithPath: path))
                guard a.shape.count == 4 else { throw CLIError("\(flag) \(path) has shape \(a.shape); expected (B, H, L, D)") }
                guard a.dtype != .int32 else { throw CLIError("\(flag) \(path) is int32; attention inputs are float32 or float16 (or --dtype bfloat16 from float32 files)") }
                return a
            }
            let device = try deviceOptions.open()
            let caps = try captures.load(on: device)
            let score = try scoreMod.map { try ScoreMod(parsing: $0, captures: caps) }
            let maskExpr = try maskMod.map { try MaskMod(parsing: $0, captures: caps) }
            let gradTargets = try captureGradientTargets(caps, score: score, mask: maskExpr)
            // The library's rule: one dtype for q, k and v (no silent conversion).
            guard arrays[1].dtype == arrays[0].dtype, arrays[2].dtype == arrays[0].dtype else {
                throw CLIError("--q is \(arrays[0].dtype.rawValue), --k \(arrays[1].dtype.rawValue) and --v \(arrays[2].dtype.rawValue): they must share a dtype (save them all as float32 or all as float16)")
            }
            var dtype = arrays[0].dtype
            if let name = self.dtype {
                guard let d = DType(rawValue: name), d.isFloat else { throw CLIError("--dtype \(name): use float32, float16 or bfloat16") }
                dtype = d
            }
            let (B, Hq, Lq) = (arrays[0].shape[0], arrays[0].shape[1], arrays[0].shape[2])
            let Hkv = arrays[1].shape[1]
            let paging = try loadPageTable(B: B, physicalKeys: arrays[1].shape[2], device: device)
            // Paged: the keys are logical, maxPages * page size per batch.
            let Lkv = paging.map { $0.table.shape[1] * $0.pageSize } ?? arrays[1].shape[2]
            if Hq != Hkv && !gqa && Hkv > 0 && Hq % Hkv == 0 {
                throw CLIError("--q has \(Hq) heads and --k \(Hkv): pass --gqa for grouped-query attention (query head h reads key/value head h / \(Hq / Hkv))")
            }
            let tensors = try zip(arrays, ["q", "k", "v"]).map { a, name in
                a.dtype == dtype ? try device.tensor(a, name: name) : try device.tensor(a.floats, shape: a.shape, dtype: dtype, name: name)
            }
            var offsets: [Int]?
            if let qOffset {
                if let n = Int(qOffset) {
                    offsets = [Int](repeating: n, count: B)
                } else {
                    let a = try NPYArray(contentsOf: URL(fileURLWithPath: qOffset))
                    guard a.dtype == .int32, a.shape == [B] else {
                        throw CLIError("--q-offset \(qOffset) is \(a.dtype.rawValue) \(a.shape); it must be a number or an int32 .npy of shape (\(B),), one offset per batch")
                    }
                    offsets = a.floats.map { Int($0) }
                }
                if let (b, o) = offsets!.enumerated().first(where: { $0.element < 0 || $0.element > Int(Int32.max) - Lq }) {
                    throw CLIError("--q-offset: batch \(b) has offset \(o); offsets are positions from 0 (and the last row's must fit int32)")
                }
            }
            var blockMask: BlockMask?
            // With no queries or no keys there is nothing to mask: every row is empty (output 0, LSE -inf).
            if let m = maskExpr, Lq > 0, Lkv > 0 {
                let perB = m.graph.uses(.b), perH = m.graph.uses(.h)
                // With offsets the mask covers every position up to the last row's.
                let qLen = (offsets?.max() ?? 0) + Lq
                blockMask = try createBlockMask(m, B: perB ? B : 1, H: perH ? Hq : 1, qLen: qLen, kvLen: Lkv, device: device, blockSize: bs)
            }
            let queryOffset: QueryOffset? = try offsets.map { o in
                o.allSatisfy({ $0 == o[0] }) ? .uniform(o[0]) : .values(o)
            }
            if queryOffset != nil, gradOut != nil { throw CLIError("--grad-out: the backward does not take --q-offset (a decoding call)") }
            if paging != nil, gradOut != nil { throw CLIError("--grad-out: the backward does not take --page-table (a serving call)") }
            var lengths: Tensor?
            if kvLens != nil, paging != nil { throw CLIError("--kv-lens: with --page-table the lengths are --seq-lens") }
            if let kvLens {
                let a = try NPYArray(contentsOf: URL(fileURLWithPath: kvLens))
                guard a.dtype == .int32, a.shape == [B] else {
                    throw CLIError("--kv-lens \(kvLens) is \(a.dtype.rawValue) \(a.shape); it must be int32 of shape (\(B),), one length per batch")
                }
                if let (b, n) = a.floats.enumerated().first(where: { $0.element < 0 || Int($0.element) > Lkv }) {
                    throw CLIError("--kv-lens: batch \(b) has length \(Int(n)), outside 0...\(Lkv) (the keys in --k)")
                }
                lengths = try device.tensor(a, name: "kv_lens")
            }
            var sinkTensor: Tensor?
            if let sinks {
                let a = try NPYArray(contentsOf: URL(fileURLWithPath: sinks))
                guard a.dtype == .float32, a.shape == [Hq] else {
                    throw CLIError("--sinks \(sinks) is \(a.dtype.rawValue) \(a.shape); it must be float32 of shape (\(Hq),), one logit per query head")
                }
                sinkTensor = try device.tensor(a, name: "sinks")
            }
            let t0 = Date()
            let result = try flexAttention(tensors[0], tensors[1], tensors[2], scoreMod: score, blockMask: blockMask,
                                           scale: scale, enableGQA: gqa, kvLengths: lengths, qOffset: queryOffset, pageTable: paging, sinks: sinkTensor, returnLSE: true,
                                           returnMaxScores: maxScores != nil)
            let output = try result.output.toArray()
            let lseValues = try result.lse!.toArray()
            let ms = Date().timeIntervalSince(t0) * 1e3
            if let out { try NPYArray(float32: output, shape: result.output.shape).write(to: URL(fileURLWithPath: out)) }
            if let lse { try NPYArray(float32: lseValues, shape: result.lse!.shape).write(to: URL(fileURLWithPath: lse)) }
            if let maxScores, let m = result.maxScores {
                try NPYArray(float32: try m.toArray(), shape: m.shape).write(to: URL(fileURLWithPath: maxScores))
            }
            if let gradOut {
                let g = try NPYArray(contentsOf: URL(fileURLWithPath: gradOut))
                guard g.shape == result.output.shape else {
                    throw CLIError("--grad-out \(gradOut) has shape \(g.shape); it must be the output's, \(result.output.shape)")
                }
                guard g.dtype == arrays[0].dtype else {
                    throw CLIError("--grad-out \(gradOut) is \(g.dtype.rawValue); it must be --q's dtype, \(arrays[0].dtype.rawValue)")
                }
                let dO = try device.tensor(g.floats, shape: g.shape, dtype: dtype, name: "grad_out")
                var dLSE: Tensor?
                if let gradLse {
                    let a = try NPYArray(contentsOf: URL(fileURLWithPath: gradLse))
                    guard a.dtype == .float32, a.shape == result.lse!.shape else {
                        throw CLIError("--grad-lse \(gradLse) is \(a.dtype.rawValue) \(a.shape); it must be float32 of shape \(result.lse!.shape)")
                    }
                    dLSE = try device.tensor(a, name: "grad_lse")
                }
                let grads = try result.backward(gradOutput: dO, gradLSE: dLSE, gradCaptures: gradTargets.map(\.tensor))
                var writes = [(self.dq, grads.dq), (self.dk, grads.dk), (self.dv, grads.dv)] + (grads.dsinks.map { [(gradSinks, $0)] } ?? [])
                writes += zip(gradTargets, grads.captures).map { (Optional($0.0.path), $0.1) }
                for (path, t) in writes {
                    if let path { try NPYArray(float32: try t.toArray(), shape: t.shape).write(to: URL(fileURLWithPath: path)) }
                }
            }
            let masked = lseValues.filter { $0 == -.infinity }.count
            print("output \(result.output.shape) \(dtype.rawValue) on \(device.capabilities.name) in \(String(format: "%.1f", ms)) ms, \(result.kernel.rawValue) kernel"
                  + (blockMask.map { m in ", sparsity \(String(format: "%.2f", (try? m.sparsity()) ?? 0))%" } ?? "")
                  + (masked > 0 ? ", \(masked) fully masked rows" : ""))
        }
    }
}

extension Attend {
    /// `--page-table`, `--seq-lens`, `--page-size`, checked in the flags' terms.
    func loadPageTable(B: Int, physicalKeys: Int, device: Device) throws -> PageTable? {
        guard let pageTable else {
            if seqLens != nil || pageSize != nil { throw CLIError("--seq-lens and --page-size go with --page-table") }
            return nil
        }
        guard let seqLens, let pageSize else { throw CLIError("--page-table needs --seq-lens and --page-size") }
        guard pageSize >= 1 else { throw CLIError("--page-size must be at least 1") }
        guard physicalKeys % pageSize == 0 else {
            throw CLIError("--page-size \(pageSize) does not divide the \(physicalKeys) rows of --k/--v (physical caches hold whole pages)")
        }
        let t = try NPYArray(contentsOf: URL(fileURLWithPath: pageTable)), l = try NPYArray(contentsOf: URL(fileURLWithPath: seqLens))
        guard t.dtype == .int32, t.shape.count == 2, t.shape[0] == B else {
            throw CLIError("--page-table \(pageTable) is \(t.dtype.rawValue) \(t.shape); it must be int32 of shape (\(B), maxPages)")
        }
        guard l.dtype == .int32, l.shape == [B] else {
            throw CLIError("--seq-lens \(seqLens) is \(l.dtype.rawValue) \(l.shape); it must be int32 of shape (\(B),)")
        }
        if let problem = PageTable.problem(table: t.floats.map { Int32($0) }, maxPages: t.shape[1], lengths: l.floats.map { Int($0) },
                                           pageSize: pageSize, pages: physicalKeys / pageSize) {
            throw CLIError("--page-table/--seq-lens: " + problem)
        }
        return PageTable(table: try device.tensor(t, name: "page_table"), lengths: try device.tensor(l, name: "seq_lens"), pageSize: pageSize)
    }

    /// `--grad-capture NAME=FILE.npy`, checked in the flags' terms: a `--capture` the score-mod reads, float.
    func captureGradientTargets(_ caps: [String: Tensor], score: ScoreMod?, mask: MaskMod?) throws -> [(tensor: Tensor, path: String)] {
        var seen: Set<String> = []
        return try gradCapture.map { item in
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else { throw CLIError("--grad-capture \(item): write NAME=FILE.npy") }
            let name = parts[0]
            guard seen.insert(name).inserted else { throw CLIError("--grad-capture: \(name) is given twice") }
            guard let t = caps[name] else { throw CLIError("--grad-capture \(name): there is no --capture \(name)=FILE.npy") }
            guard t.dtype != .int32 else { throw CLIError("--grad-capture \(name): the capture is int32; only float captures have gradients") }
            guard score?.graph.captures.contains(where: { $0.id == t.captureInfo.id }) == true else {
                if mask?.graph.captures.contains(where: { $0.id == t.captureInfo.id }) == true {
                    throw CLIError("--grad-capture \(name): only --mask-mod reads \(name), and a mask has no gradient; read it in --score-mod to learn it")
                }
                throw CLIError("--grad-capture \(name): --score-mod does not read \(name)")
            }
            return (t, parts[1])
        }
    }
}

struct Mask: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Build a BlockMask from a mask_mod and print its picture and sparsity.",
        discussion: """
        Example:
          vkflex mask --mask-mod "(q_idx >= kv_idx) & (q_idx - kv_idx <= 512)" --q-len 2048 --kv-len 2048
        """)

    @Option(name: .long, help: "mask_mod expression.") var maskMod: String
    @Option(name: .long, help: "Query length.") var qLen: Int
    @Option(name: .long, help: "Key/value length.") var kvLen: Int
    @Option(name: .long, help: "Block size: N or QxKV (default 128).") var blockSize: String?
    @Option(name: .customLong("b"), help: "Batch size (when the mask uses b).") var batch: Int = 1
    @Option(name: .customLong("h"), help: "Heads (when the mask uses h).") var heads: Int = 1
    @OptionGroup var captures: CaptureOptions
    @OptionGroup var deviceOptions: DeviceOptions

    func run() throws {
        try reportingErrors {
            guard qLen > 0, kvLen > 0 else { throw CLIError("--q-len and --kv-len must be positive") }
            guard batch > 0, heads > 0 else { throw CLIError("--b and --h must be positive") }
            let bs = try parseBlockSize(blockSize)
            let device = try deviceOptions.open()
            let caps = try captures.load(on: device)
            let mod = try MaskMod(parsing: maskMod, captures: caps)
            let t0 = Date()
            let mask = try createBlockMask(mod, B: mod.graph.uses(.b) ? batch : 1, H: mod.graph.uses(.h) ? heads : 1,
                                           qLen: qLen, kvLen: kvLen, device: device, blockSize: bs)
            let sparsity = try mask.sparsity()
            let ms = Date().timeIntervalSince(t0) * 1e3
            print(mask)
            print(String(format: "sparsity %.2f%% (built in %.1f ms on %@)", sparsity, ms, device.capabilities.name))
        }
    }
}
