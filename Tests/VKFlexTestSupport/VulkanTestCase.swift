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

    /// Fresh random normal values (never zeros).
    public func randn(_ n: Int, scale: Float = 1) -> [Float] {
        var rng = SystemRandomNumberGenerator()
        return (0..<n).map { _ in
            let u1 = Float.random(in: Float.ulpOfOne..<1, using: &rng), u2 = Float.random(in: 0..<1, using: &rng)
            return scale * (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * .pi * u2)
        }
    }
}
