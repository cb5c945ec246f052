import VKFlexTestSupport

/// The VKFlex tests' base class: the shared validating device of `VulkanTestCase`.
typealias FlexTestCase = VulkanTestCase
