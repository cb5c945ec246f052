import Foundation
import XCTest
@testable import VKFlexExpr

/// The text form means the same to vkflex as to NumPy: each expression is evaluated by Python
/// (`eval` with NumPy arrays for the index grids, as PyTorch broadcasts them) and by the
/// interpreter, over the same grid, and must agree — exactly for int/bool results.
final class NumPyConformanceTests: XCTestCase {
    static let expressions: [(String, Bool)] = [
        ("q_idx >= kv_idx", true),
        ("(q_idx >= kv_idx) & (q_idx - kv_idx <= 4)", true),
        ("(kv_idx <= 3) | (q_idx >= kv_idx)", true),
        ("(abs(q_idx // 4 - kv_idx // 4) <= 1) & (abs(q_idx % 4 - kv_idx % 4) <= 1)", true),
        ("(abs(clamp(q_idx // 4, 1, 2) - kv_idx // 4) <= 1) & (abs(clamp(q_idx % 4, 1, 2) - kv_idx % 4) <= 1)", true),
        ("(doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)", true),
        ("lut[lut[q_idx % 5] % 5] == kv_idx % 5", true),
        ("(-q_idx) // 2 == kv_idx // -2", true),
        ("(q_idx - 7) % -3 == kv_idx % 3 - 2", true),
        ("(q_idx * 100000 * 100000) % 7 == kv_idx % 7", true),
        ("(~q_idx & 7) == (kv_idx & 7)", true),
        ("((q_idx ^ kv_idx) < 4) ^ (b == 1)", true),
        ("~(q_idx >= kv_idx) | (kv_idx == 0)", true),
        ("(q_idx / (kv_idx + 1)) > 1.5", true),
        ("where(h > 0, q_idx >= kv_idx, q_idx <= kv_idx)", true),
        ("(q_idx >= intervals[bounds[kv_idx % 6], 0]) & (q_idx < intervals[bounds[kv_idx % 6], 1])", true),
        ("score", false),
        ("where(q_idx >= kv_idx, score, -inf)", false),
        ("score + slope[h] * (kv_idx - q_idx)", false),
        ("score + (q_idx - kv_idx) * exp2(-((h + 1) * 8.0 / 3))", false),
        ("20 * tanh(score / 20)", false),
        ("score / (kv_idx + 1)", false),
        ("score * (q_idx / (kv_idx + 1))", false),
        ("where((q_idx & 1) == 0, score, -score)", false),
        ("abs(score) ** 0.5 + 2 ** (q_idx % 5)", false),
        ("sigmoid(score) * tanh(score * 3)", false),
        ("log(abs(score) + 1) + log2(q_idx + 1)", false),
        ("sqrt(q_idx * 1.0 + kv_idx)", false),
        ("sin(score) + cos(q_idx) + tan(b)", false),
        ("minimum(score, 0.5) + maximum(q_idx, kv_idx)", false),
        ("clamp(score, -1, 1) * clamp(q_idx - kv_idx, -3, 3)", false),
        ("floor(score * 3) / 3", false),
        ("where(q_idx > kv_idx, 1, 2.5) * score", false),
        ("tab[q_idx % 4, kv_idx % 3] + score", false),
        ("tab[-1, -2] * score + tab[q_idx % 4 - 4, 0]", false),
        ("score * 2 ** -1.5 - 3 ** 2 ** 2 % 7", false),
        ("-2 ** 2 + score % 0.75 + score // 0.5", false),
        ("exp(score - 3) + q_idx // 3 * 1.5", false),
        ("(q_idx - kv_idx) * 1e-3 + score * 2.5e1", false),
    ]

