import CVulkan
import Foundation
import XCTest
@testable import VKFlexVulkan

/// Base class for tests on lavapipe: one validating device per process, and any validation
/// message reported during a test fails it.
class VulkanTestCase: XCTestCase {
    nonisolated(unsafe) static var sharedDevice: Device?
    var device: Device!
    private var validationBaseline = 0

    override func setUpWithError() throws {
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

    override func tearDownWithError() throws {
        try device?.synchronize()
        let messages = ValidationLog.shared.messages.dropFirst(validationBaseline)
        XCTAssertTrue(messages.isEmpty, "validation layer reported:\n" + messages.joined(separator: "\n"))
    }
}
