# The two set-up commands of the README. Each installs missing Debian packages first.
.PHONY: selftest test deps release

deps:
	@tools/ensure-deps.sh

# Build vkflex and check the default Vulkan device (VKFLEX_DEVICE picks another).
selftest: deps
	swift build -c release --product vkflex
	$$(swift build -c release --show-bin-path)/vkflex selftest

# Run the test suite on lavapipe under the Khronos validation layer, two test processes at a time:
# most of its time is lavapipe compiling pipelines, one core each (a fresh clone on 2 cores: 8 min
# 8 s against 14 min 43 s in one process, 2026-12-06). GALLIVM_PERF=nopt: lavapipe compiles the
# tests' shaders without LLVM's optimization passes (with empty shader caches the tests took
# 12 min 28 s against 16 min 39 s, 2026-12-07).
test: deps
	VKFLEX_DEVICE=$${VKFLEX_DEVICE:-llvmpipe} GALLIVM_PERF=$${GALLIVM_PERF:-nopt} swift test --disable-swift-testing --parallel --num-workers 2

# The self-contained release binary (static Swift runtime) that ../shared/device/prep.sh packs.
release: deps
	swift build -c release --static-swift-stdlib --product vkflex