    func testTextFormMatchesNumPy() throws {
        let (S, KV, B, H) = (13, 11, 2, 3)
        let caps: [String: HostTensor] = [
            "doc": HostTensor(name: "doc", int32: (0..<16).map { Int32($0 / 5) }, shape: [16]),
            "lut": HostTensor(name: "lut", int32: [3, 0, 4, 1, 2], shape: [5]),
            "slope": HostTensor(name: "slope", float32: [0.5, 0.25, 0.125], shape: [3]),
            "tab": HostTensor(name: "tab", float32: (0..<12).map { Float($0) * 0.5 - 2 }, shape: [4, 3]),
            "bounds": HostTensor(name: "bounds", int32: [0, 0, 1, 1, 2, 2], shape: [6]),
            "intervals": HostTensor(name: "intervals", int32: [0, 5, 2, 9, 7, 13], shape: [3, 2]),
        ]
        var rng = SystemRandomNumberGenerator()
        let scores = (0..<(B * H * S * KV)).map { _ in Double.random(in: -3...3, using: &rng) }

        var request: [String: Any] = ["B": B, "H": H, "S": S, "KV": KV, "score": scores]
        request["exprs"] = Self.expressions.map(\.0)
        request["captures"] = caps.mapValues { t -> [String: Any] in
            switch t.values {
            case .int32(let v): return ["dtype": "int32", "shape": t.captureInfo.shape, "values": v.map(Int.init)]
            case .float32(let v): return ["dtype": "float32", "shape": t.captureInfo.shape, "values": v.map(Double.init)]
            }
        }
        let results = try runPython(request)
        XCTAssertEqual(results.count, Self.expressions.count)

        for ((text, isMask), numpy) in zip(Self.expressions, results) {
            let graph = isMask ? try MaskMod(parsing: text, captures: caps).graph : try ScoreMod(parsing: text, captures: caps).graph
            let eval = try Interpreter(graph)
            let exact = (try graph.type()) != .float
            var mismatches = 0
            var i = 0
            for b in 0..<B { for h in 0..<H { for q in 0..<S { for kv in 0..<KV {
                let ours = eval.float(score: scores[i], b: b, h: h, q: q, kv: kv)
                let theirs = numpy[i]
                let ok = exact ? ours == theirs
                    : (ours == theirs || (ours.isNaN && theirs.isNaN) || abs(ours - theirs) <= 1e-9 * max(1, abs(theirs)))
                if !ok {
                    mismatches += 1
                    if mismatches <= 3 { XCTFail("\(text) at b=\(b) h=\(h) q=\(q) kv=\(kv): vkflex \(ours), NumPy \(theirs)") }
                }
                i += 1
            }}}}
            XCTAssertNil(eval.error, text)
        }
    }

    func runPython(_ request: [String: Any]) throws -> [[Double]] {
        let script = """
        import json, sys
        import numpy as np
        req = json.load(sys.stdin)
        B, H, S, KV = req["B"], req["H"], req["S"], req["KV"]
        b, h, q_idx, kv_idx = np.meshgrid(*(np.arange(n, dtype=np.int32) for n in (B, H, S, KV)), indexing="ij")
        score = np.array(req["score"], dtype=np.float64).reshape(B, H, S, KV)
        env = dict(b=b, h=h, q_idx=q_idx, kv_idx=kv_idx, score=score, inf=np.inf, nan=np.nan,
                   where=np.where, minimum=np.minimum, maximum=np.maximum, abs=np.abs, floor=np.floor,
                   exp=np.exp, exp2=np.exp2, log=np.log, log2=np.log2, sqrt=np.sqrt, tanh=np.tanh,
                   sin=np.sin, cos=np.cos, tan=np.tan, sigmoid=lambda x: 1 / (1 + np.exp(-x)),
                   clamp=lambda x, lo, hi: np.minimum(np.maximum(x, lo), hi))
        for name, c in req["captures"].items():
            env[name] = np.array(c["values"], dtype=c["dtype"]).reshape(c["shape"])
        out = []
        with np.errstate(all="ignore"):
            for e in req["exprs"]:
                v = np.broadcast_to(eval(e, {"__builtins__": {}}, env), (B, H, S, KV))
                out.append([None if np.isnan(x) else (str(x) if np.isinf(x) else float(x)) for x in v.astype(np.float64).ravel()])
        json.dump(out, sys.stdout)
        """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", script]
        let input = Pipe(), output = Pipe(), errors = Pipe()
        process.standardInput = input
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        let data = try JSONSerialization.data(withJSONObject: request)
        DispatchQueue.global().async {
            input.fileHandleForWriting.write(data)
            try? input.fileHandleForWriting.close()
        }
        let out = output.fileHandleForReading.readDataToEndOfFile()
        let err = errors.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw NSError(domain: "python", code: Int(process.terminationStatus),
                          userInfo: [NSLocalizedDescriptionKey: "python3 with numpy failed (pip install numpy): " + String(decoding: err, as: UTF8.self)])
        }
        let parsed = try JSONSerialization.jsonObject(with: out) as! [[Any]]
        return parsed.map { $0.map { v in
            if let s = v as? String { return s.hasPrefix("-") ? -.infinity : .infinity }
            return (v as? NSNumber)?.doubleValue ?? .nan
        } }
    }
}
