import Foundation
import VKFlex
import VKFlexTestSupport
import VKFlexVulkan

/// The VKFlex tests' base class: the shared validating device of `VulkanTestCase`.
typealias FlexTestCase = VulkanTestCase

extension FlexTestCase {
    /// A lavapipe device opened with `env` set (tuning is read when a device opens).
    func device(with env: [String: String]) throws -> Device {
        for (k, v) in env { setenv(k, v, 1) }
        defer { for k in env.keys { unsetenv(k) } }
        return try Device(selector: "llvmpipe", options: .init(validation: true))
    }
}
