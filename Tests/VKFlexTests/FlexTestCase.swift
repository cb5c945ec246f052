import Foundation
import XCTest
@testable import VKFlex

/// Base class for VKFlex tests on lavapipe under the validation layer: any validation message
/// during a test fails it.
class FlexTestCase: XCTestCase {
    nonisolated(unsafe) static var sharedDevice: Device?
    var device: Device!
    private var validationBaseline = 0

    override func setUpWithError() throws {
        if FlexTestCase.sharedDevice == nil {
            let cacheDir = FileManager.default.temporaryDirectory.appendingPathComponent("vkflex-tests-\(getpid())")
            // Hermetic caches: pipelines and SPIR-V of this test process only.
            setenv("VKFLEX_CACHE_DIR", cacheDir.path, 1)
            FlexTestCase.sharedDevice = try Device(selector: ProcessInfo.processInfo.environment["VKFLEX_DEVICE"] ?? "llvmpipe",
                                                   options: .init(validation: true, pipelineCacheDirectory: cacheDir))
        }
        device = FlexTestCase.sharedDevice
        validationBaseline = ValidationLog.shared.count
    }

    override func tearDownWithError() throws {
        try device?.synchronize()
        let messages = ValidationLog.shared.messages.dropFirst(validationBaseline)
        XCTAssertTrue(messages.isEmpty, "validation layer reported:\n" + messages.joined(separator: "\n"))
    }

    /// Fresh random normal values (never zeros).
    func randn(_ n: Int, scale: Float = 1) -> [Float] {
        var rng = SystemRandomNumberGenerator()
        return (0..<n).map { _ in
            let u1 = Float.random(in: Float.ulpOfOne..<1, using: &rng), u2 = Float.random(in: 0..<1, using: &rng)
            return scale * (-2 * Foundation.log(u1)).squareRoot() * Foundation.cos(2 * .pi * u2)
        }
    }
}
