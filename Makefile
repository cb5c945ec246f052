# The two set-up commands of the README. Each installs missing Debian packages first.
.PHONY: selftest test deps release

deps:
	@tools/ensure-deps.sh

# Build vkflex and check the default Vulkan device (VKFLEX_DEVICE picks another).
selftest: deps
	swift build -c release --product vkflex
	$$(swift build -c release --show-bin-path)/vkflex selftest

# Run the test suite on lavapipe under the Khronos validation layer.
test: deps
	VKFLEX_DEVICE=$${VKFLEX_DEVICE:-llvmpipe} swift test --disable-swift-testing

# The self-contained release binary (static Swift runtime) that ../shared/device/prep.sh packs.
release: deps
	swift build -c release --static-swift-stdlib --product vkflex
