import ArgumentParser
import Foundation
import VKFlex

struct Devices: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List Vulkan devices and their capabilities.")

    @Flag(name: .long, help: "Print JSON instead of a table.")
    var json = false

    func run() throws {
        try reportingErrors {
            let devices = try Device.availableDevices()
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try encoder.encode(devices), as: UTF8.self))
                return
            }
            let chosen = try? Device.choose(devices, selector: ProcessInfo.processInfo.environment["VKFLEX_DEVICE"])
            for d in devices {
                let mark = d.index == chosen ? "*" : " "
                print("\(mark) [\(d.index)] \(d.name) (\(d.type.rawValue), Vulkan \(d.apiVersion), \(d.driverName) \(d.driverInfo))")
                let rows: [(String, String)] = [
                    ("subgroup size", d.minSubgroupSize == d.maxSubgroupSize ? "\(d.subgroupSize)" : "\(d.subgroupSize) (\(d.minSubgroupSize)-\(d.maxSubgroupSize))"),
                    ("subgroup ops", d.subgroupOperations.joined(separator: " ")),
                    ("shared memory", formatBytes(d.maxSharedMemory)),
                    ("storage buffer range", formatBytes(d.maxStorageBufferRange)),
                    ("max allocation", formatBytes(d.maxMemoryAllocation)),
                    ("device memory", formatBytes(d.deviceLocalMemory) + (d.unifiedMemory ? " (unified)" : "")),
                    ("workgroup", "\(d.maxWorkgroupInvocations) invocations"),
                    ("fp16 arithmetic", yesNo(d.shaderFloat16)),
                    ("16-bit storage", yesNo(d.storageBuffer16Bit)),
                    ("buffer device address", yesNo(d.bufferDeviceAddress)),
                    ("float atomic add", yesNo(d.floatAtomicAdd)),
                    ("compute units", d.computeUnits.map(String.init) ?? "not reported"),
                    ("cooperative matrix (NV)", d.cooperativeMatrixNV ? d.cooperativeMatrixShapes.map(\.description).joined(separator: ", ") : "no"),
                    ("cooperative matrix (KHR)", d.cooperativeMatrixKHR ? d.cooperativeMatrixKHRShapes.map(\.description).joined(separator: ", ") : "no"),
                    ("bfloat16 cooperative matrix", yesNo(d.bfloat16CooperativeMatrix)),
                    ("timestamps", d.timestamps ? String(format: "yes (%.3g ns/tick)", d.timestampPeriodNs) : "no"),
                ]
                for (k, v) in rows { print("      \(k.padding(toLength: 24, withPad: " ", startingAt: 0)) \(v)") }
            }
            if devices.isEmpty { print("no Vulkan devices") }
        }
    }
}

func yesNo(_ b: Bool) -> String { b ? "yes" : "no" }
