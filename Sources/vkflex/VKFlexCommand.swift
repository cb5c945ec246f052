import ArgumentParser
import Foundation
import VKFlex

@main
struct VKFlexCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vkflex",
        abstract: "FlexAttention for every Vulkan GPU.",
        version: vkflexVersion,
        subcommands: [Devices.self, SelfTest.self, Attend.self, Mask.self, Bench.self])
}

/// A failure the CLI reports as one line and a non-zero exit status.
struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Device selection shared by the subcommands.
struct DeviceOptions: ParsableArguments {
    @Option(name: .long, help: "Device index or name substring (default: VKFLEX_DEVICE, else discrete > integrated > virtual > CPU).")
    var device: String?

    @Flag(name: .long, help: "Enable the Khronos validation layer (same as VKFLEX_VALIDATE=1).")
    var validate = false

    func open() throws -> Device {
        let validation = validate || ProcessInfo.processInfo.environment["VKFLEX_VALIDATE"] == "1"
        if validation { ValidationLog.shared.echo = true }
        let options = Device.Options(validation: validation)
        if let device { return try Device(selector: device, options: options) }
        return try Device.default(options: options)
    }
}

/// Runs `body`, turning errors into one clear line on stderr and exit status 1.
func reportingErrors(_ body: () throws -> Void) throws {
    do { try body() } catch let e as ExitCode { throw e } catch let e as CleanExit { throw e } catch {
        FileHandle.standardError.write(Data("vkflex: error: \(error)\n".utf8))
        throw ExitCode(1)
    }
}
