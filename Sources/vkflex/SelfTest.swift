import ArgumentParser
import Foundation
import VKFlex

struct SelfTest: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selftest",
        abstract: "Check the chosen device: device layer, then attention cases against a float64 reference.")

    @Option(name: .long, help: "Which kernels run the attention cases: portable, coopmat-nv, coopmat-generic, split-kv, or all (every kernel that applies; the default). coopmat-generic runs everywhere: without cooperative matrices its products are scalar loops.")
    var kernel: String = "all"

    @OptionGroup var deviceOptions: DeviceOptions

    func run() throws {
        var failures = 0
        try reportingErrors {
            let kernels: [FlexKernel]
            if kernel.lowercased() == "all" { kernels = FlexKernel.allCases }
            else if let k = FlexKernel(name: kernel) { kernels = [k] }
            else { throw CLIError("--kernel \(kernel): use portable, coopmat-nv, coopmat-generic, split-kv or all") }
            let device = try deviceOptions.open()
            let caps = device.capabilities
            print("vkflex \(vkflexVersion) selftest on [\(caps.index)] \(caps.name) (\(caps.driverName), subgroup \(caps.subgroupSize)\(device.cooperativeMatrixAPI.map { ", cooperative matrices: VK_\($0.rawValue.uppercased())_cooperative_matrix" } ?? ""))")
            let validationBefore = ValidationLog.shared.count
            var rows: [(String, String, Double)] = []   // name, PASS/FAIL/SKIP, ms
            for check in DeviceChecks.all {
                let t0 = Date()
                var verdict = "PASS"
                var detail: String
                do { detail = try check.run(device) } catch let skip as CheckSkipped { verdict = "SKIP"; detail = skip.description } catch { verdict = "FAIL"; detail = "\(error)" }
                try? device.synchronize()
                let ms = Date().timeIntervalSince(t0) * 1e3
                print("\(verdict)  \(check.name) (\(String(format: "%.1f", ms)) ms): \(detail)")
                rows.append((check.name, verdict, ms))
                if verdict == "FAIL" { failures += 1 }
            }
            print("attention cases against the float64 reference, through \(kernels.map(\.rawValue).joined(separator: " and ")):")
            let outcomes = AttentionSelfTest.run(on: device, kernels: kernels) { o in
                let verdict = o.skipped ? "SKIP" : o.passed ? "PASS" : "FAIL"
                let name = pad(o.name, 28) + " " + pad(o.kernel?.rawValue ?? "", 15)
                if o.skipped { print("\(verdict)  \(name) \(o.detail)"); return }
                print("\(verdict)  \(name) \(String(format: "%8.1f ms  err %.1e  lse %.1e", o.seconds * 1e3, o.relativeError, o.lseError))  \(o.detail)")
            }
            for o in outcomes {
                rows.append(("\(o.name) [\(o.kernel?.rawValue ?? "auto")]", o.skipped ? "SKIP" : o.passed ? "PASS" : "FAIL", o.seconds * 1e3))
                if !o.skipped && !o.passed { failures += 1 }
            }
            // The backward's dQ and dK/dV passes: portable, and through matrices (coopmat-nv, coopmat-generic).
            for bk in kernels where bk == .portable || bk == .coopmatNV || bk == .coopmatGeneric {
                print("backward cases (dQ, dK, dV) against the float64 reference, through \(bk.rawValue):")
                let backward = AttentionSelfTest.runBackward(on: device, kernel: bk, progress: { o in
                    let verdict = o.skipped ? "SKIP" : o.passed ? "PASS" : "FAIL"
                    if o.skipped { print("\(verdict)  \(pad(o.name, 39)) \(o.detail)"); return }
                    print("\(verdict)  \(pad(o.name, 39)) \(String(format: "%8.1f ms  err %.1e", o.seconds * 1e3, o.relativeError))  \(o.detail)")
                })
                for o in backward {
                    rows.append(("\(o.name) [\(bk.rawValue)]", o.skipped ? "SKIP" : o.passed ? "PASS" : "FAIL", o.seconds * 1e3))
                    if !o.skipped && !o.passed { failures += 1 }
                }
                // Where the forward ran through coopmat-nv, its backward must have run too.
                if bk == .coopmatNV, outcomes.contains(where: { $0.kernel == .coopmatNV && !$0.skipped }), backward.allSatisfy(\.skipped) {
                    print("FAIL  no backward case ran through coopmat-nv")
                    failures += 1
                }
            }
            // A kernel the device has but that ran no case is a failure: the check could not fail otherwise.
            for k in kernels where !outcomes.contains(where: { $0.kernel == k && !$0.skipped }) {
                if kernels.count == 1 || k != .coopmatNV {   // every device runs portable and split-kv
                    print("FAIL  no attention case ran through \(k.rawValue)")
                    failures += 1
                }
            }
            print("\nsummary")
            print("  \(pad("check", 58)) result        ms")
            for r in rows {
                print("  \(pad(r.0, 58)) \(r.1)  \(String(format: "%10.1f", r.2))")
            }
            let messages = ValidationLog.shared.count - validationBefore
            if messages > 0 {
                print("FAIL  validation layer reported \(messages) message(s)")
                failures += 1
            }
            let skipped = rows.filter { $0.1 == "SKIP" }.count
            print("\(rows.filter { $0.1 == "PASS" }.count) passed, \(failures) failed, \(skipped) skipped")
        }
        if failures > 0 { throw ExitCode(1) }
    }
}

func pad(_ s: String, _ n: Int) -> String {
    s.count >= n ? String(s.prefix(n)) : s + String(repeating: " ", count: n - s.count)
}
