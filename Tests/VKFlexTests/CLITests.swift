import Foundation
import XCTest
@testable import VKFlex

/// `vkflex attend` end to end against a NumPy float64 implementation of flex attention, and every
/// bad input rejected with a clear message and an exit status below 128.
final class CLITests: XCTestCase {
    var binary: URL {
        if let p = ProcessInfo.processInfo.environment["VKFLEX_BIN"] { return URL(fileURLWithPath: p) }
        let candidates = [
            URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("vkflex"),
            Bundle.main.bundleURL.appendingPathComponent("debug/vkflex"),
            URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../.build/debug/vkflex").standardized,
        ]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0.path) } ?? candidates[2]
    }
    lazy var dir: URL = {
        let d = FileManager.default.temporaryDirectory.appendingPathComponent("vkflex-cli-\(UUID())")
        try? FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
        return d
    }()

    /// Runs a program; returns its status and its standard output and error, interleaved.
    func spawn(_ executable: URL, _ args: [String], environment: [String: String]? = nil) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = executable
        p.arguments = args
        if let environment { p.environment = environment }
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: out, as: UTF8.self))
    }

    func run(_ args: [String], extraEnvironment: [String: String] = [:]) throws -> (Int32, String) {
        var env = ProcessInfo.processInfo.environment
        env["VKFLEX_DEVICE"] = env["VKFLEX_DEVICE"] ?? "llvmpipe"
        env["VKFLEX_VALIDATE"] = "1"
        env.merge(extraEnvironment) { _, new in new }
        return try spawn(binary, args, environment: env)
    }

    func python(_ script: String) throws -> String {
        let (status, text) = try spawn(URL(fileURLWithPath: "/usr/bin/env"), ["python3", "-c", script, dir.path])
        guard status == 0 else { throw FlexError("python3 failed: \(text)") }
        return text
    }

    /// NumPy flex attention in float64: the mods are the same text, evaluated by Python.
    static let reference = """
    import numpy as np, sys, os, json
    d = sys.argv[1]
    def where(c, a, b): return np.where(c, a, b)
    env = dict(where=np.where, minimum=np.minimum, maximum=np.maximum, abs=np.abs, floor=np.floor, exp=np.exp,
               exp2=np.exp2, log=np.log, log2=np.log2, sqrt=np.sqrt, tanh=np.tanh, sin=np.sin, cos=np.cos,
               tan=np.tan, sigmoid=lambda x: 1 / (1 + np.exp(-x)), clamp=lambda x, lo, hi: np.minimum(np.maximum(x, lo), hi),
               inf=np.inf)
    def attend(q, k, v, score_mod, mask_mod, captures, scale=None):
        B, Hq, Lq, D = q.shape; Hkv, Lkv = k.shape[1], k.shape[2]
        g = Hq // Hkv
        k = np.repeat(k, g, axis=1).astype(np.float64); v = np.repeat(v, g, axis=1).astype(np.float64)
        scale = 1 / np.sqrt(D) if scale is None else scale
        s = np.einsum('bhqd,bhkd->bhqk', q.astype(np.float64), k) * scale
        b, h, qi, ki = np.meshgrid(np.arange(B, dtype=np.int32), np.arange(Hq, dtype=np.int32),
                                   np.arange(Lq, dtype=np.int32), np.arange(Lkv, dtype=np.int32), indexing='ij')
        e = dict(env, b=b, h=h, q_idx=qi, kv_idx=ki, score=s, **captures)
        with np.errstate(all='ignore'):
            if score_mod: s = np.broadcast_to(eval(score_mod, {'__builtins__': {}}, e), s.shape).astype(np.float64)
            if mask_mod: s = np.where(np.broadcast_to(eval(mask_mod, {'__builtins__': {}}, e), s.shape), s, -np.inf)
            m = s.max(axis=-1, keepdims=True)
            p = np.where(np.isneginf(s), 0.0, np.exp(s - np.where(np.isneginf(m), 0, m)))
            l = p.sum(axis=-1, keepdims=True)
            out = np.where(l > 0, (p @ v) / np.where(l > 0, l, 1), 0.0)
            lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1)), -np.inf)
        return out, lse
    """

    func testAttendMatchesNumPy() throws {
        let cases: [(String, String?, String?, String, [String])] = [
            // name, score_mod, mask_mod, shapes (B,Hq,Hkv,Lq,Lkv,D,Dv,dtype), extra flags
            ("causal", nil, "q_idx >= kv_idx", "1,2,2,70,70,16,16,float32", []),
            ("alibi", "score + slope[h] * (kv_idx - q_idx)", "q_idx >= kv_idx", "2,4,4,33,33,8,8,float32", []),
            ("softcap", "20 * tanh(score / 20)", nil, "1,2,2,40,50,32,24,float32", []),
            ("document", nil, "(doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)", "1,2,2,64,64,16,16,float16", []),
            ("gqa", "where(q_idx >= kv_idx, score, -inf)", nil, "1,6,2,30,30,16,16,float32", ["--gqa"]),
            ("per-head", nil, "q_idx - kv_idx <= h * 7", "1,3,3,45,45,8,8,float32", ["--block-size", "16x32"]),
            ("masked rows", nil, "(q_idx >= 5) & (kv_idx < q_idx)", "1,1,1,20,20,8,8,float32", ["--scale", "0.5"]),
            ("natten", nil, "(abs(clamp(q_idx // 8, 1, 6) - kv_idx // 8) <= 1) & (abs(clamp(q_idx % 8, 1, 6) - kv_idx % 8) <= 1)", "1,1,1,64,64,8,8,float32", ["--block-size", "16"]),
        ]
        for (name, score, mask, shapes, flags) in cases {
            let s = shapes.split(separator: ",").map(String.init)
            let gen = """
            import numpy as np, sys
            d = sys.argv[1]
            B, Hq, Hkv, Lq, Lkv, D, Dv = \(s[0...6].joined(separator: ", "))
            rng = np.random.default_rng()
            for n, shape in (('q', (B, Hq, Lq, D)), ('k', (B, Hkv, Lkv, D)), ('v', (B, Hkv, Lkv, Dv))):
                np.save(f'{d}/{n}.npy', rng.standard_normal(shape).astype(np.\(s[7])))
            np.save(f'{d}/slope.npy', np.exp2(-(np.arange(Hq) + 1) * 8.0 / Hq).astype(np.float32))
            np.save(f'{d}/doc.npy', (np.arange(max(Lq, Lkv)) * 3 // max(Lq, Lkv)).astype(np.int32))
            """
            _ = try python(gen)
            var args = ["attend", "--q", "\(dir.path)/q.npy", "--k", "\(dir.path)/k.npy", "--v", "\(dir.path)/v.npy",
                        "--capture", "slope=\(dir.path)/slope.npy", "--capture", "doc=\(dir.path)/doc.npy",
                        "--out", "\(dir.path)/out.npy", "--lse", "\(dir.path)/lse.npy"] + flags
            if let score { args += ["--score-mod", score] }
            if let mask { args += ["--mask-mod", mask] }
            let (status, output) = try run(args)
            XCTAssertEqual(status, 0, "\(name): \(output)")
            XCTAssertFalse(output.contains("[validation]"), output)
            let scale = flags.firstIndex(of: "--scale").map { flags[$0 + 1] } ?? "None"
            let check = Self.reference + """

            q, k, v = (np.load(f'{d}/{n}.npy') for n in 'qkv')
            caps = dict(slope=np.load(f'{d}/slope.npy'), doc=np.load(f'{d}/doc.npy'))
            ref, ref_lse = attend(q, k, v, \(score.map { "'\($0)'" } ?? "None"), \(mask.map { "'\($0)'" } ?? "None"), caps, \(scale))
            out, lse = np.load(f'{d}/out.npy'), np.load(f'{d}/lse.npy')
            assert out.dtype == np.float32 and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
            err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            masked = np.isneginf(ref_lse)
            ok_masked = bool(np.all(np.isneginf(lse[masked])) and np.all(out[masked] == 0))
            lse_err = float(np.max(np.abs(lse[~masked] - ref_lse[~masked]))) if (~masked).any() else 0.0
            print(json.dumps(dict(err=float(err), lse=lse_err, masked=ok_masked, nan=bool(np.isnan(out).any()))))
            """
            let line = try python(check).split(separator: "\n").last.map(String.init) ?? "{}"
            let r = try JSONSerialization.jsonObject(with: Data(line.utf8)) as! [String: Any]
            let tol = s[7] == "float16" ? 2e-3 : 1e-4
            XCTAssertLessThanOrEqual(r["err"] as! Double, tol, "\(name): \(line)")
            XCTAssertLessThanOrEqual(r["lse"] as! Double, s[7] == "float16" ? 2e-2 : 1e-3, "\(name): \(line)")
            XCTAssertEqual(r["masked"] as? Bool, true, "\(name): fully masked rows must be 0 with LSE -inf: \(line)")
            XCTAssertEqual(r["nan"] as? Bool, false, "\(name)")
        }
    }

    func testBadInputsExitCleanly() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        np.save(f'{d}/q.npy', np.ones((1, 4, 8, 16), np.float32))
        np.save(f'{d}/k.npy', np.ones((1, 4, 8, 16), np.float32))
        np.save(f'{d}/k3.npy', np.ones((1, 3, 8, 16), np.float32))
        np.save(f'{d}/k2.npy', np.ones((1, 2, 8, 16), np.float32))
        np.save(f'{d}/kd.npy', np.ones((1, 4, 8, 8), np.float32))
        np.save(f'{d}/f64.npy', np.ones((1, 4, 8, 16), np.float64))
        np.save(f'{d}/r3.npy', np.ones((4, 8, 16), np.float32))
        np.save(f'{d}/k16.npy', np.ones((1, 4, 8, 16), np.float16))
        np.save(f'{d}/cap5.npy', np.ones((1, 1, 1, 1, 2), np.int32))
        open(f'{d}/trunc.npy', 'wb').write(open(f'{d}/q.npy', 'rb').read()[:200])
        open(f'{d}/text.npy', 'w').write('hello')
        """)
        let d = dir.path
        let base = ["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/k.npy"]
        let cases: [([String], String)] = [
            (["attend", "--q", "\(d)/nope.npy", "--k", "\(d)/k.npy", "--v", "\(d)/k.npy"], "no such file"),
            (["attend", "--q", "\(d)/trunc.npy", "--k", "\(d)/k.npy", "--v", "\(d)/k.npy"], "truncated"),
            (["attend", "--q", "\(d)/text.npy", "--k", "\(d)/k.npy", "--v", "\(d)/k.npy"], "not a NumPy .npy file"),
            (["attend", "--q", "\(d)/f64.npy", "--k", "\(d)/k.npy", "--v", "\(d)/k.npy"], "dtype float64"),
            (["attend", "--q", "\(d)/r3.npy", "--k", "\(d)/k.npy", "--v", "\(d)/k.npy"], "expected (B, H, L, D)"),
            (["attend", "--q", "\(d)/q.npy", "--k", "\(d)/kd.npy", "--v", "\(d)/kd.npy"], "head dim 16 differs"),
            (["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k2.npy", "--v", "\(d)/k2.npy"], "pass --gqa"),
            (["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k16.npy", "--v", "\(d)/k16.npy"], "--q is float32, --k float16 and --v float16: they must share a dtype"),
            (["bench", "--b", "64", "--h", "64", "--s", "65536", "--d", "128"], "of host memory"),
            (["bench", "--b", "1", "--h", "64", "--s", "65536", "--d", "256", "--dtype", "float32"], "allocates at most"),
            (["mask", "--mask-mod", "q_idx >= kv_idx", "--q-len", "1000000", "--kv-len", "1000000", "--block-size", "16"], "use a larger block size"),
            (["selftest", "--kernel", "fastest"], "--kernel fastest: use portable, coopmat-nv, coopmat-generic, split-kv or all"),
            (["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k3.npy", "--v", "\(d)/k3.npy", "--gqa"], "multiple of the key/value heads"),
            (base + ["--score-mod", "score + foo"], "unknown name 'foo'"),
            (base + ["--mask-mod", "q_idx >="], "ends too early"),
            (base + ["--mask-mod", "doc[q_idx] == 0"], "unknown name 'doc'"),
            (base + ["--mask-mod", "cap[q_idx] == 0", "--capture", "cap=\(d)/cap5.npy"], "rank 5"),
            (base + ["--mask-mod", "cap[q_idx] == 0", "--capture", "cap=\(d)/missing.npy"], "no such file"),
            (base + ["--mask-mod", "q_idx >= kv_idx", "--block-size", "0"], "must be positive"),
            (base + ["--mask-mod", "q_idx >= kv_idx", "--block-size", "64x"], "block size"),
            (base + ["--score-mod", "q_idx >= kv_idx"], "must give a number"),
            (base + ["--capture", "bad"], "NAME=FILE.npy"),
        ]
        for (args, fragment) in cases {
            let (status, output) = try run(args)
            XCTAssertTrue(status > 0 && status < 128, "\(args.joined(separator: " ")): status \(status)")
            XCTAssertTrue(output.contains(fragment), "\(args.joined(separator: " ")): \(output)")
            XCTAssertFalse(output.contains("Fatal error"), output)
        }
        // Malformed tuning variables are errors, not silently ignored.
        for (env, fragment) in [(["VKFLEX_COOPMAT_TILES": "32x2"], "use BKVxRPWxNSGxNBUF"), (["VKFLEX_KERNEL": "fast"], "use portable, coopmat-nv, coopmat-generic, split-kv or auto"),
                                (["VKFLEX_KERNEL": "coopmat"], "has no VK_NV_cooperative_matrix"),
                                (["VKFLEX_SPIRV_OPT": "turbo"], "VKFLEX_SPIRV_OPT=turbo is not one of 0, 1")] {
            let (status, output) = try run(base, extraEnvironment: env)
            XCTAssertTrue(status > 0 && status < 128, "\(env): status \(status)")
            XCTAssertTrue(output.contains(fragment), "\(env): \(output)")
        }
    }

    /// A check that does not apply says SKIP, never PASS; a kernel the device lacks fails when asked for alone.
    func testSelftestReportsSkipsAndKernels() throws {
        // The split-KV kernel's cases, the fewest: this test took 36 s cold on lavapipe under the
        // validation layer, 180 s through the portable kernel's (`make selftest` runs them all).
        let (status, output) = try run(["selftest", "--kernel", "split-kv"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("SKIP  cooperative-matrix element layout"), output)
        XCTAssertTrue(output.contains("PASS  decode: float16 GQA 8/2, 1 r split-kv"), output)
        XCTAssertTrue(output.contains("decode: float16 GQA 8/2, 1 row at the end [split-kv]       PASS"), output)
        XCTAssertNotNil(output.range(of: #"\n[1-9][0-9]* passed, 0 failed, [0-9]+ skipped"#, options: .regularExpression), output)
        let (cs, coop) = try run(["selftest", "--kernel", "coopmat-nv"])
        XCTAssertEqual(cs, 1, coop)
        XCTAssertTrue(coop.contains("FAIL  no attention case ran through coopmat-nv"), coop)
    }

    /// `--dtype bfloat16` rounds float32 files to bfloat16, computes, and writes bfloat16-exact
    /// float32 files, matching NumPy on the rounded inputs.
    func testAttendInBFloat16() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        rng = np.random.default_rng(1)
        for n in 'qkv': np.save(f'{d}/{n}.npy', (rng.standard_normal((1, 2, 70, 32)) * (3e5 if n == 'v' else 1)).astype(np.float32))
        """)
        let d = dir.path
        let (status, output) = try run(["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/v.npy", "--dtype", "bfloat16",
                                        "--mask-mod", "q_idx >= kv_idx", "--out", "\(d)/o.npy", "--lse", "\(d)/l.npy"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("bfloat16"), output)
        let check = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        def bf16(x):
            u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
            return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
        q, k, v = [bf16(np.load(f'{d}/{n}.npy')).astype(np.float64) for n in 'qkv']
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(32)
        s = np.where(np.tril(np.ones((70, 70), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True)); ref = p @ v / p.sum(-1, keepdims=True)
        o = np.load(f'{d}/o.npy')
        exact = bool((o.view(np.uint32) & 0xFFFF == 0).all())
        print(exact, float(np.linalg.norm(o - ref) / np.linalg.norm(ref)) < 1e-2, bool(np.isfinite(o).all()))
        """)
        XCTAssertEqual(check.trimmingCharacters(in: .whitespacesAndNewlines), "True True True", "bf16-exact, accurate, finite beyond float16's range")
        let (bad, message) = try run(["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/v.npy", "--dtype", "int32"])
        XCTAssertEqual(bad, 1)
        XCTAssertTrue(message.contains("--dtype int32: use float32, float16 or bfloat16"), message)
    }

    /// `--max-scores`: each row's largest score after scale, score-mod and mask, -inf where a row
    /// has no key, against NumPy.
    func testAttendWritesMaxScores() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        rng = np.random.default_rng(2)
        for n in 'qkv': np.save(f'{d}/{n}.npy', rng.standard_normal((2, 2, 50, 16)).astype(np.float32))
        """)
        let d = dir.path
        let (status, output) = try run(["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/v.npy", "--mask-mod", "kv_idx <= q_idx - 10",
                                        "--score-mod", "20 * tanh(score / 20)", "--max-scores", "\(d)/m.npy"])
        XCTAssertEqual(status, 0, output)
        let check = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        q, k = np.load(f'{d}/q.npy').astype(np.float64), np.load(f'{d}/k.npy').astype(np.float64)
        s = 20 * np.tanh(q @ k.transpose(0, 1, 3, 2) / 4 / 20)
        i, j = np.arange(50)[:, None], np.arange(50)[None, :]
        ref = np.where(j <= i - 10, s, -np.inf).max(-1)
        m = np.load(f'{d}/m.npy')
        print(m.shape, bool(np.isneginf(m[..., :10]).all()), float(np.abs(m[..., 10:] - ref[..., 10:]).max()) < 1e-4)
        """)
        XCTAssertEqual(check.trimmingCharacters(in: .whitespacesAndNewlines), "(2, 2, 50) True True")
    }

    /// `--kv-lens`: per-batch key lengths, against NumPy; bad lengths exit 1 in the CLI's terms.
    func testAttendWithPerBatchKeyLengths() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        rng = np.random.default_rng(3)
        for n in 'qkv': np.save(f'{d}/{n}.npy', rng.standard_normal((2, 2, 20, 8)).astype(np.float32))
        np.save(f'{d}/lens.npy', np.array([7, 0], np.int32))
        np.save(f'{d}/bad.npy', np.array([7, 21], np.int32))
        """)
        let d = dir.path
        let base = ["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/v.npy"]
        let (status, output) = try run(base + ["--kv-lens", "\(d)/lens.npy", "--out", "\(d)/o.npy", "--lse", "\(d)/l.npy"])
        XCTAssertEqual(status, 0, output)
        let check = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        q, k, v = [np.load(f'{d}/{n}.npy').astype(np.float64) for n in 'qkv']
        s = q[0] @ k[0, :, :7].transpose(0, 2, 1) / np.sqrt(8)
        p = np.exp(s - s.max(-1, keepdims=True)); ref = p @ v[0, :, :7] / p.sum(-1, keepdims=True)
        o, l = np.load(f'{d}/o.npy'), np.load(f'{d}/l.npy')
        print(float(np.abs(o[0] - ref).max()) < 1e-5, bool((o[1] == 0).all()), bool(np.isneginf(l[1]).all()))
        """)
        XCTAssertEqual(check.trimmingCharacters(in: .whitespacesAndNewlines), "True True True")
        let (bad, message) = try run(base + ["--kv-lens", "\(d)/bad.npy"])
        XCTAssertEqual(bad, 1)
        XCTAssertTrue(message.contains("--kv-lens: batch 1 has length 21, outside 0...20"), message)
        // Sinks: the LSE of a batch without keys is each head's sink.
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        np.save(f'{d}/sinks.npy', np.array([0.75, -3.0], np.float32))
        np.save(f'{d}/sinks3.npy', np.zeros(3, np.float32))
        """)
        let (ss, so) = try run(base + ["--kv-lens", "\(d)/lens.npy", "--sinks", "\(d)/sinks.npy", "--lse", "\(d)/ls.npy"])
        XCTAssertEqual(ss, 0, so)
        let lse = try python("""
        import numpy as np, sys
        print(np.round(np.load(sys.argv[1] + '/ls.npy')[1, :, 0], 4).tolist())
        """)
        XCTAssertEqual(lse.trimmingCharacters(in: .whitespacesAndNewlines), "[0.75, -3.0]")
        // The sinks' gradient through --grad-out / --grad-sinks.
        let (gs, go) = try run(base + ["--kv-lens", "\(d)/lens.npy", "--sinks", "\(d)/sinks.npy", "--grad-out", "\(d)/q.npy",
                                       "--grad-sinks", "\(d)/gs.npy", "--dq", "\(d)/gq.npy"])
        XCTAssertEqual(gs, 0, go)
        let gshape = try python("""
        import numpy as np, sys
        g = np.load(sys.argv[1] + '/gs.npy'); print(g.shape, bool(np.isfinite(g).all()))
        """)
        XCTAssertEqual(gshape.trimmingCharacters(in: .whitespacesAndNewlines), "(2,) True")
        let (bs, bo) = try run(base + ["--sinks", "\(d)/sinks3.npy"])
        XCTAssertEqual(bs, 1)
        XCTAssertTrue(bo.contains("it must be float32 of shape (2,)"), bo)
    }

    /// `--grad-out` runs the backward; dQ, dK, dV against NumPy in float64 (causal, GQA).
    func testAttendBackward() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        rng = np.random.default_rng(4)
        np.save(f'{d}/q.npy', rng.standard_normal((1, 4, 30, 8)).astype(np.float32))
        for n in 'kv': np.save(f'{d}/{n}.npy', rng.standard_normal((1, 2, 30, 8)).astype(np.float32))
        np.save(f'{d}/do.npy', rng.standard_normal((1, 4, 30, 8)).astype(np.float32))
        """)
        let d = dir.path
        let (status, output) = try run(["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/v.npy", "--gqa", "--mask-mod", "q_idx >= kv_idx",
                                        "--grad-out", "\(d)/do.npy", "--dq", "\(d)/dq.npy", "--dk", "\(d)/dk.npy", "--dv", "\(d)/dv.npy"])
        XCTAssertEqual(status, 0, output)
        let check = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        q = np.load(f'{d}/q.npy').astype(np.float64)[0]; k, v = [np.repeat(np.load(f'{d}/{n}.npy').astype(np.float64)[0], 2, axis=0) for n in 'kv']
        dO = np.load(f'{d}/do.npy').astype(np.float64)[0]
        s = q @ k.transpose(0, 2, 1) / np.sqrt(8); s = np.where(np.tril(np.ones((30, 30), bool)), s, -np.inf)
        P = np.exp(s - s.max(-1, keepdims=True)); P /= P.sum(-1, keepdims=True); O = P @ v
        dP = dO @ v.transpose(0, 2, 1); dS = P * (dP - (dO * O).sum(-1, keepdims=True))
        dq = dS @ k / np.sqrt(8); dk = (dS.transpose(0, 2, 1) @ q / np.sqrt(8)); dv = P.transpose(0, 2, 1) @ dO
        dk = dk.reshape(2, 2, 30, 8).sum(1); dv = dv.reshape(2, 2, 30, 8).sum(1)
        err = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
        print(all(e < 1e-4 for e in [err(np.load(f'{d}/dq.npy')[0], dq), err(np.load(f'{d}/dk.npy')[0], dk), err(np.load(f'{d}/dv.npy')[0], dv)]))
        """)
        XCTAssertEqual(check.trimmingCharacters(in: .whitespacesAndNewlines), "True")
        let (bad, message) = try run(["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/v.npy", "--gqa", "--dq", "\(d)/x.npy"])
        XCTAssertEqual(bad, 1)
        XCTAssertTrue(message.contains("need --grad-out"), message)
    }

    /// `--grad-capture`: a relative-position table and ALiBi slopes learnt through the score-mod,
    /// against NumPy in float64; bad requests exit 1 in the flags' terms.
    func testAttendWritesCaptureGradients() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        rng = np.random.default_rng(7)
        for n in ['q', 'k', 'v', 'do']: np.save(f'{d}/{n}.npy', rng.standard_normal((1, 2, 24, 8)).astype(np.float32))
        np.save(f'{d}/rb.npy', (0.5 * rng.standard_normal(47)).astype(np.float32))
        np.save(f'{d}/slope.npy', np.array([0.5, 0.25], np.float32))
        np.save(f'{d}/doc.npy', (np.arange(24) // 10).astype(np.int32))
        """)
        let d = dir.path
        let base = ["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/v.npy", "--capture", "rb=\(d)/rb.npy",
                    "--capture", "slope=\(d)/slope.npy", "--capture", "doc=\(d)/doc.npy", "--mask-mod", "(q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])",
                    "--score-mod", "score + rb[q_idx - kv_idx + 23] + slope[h] * (kv_idx - q_idx)", "--grad-out", "\(d)/do.npy"]
        let (status, output) = try run(base + ["--grad-capture", "rb=\(d)/drb.npy", "--grad-capture", "slope=\(d)/dslope.npy"])
        XCTAssertEqual(status, 0, output)
        let check = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        q, k, v, dO = [np.load(f'{d}/{n}.npy').astype(np.float64)[0] for n in ['q', 'k', 'v', 'do']]
        rb = np.load(f'{d}/rb.npy').astype(np.float64); slope = np.load(f'{d}/slope.npy').astype(np.float64); doc = np.load(f'{d}/doc.npy')
        i, j = np.meshgrid(np.arange(24), np.arange(24), indexing='ij')
        s = q @ k.transpose(0, 2, 1) / np.sqrt(8) + rb[i - j + 23] + slope[:, None, None] * (j - i)
        s = np.where((i >= j) & (doc[i] == doc[j]), s, -np.inf)
        P = np.exp(s - s.max(-1, keepdims=True)); P /= P.sum(-1, keepdims=True); O = P @ v
        G = P * (dO @ v.transpose(0, 2, 1) - (dO * O).sum(-1, keepdims=True))
        drb = np.zeros(47); np.add.at(drb, np.broadcast_to(i - j + 23, G.shape).ravel(), G.ravel())
        dslope = (G * (j - i)).sum((1, 2))
        err = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
        got_rb, got_slope = np.load(f'{d}/drb.npy'), np.load(f'{d}/dslope.npy')
        print(got_rb.dtype == np.float32 and got_rb.shape == (47,) and err(got_rb, drb) < 1e-4 and err(got_slope, dslope) < 1e-4)
        """)
        XCTAssertEqual(check.trimmingCharacters(in: .whitespacesAndNewlines), "True")
        for (args, message) in [(["--grad-capture", "doc=\(d)/x.npy"], "the capture is int32"),
                                (["--grad-capture", "nope=\(d)/x.npy"], "there is no --capture nope"),
                                (["--grad-capture", "rb"], "write NAME=FILE.npy")] {
            let (bad, text) = try run(base + args)
            XCTAssertEqual(bad, 1, text)
            XCTAssertTrue(text.contains(message), text)
        }
        var maskOnly = base
        maskOnly[maskOnly.firstIndex(of: "--score-mod")! + 1] = "score * 2"
        let (bad, text) = try run(maskOnly + ["--capture", "w=\(d)/slope.npy", "--grad-capture", "slope=\(d)/x.npy", "--grad-capture", "w=\(d)/y.npy"])
        XCTAssertEqual(bad, 1, text)
        XCTAssertTrue(text.contains("--score-mod does not read slope"), text)
    }

    /// `--q-offset`: decode rows at positions of a longer sequence, as a number or per batch from a
    /// file, against NumPy in float64; bad offsets exit 1.
    func testAttendWithQueryOffsets() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        rng = np.random.default_rng(11)
        np.save(f'{d}/q.npy', rng.standard_normal((2, 2, 3, 8)).astype(np.float32))
        for n in 'kv': np.save(f'{d}/{n}.npy', rng.standard_normal((2, 2, 48, 8)).astype(np.float32))
        np.save(f'{d}/off.npy', np.array([5, 40], np.int32))
        np.save(f'{d}/badoff.npy', np.array([5, -2], np.int32))
        """)
        let d = dir.path
        let base = ["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/v.npy", "--mask-mod", "(q_idx >= kv_idx) & (q_idx - kv_idx < 20)",
                    "--score-mod", "score - 0.05 * (q_idx - kv_idx)", "--block-size", "16"]
        for (offset, offsets) in [("\(d)/off.npy", "[5, 40]"), ("30", "[30, 30]")] {
            let (status, output) = try run(base + ["--q-offset", offset, "--out", "\(d)/o.npy", "--lse", "\(d)/l.npy"])
            XCTAssertEqual(status, 0, output)
            let check = try python("""
            import numpy as np, sys
            d = sys.argv[1]
            q, k, v = [np.load(f'{d}/{n}.npy').astype(np.float64) for n in 'qkv']
            off = np.array(\(offsets))
            ok = True
            for b in range(2):
                i = np.arange(3)[:, None] + off[b]; j = np.arange(48)[None, :]
                s = q[b] @ k[b].transpose(0, 2, 1) / np.sqrt(8) - 0.05 * (i - j)
                s = np.where((i >= j) & (i - j < 20), s, -np.inf)
                m = s.max(-1, keepdims=True); p = np.exp(s - m); l = p.sum(-1, keepdims=True)
                o = p @ v[b] / l; lse = (m + np.log(l))[..., 0]
                ok &= np.linalg.norm(np.load(f'{d}/o.npy')[b] - o) / np.linalg.norm(o) < 1e-5
                ok &= np.abs(np.load(f'{d}/l.npy')[b] - lse).max() < 1e-4
            print(bool(ok))
            """)
            XCTAssertEqual(check.trimmingCharacters(in: .whitespacesAndNewlines), "True", offset)
        }
        for (offset, message) in [("\(d)/badoff.npy", "batch 1 has offset -2"), ("-1", "batch 0 has offset -1"),
                                  ("\(d)/q.npy", "it must be a number or an int32 .npy of shape (2,)")] {
            let (bad, text) = try run(base + ["--q-offset=\(offset)"])
            XCTAssertEqual(bad, 1, text)
            XCTAssertTrue(text.contains(message), text)
        }
    }

    /// `--page-table`: physical caches read through a page table (permuted pages, NaN in unused
    /// ones, -1 padding) against NumPy on the contiguous keys; bad tables exit 1 in the flags' terms.
    func testAttendWithPagedCaches() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        rng = np.random.default_rng(5)
        B, H, L, D, P = 2, 2, 64, 8, 16
        lens = np.array([64, 21], np.int32)
        k, v = rng.standard_normal((2, B, H, L, D)).astype(np.float32)
        pages = 10; order = rng.permutation(pages)
        kc = np.full((1, H, pages * P, D), np.nan, np.float32); vc = kc.copy()
        table = np.full((B, L // P), -1, np.int32); n = 0
        for b in range(B):
            for pg in range((lens[b] + P - 1) // P):
                table[b, pg] = order[n]; n += 1
                rows = slice(table[b, pg] * P, table[b, pg] * P + P)
                kc[0, :, rows] = k[b, :, pg * P:pg * P + P]; vc[0, :, rows] = v[b, :, pg * P:pg * P + P]
        np.save(f'{d}/kc.npy', kc); np.save(f'{d}/vc.npy', vc); np.save(f'{d}/table.npy', table); np.save(f'{d}/lens.npy', lens)
        np.save(f'{d}/kfull.npy', k); np.save(f'{d}/vfull.npy', v)
        np.save(f'{d}/q.npy', rng.standard_normal((B, H, 1, D)).astype(np.float32))
        bad = table.copy(); bad[1, 1] = 10; np.save(f'{d}/badtable.npy', bad)
        """)
        let d = dir.path
        let base = ["attend", "--q", "\(d)/q.npy", "--k", "\(d)/kc.npy", "--v", "\(d)/vc.npy", "--seq-lens", "\(d)/lens.npy", "--page-size", "16",
                    "--score-mod", "score - 0.02 * kv_idx"]
        let (status, output) = try run(base + ["--page-table", "\(d)/table.npy", "--out", "\(d)/o.npy"])
        XCTAssertEqual(status, 0, output)
        let check = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        q, k, v = [np.load(f'{d}/{n}.npy').astype(np.float64) for n in ['q', 'kfull', 'vfull']]
        lens = np.load(f'{d}/lens.npy'); o = np.load(f'{d}/o.npy'); ok = not np.isnan(o).any()
        for b in range(2):
            n = lens[b]; s = q[b] @ k[b][:, :n].transpose(0, 2, 1) / np.sqrt(8) - 0.02 * np.arange(n)
            p = np.exp(s - s.max(-1, keepdims=True)); ref = p @ v[b][:, :n] / p.sum(-1, keepdims=True)
            ok &= np.linalg.norm(o[b] - ref) / np.linalg.norm(ref) < 1e-5
        print(bool(ok))
        """)
        XCTAssertEqual(check.trimmingCharacters(in: .whitespacesAndNewlines), "True")
        for (args, message) in [(["--page-table", "\(d)/badtable.npy"], "--page-table/--seq-lens: batch 1's page 1 holds keys but maps to physical page 10, outside 0..<10"),
                                (["--page-table", "\(d)/table.npy", "--page-size", "7"], "--page-size 7 does not divide the 160 rows of --k/--v"),
                                (["--page-table", "\(d)/lens.npy"], "it must be int32 of shape (2, maxPages)")] {
            var args2 = base
            if args.contains("--page-size") { args2.removeSubrange(args2.firstIndex(of: "--page-size")!...(args2.firstIndex(of: "--page-size")! + 1)) }
            let (bad, text) = try run(args2 + args)
            XCTAssertEqual(bad, 1, text)
            XCTAssertTrue(text.contains(message), text)
        }
    }

    /// A decode step as a serving model takes it, from files: GQA 32 → 8, float16, D = 128, ALiBi
    /// and a causal mask written in positions, `--q-offset` per batch, `--kv-lens`, sinks; the
    /// split-KV kernel against NumPy in float64.
    func testAttendDecodeStepLikeAServingModel() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        rng = np.random.default_rng(9)
        B, Hq, Hkv, Lq, L, D = 2, 32, 8, 2, 300, 128
        np.save(f'{d}/q.npy', rng.standard_normal((B, Hq, Lq, D)).astype(np.float16))
        for n in 'kv': np.save(f'{d}/{n}.npy', rng.standard_normal((B, Hkv, L, D)).astype(np.float16))
        np.save(f'{d}/slope.npy', np.exp2(-(np.arange(Hq) + 1) * 8 / Hq).astype(np.float32))
        np.save(f'{d}/off.npy', np.array([240, 57], np.int32)); np.save(f'{d}/lens.npy', np.array([242, 59], np.int32))
        np.save(f'{d}/sinks.npy', rng.standard_normal(Hq).astype(np.float32))
        """)
        let d = dir.path
        let (status, output) = try run(["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k.npy", "--v", "\(d)/v.npy", "--gqa", "--capture", "slope=\(d)/slope.npy",
                                        "--score-mod", "score + slope[h] * (kv_idx - q_idx)", "--mask-mod", "q_idx >= kv_idx",
                                        "--q-offset", "\(d)/off.npy", "--kv-lens", "\(d)/lens.npy", "--sinks", "\(d)/sinks.npy",
                                        "--out", "\(d)/o.npy", "--lse", "\(d)/l.npy"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("split-kv kernel"), output)
        let check = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        q, k, v = [np.load(f'{d}/{n}.npy').astype(np.float64) for n in 'qkv']
        slope, off, lens, sinks = [np.load(f'{d}/{n}.npy').astype(np.float64) for n in ['slope', 'off', 'lens', 'sinks']]
        o, l = np.load(f'{d}/o.npy'), np.load(f'{d}/l.npy'); ok = True
        for b in range(2):
            kk, vv = np.repeat(k[b], 4, axis=0)[:, :int(lens[b])], np.repeat(v[b], 4, axis=0)[:, :int(lens[b])]
            i = np.arange(2)[:, None] + off[b]; j = np.arange(int(lens[b]))[None, :]
            s = q[b] @ kk.transpose(0, 2, 1) / np.sqrt(128) + slope[:, None, None] * (j - i)
            s = np.where(i >= j, s, -np.inf)
            m = np.maximum(s.max(-1, keepdims=True), sinks[:, None, None]); p = np.exp(s - m)
            den = p.sum(-1, keepdims=True) + np.exp(sinks[:, None, None] - m)
            ref = p @ vv / den; lse = (m + np.log(den))[..., 0]
            ok &= np.linalg.norm(o[b] - ref) / np.linalg.norm(ref) < 2e-3 and np.abs(l[b] - lse).max() < 2e-2
        print(bool(ok))
        """)
        XCTAssertEqual(check.trimmingCharacters(in: .whitespacesAndNewlines), "True")
    }

    func testAttendWithNoKeysGivesEmptyRows() throws {
        _ = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        np.save(f'{d}/q.npy', np.random.randn(1, 2, 5, 8).astype(np.float32))
        np.save(f'{d}/k0.npy', np.zeros((1, 2, 0, 8), np.float32))
        """)
        let d = dir.path
        let (status, output) = try run(["attend", "--q", "\(d)/q.npy", "--k", "\(d)/k0.npy", "--v", "\(d)/k0.npy", "--mask-mod", "q_idx >= kv_idx",
                                        "--out", "\(d)/o.npy", "--lse", "\(d)/l.npy"])
        XCTAssertEqual(status, 0, output)
        let check = try python("""
        import numpy as np, sys
        d = sys.argv[1]
        o, l = np.load(f'{d}/o.npy'), np.load(f'{d}/l.npy')
        print(o.shape, bool((o == 0).all()), bool(np.isneginf(l).all()))
        """)
        XCTAssertEqual(check.trimmingCharacters(in: .whitespacesAndNewlines), "(1, 2, 5, 8) True True")
    }

    func testMaskCommandPrintsThePicture() throws {
        let (status, output) = try run(["mask", "--mask-mod", "(q_idx >= kv_idx) & (q_idx - kv_idx <= 512)", "--q-len", "2048", "--kv-len", "2048"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("BlockMask(shape=(1, 1, 2048, 2048), sparsity=72.66%,"), output)
        XCTAssertTrue(output.contains("░░██████░░"), output)
    }

    func testDevicesListsLavapipe() throws {
        let (status, output) = try run(["devices"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("llvmpipe"), output)
        XCTAssertTrue(output.contains("subgroup size"), output)
        let (js, json) = try run(["devices", "--json"])
        XCTAssertEqual(js, 0)
        XCTAssertTrue(json.contains("\"subgroupSize\""), json)
        let (vs, version) = try run(["--version"])
        XCTAssertEqual(vs, 0)
        XCTAssertEqual(version.trimmingCharacters(in: .whitespacesAndNewlines), vkflexVersion)
    }

    /// `vkflex bench` writes the fields of ../shared/bench/SUITE.md (plus where a first call's time
    /// went) and checks its results against the float64 reference: a suite case and a custom one.
    /// `bench --suite decode`: contiguous and paged rows with the suite's fields, checked against float64.
    func testBenchRunsTheDecodeSuite() throws {
        let json = dir.appendingPathComponent("decode.jsonl").path
        let (status, output) = try run(["bench", "--suite", "decode", "--cases", "decode_sliding_4k_of_32k,specdec_4_of_8k", "--small",
                                        "--repeat", "1", "--json", json])
        XCTAssertEqual(status, 0, output)
        let rows = try String(contentsOfFile: json, encoding: .utf8).split(separator: "\n").map {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any]
        }
        XCTAssertEqual(rows.map { $0["case"] as? String }, ["decode_sliding_4k_of_32k", "decode_sliding_4k_of_32k", "specdec_4_of_8k", "specdec_4_of_8k"])
        XCTAssertEqual(rows.map { $0["paged"] as? Bool }, [false, true, false, true])
        for row in rows {
            for field in ["B", "H", "Hkv", "Lq", "S", "D", "dtype", "density", "fw_ms", "kv_gb", "gbps", "host_us", "rel_err", "device", "kernel"] {
                XCTAssertNotNil(row[field], "\(field) missing in \(row)")
            }
            XCTAssertLessThan(row["rel_err"] as? Double ?? 1, 2e-3, "\(row)")
            // The timed runs' spread brackets their median.
            let ms = row["fw_ms"] as? Double ?? -1, lo = row["fw_ms_min"] as? Double ?? .nan, hi = row["fw_ms_max"] as? Double ?? .nan
            XCTAssertTrue(lo <= ms + 1e-3 && ms <= hi + 1e-3, "\(row)")
            XCTAssertNil(row["round"], "one round: no round field")
            XCTAssertEqual(row["groups"] as? Int, 1, "a CPU device times one group")
        }
        // The sliding window reads an eighth of the cache.
        XCTAssertEqual(rows[0]["density"] as? Double ?? 0, 0.1875, accuracy: 1e-4)
        let (bad, text) = try run(["bench", "--suite", "decode", "--cases", "nope"])
        XCTAssertEqual(bad, 1, text)
        XCTAssertTrue(text.contains("unknown case 'nope' (known: decode_dense_4k"), text)
        // --rounds: each case again with new buffers, every round a row.
        let json2 = dir.appendingPathComponent("decode2.jsonl").path
        let (s2, out2) = try run(["bench", "--suite", "decode", "--cases", "decode_sliding_4k_of_32k", "--small", "--repeat", "1", "--rounds", "2",
                                  "--no-check", "--json", json2], extraEnvironment: ["VKFLEX_PROFILE": "1"])
        XCTAssertEqual(s2, 0, out2)
        // VKFLEX_PROFILE=1: each row's device time per shader (the decode pass and the merge).
        // Shaders are listed slowest first, and on a CPU the merge can come out slower than the decode.
        let profileLines = out2.split(separator: "\n").filter { $0.contains("device time per call: ") }
        XCTAssertEqual(profileLines.count, 4, out2)
        for line in profileLines {
            XCTAssertTrue(line.contains("flex_attention_decode ") && line.contains("flex_attention_merge ") && line.contains(" us (1x)"), out2)
        }
        let rows2 = try String(contentsOfFile: json2, encoding: .utf8).split(separator: "\n").map {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any]
        }
        XCTAssertEqual(rows2.map { $0["round"] as? Int }, [0, 0, 1, 1])
        XCTAssertEqual(rows2.map { $0["paged"] as? Bool }, [false, true, false, true])
        for args in [["--rounds", "0"], ["--rounds", "2", "--suite", "seed"]] {
            let (st, msg) = try run(["bench", "--suite", "decode"] + args)
            XCTAssertEqual(st, 1, msg)
            XCTAssertTrue(msg.contains("--rounds"), msg)
        }
    }

    func testBenchWritesTheSuiteFields() throws {
        let json = dir.appendingPathComponent("bench.jsonl").path
        let (status, output) = try run(["bench", "--suite", "seed", "--cases", "causal,softcap20_causal", "--small", "--repeat", "2", "--json", json])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("causal"), output)
        // The driver-introspection variables are harmless where the driver lacks the extension
        // (lavapipe): nothing is printed or written, the run is the same.
        let irDir = dir.appendingPathComponent("ir").path
        let (cs, custom) = try run(["bench", "--b", "1", "--h", "2", "--s", "200", "--d", "24", "--dtype", "float32",
                                    "--mask-mod", "(q_idx >= kv_idx) & (q_idx - kv_idx <= 64)", "--score-mod", "score * 0.5",
                                    "--repeat", "2", "--json", json],
                                   extraEnvironment: ["VKFLEX_PIPELINE_STATS": "1", "VKFLEX_PIPELINE_IR": irDir, "VKFLEX_PROFILE": "1",
                                                      "VKFLEX_RESIDENCY": "flex_attention_fwd"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: irDir), "lavapipe offers no internal representations")
        XCTAssertEqual(cs, 0, custom)
        XCTAssertTrue(custom.contains("device time per call: flex_attention_fwd"), custom)
        // VKFLEX_RESIDENCY: how the probed kernel's workgroups sat on the device (one unit: lavapipe has no SM id).
        XCTAssertTrue(custom.contains("\n  residency flex_attention_fwd: "), custom)
        XCTAssertTrue(custom.contains(" subgroups on 1 unit, at once on a unit at most "), custom)
        XCTAssertFalse(output.contains("device time per call"), "no profile without VKFLEX_PROFILE=1")
        let rows = try String(contentsOfFile: json, encoding: .utf8).split(separator: "\n").map {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any]
        }
        XCTAssertEqual(rows.map { $0["case"] as? String }, ["causal", "causal", "softcap20_causal", "custom"])
        XCTAssertEqual(rows.map { $0["D"] as? Int }, [64, 128, 64, 24])
        guard rows.count == 4 else { return }   // a failed run: the assertions above say why
        for row in rows {
            for field in ["B", "H", "S", "D", "dtype", "density", "fw_ms", "fw_tflops", "mask_ms", "rel_err", "device", "kernel"] {
                XCTAssertNotNil(row[field], "\(field) missing in \(row)")
            }
            XCTAssertLessThan(row["rel_err"] as? Double ?? 1, (row["dtype"] as? String) == "float32" ? 1e-4 : 2e-3, "\(row)")
            XCTAssertGreaterThan(row["fw_ms"] as? Double ?? 0, 0, "\(row)")
            // Each case is a new variant here: its first call compiled it, and says where the time went.
            for field in ["first_call_ms", "compile_ms", "pipeline_ms"] {
                XCTAssertGreaterThan(row[field] as? Double ?? -1, 0, "\(field) in \(row)")
            }
        }
        XCTAssertEqual(rows[0]["density"] as? Double, 0.625, "causal at S=512 in 128-blocks keeps 10 of 16")
        XCTAssertEqual(rows[3]["mask_mod"] as? String, "(q_idx >= kv_idx) & (q_idx - kv_idx <= 64)")
        XCTAssertEqual(rows[3]["score_mod"] as? String, "score * 0.5")
    }
}
