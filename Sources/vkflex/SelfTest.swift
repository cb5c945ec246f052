import ArgumentParser
import Foundation
import VKFlex

struct SelfTest: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selftest",
        abstract: "Check the chosen device: device layer, then attention cases against a float64 reference.")

    @OptionGroup var deviceOptions: DeviceOptions

    func run() throws {
        var failures = 0
        try reportingErrors {
            let device = try deviceOptions.open()
            let caps = device.capabilities
            print("vkflex \(vkflexVersion) selftest on [\(caps.index)] \(caps.name) (\(caps.driverName), subgroup \(caps.subgroupSize)\(device.cooperativeMatrixAPI.map { ", cooperative matrices: VK_\($0.rawValue.uppercased())_cooperative_matrix" } ?? ""))")
            let validationBefore = ValidationLog.shared.count
            var rows: [(String, Bool, Double, String)] = []
            for check in DeviceChecks.all {
                let t0 = Date()
                var ok = true
                var detail: String
                do { detail = try check.run(device) } catch { ok = false; detail = "\(error)" }
                try? device.synchronize()
                let ms = Date().timeIntervalSince(t0) * 1e3
                print("\(ok ? "PASS" : "FAIL")  \(check.name) (\(String(format: "%.1f", ms)) ms): \(detail)")
                rows.append((check.name, ok, ms, detail))
                if !ok { failures += 1 }
            }
            print("attention cases against the float64 reference:")
            let outcomes = AttentionSelfTest.run(on: device) { o in
                print("\(o.passed ? "PASS" : "FAIL")  \(pad(o.name, 26)) \(String(format: "%8.1f ms  err %.1e  lse %.1e", o.seconds * 1e3, o.relativeError, o.lseError))  \(o.detail)")
            }
            for o in outcomes {
                rows.append((o.name, o.passed, o.seconds * 1e3, o.detail))
                if !o.passed { failures += 1 }
            }
            print("\nsummary")
            print("  \(pad("check", 52)) result        ms")
            for r in rows {
                print("  \(pad(r.0, 52)) \(r.1 ? "PASS" : "FAIL")  \(String(format: "%10.1f", r.2))")
            }
            let messages = ValidationLog.shared.count - validationBefore
            if messages > 0 {
                print("FAIL  validation layer reported \(messages) message(s)")
                failures += 1
            }
            print("\(rows.count - rows.filter { !$0.1 }.count) passed, \(failures) failed")
        }
        if failures > 0 { throw ExitCode(1) }
    }
}

func pad(_ s: String, _ n: Int) -> String {
    s.count >= n ? String(s.prefix(n)) : s + String(repeating: " ", count: n - s.count)
}
