import Foundation
import XCTest
import VKFlexVulkan

/// Base class for the Vulkan tests of every test target: one validating lavapipe device per
/// process (`VKFLEX_DEVICE` picks another), hermetic pipeline and SPIR-V caches, and any
/// validation message reported during a test fails it.
open class VulkanTestCase: XCTestCase {
    nonisolated(unsafe) private static var sharedDevice: Device?
    public var device: Device!
    private var validationBaseline = 0

    open override func setUpWithError() throws {
        if VulkanTestCase.sharedDevice == nil {
            let cacheDir = FileManager.default.temporaryDirectory.appendingPathComponent("vkflex-tests-\(getpid())")
            // Hermetic caches: pipelines and SPIR-V of this test process only.
            setenv("VKFLEX_CACHE_DIR", cacheDir.path, 1)
            VulkanTestCase.sharedDevice = try Device(selector: ProcessInfo.processInfo.environment["VKFLEX_DEVICE"] ?? "llvmpipe",
                                                     options: .init(validation: true, pipelineCacheDirectory: cacheDir))
        }
        device = VulkanTestCase.sharedDevice
        validationBaseline = ValidationLog.shared.count
    }

    open override func tearDownWithError() throws {
        try device?.synchronize()
        let messages = ValidationLog.shared.messages.dropFirst(validationBaseline)
        XCTAssertTrue(messages.isEmpty, "validation layer reported:\n" + messages.joined(separator: "\n"))
    }

    /// Fresh random normal values (never zeros): a fast generator seeded from the system's, so
    /// that millions of values cost milliseconds, not a system call each.
    public func randn(_ n: Int, scale: Float = 1) -> [Float] {
        var rng = SplitMix64(seed: UInt64.random(in: 0...UInt64.max))
        return (0..<n).map { _ in
            let u1 = Float.random(in: Float.ulpOfOne..<1, using: &rng), u2 = Float.random(in: 0..<1, using: &rng)
            return scale * (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * .pi * u2)
        }
    }
}

/// SplitMix64: a small, fast, well-mixed generator for test inputs.
public struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
