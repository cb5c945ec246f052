import CVulkan
import Foundation
import VKFlexTestSupport
import XCTest
@testable import VKFlexVulkan

final class DeviceTests: VulkanTestCase {
    func testLavapipeIsListedWithItsSubgroupSize() throws {
        let devices = try Device.availableDevices(validation: true)
        let cpu = try XCTUnwrap(devices.first { $0.name.contains("llvmpipe") }, "lavapipe not found among \(devices.map(\.name))")
        XCTAssertEqual(cpu.type, .cpu)
        XCTAssertTrue([4, 8, 16].contains(cpu.subgroupSize), "subgroup size \(cpu.subgroupSize)")
        XCTAssertTrue(cpu.subgroupArithmetic)
        XCTAssertEqual(cpu.maxStorageBufferRange, 128 << 20)
        XCTAssertGreaterThan(cpu.maxSharedMemory, 0)
        XCTAssertFalse(cpu.cooperativeMatrixNV)
    }

    /// Every check passes or says it does not apply (lavapipe: no cooperative matrices).
    func testEveryDeviceCheckPassesOrSkips() throws {
        var skipped: [String] = []
        for check in DeviceChecks.all {
            do { _ = try check.run(device) } catch let skip as CheckSkipped { skipped.append("\(check.name): \(skip)") } catch {
                XCTFail("\(check.name): \(error)")
            }
        }
        XCTAssertEqual(skipped, ["cooperative-matrix element layout: no cooperative-matrix extension with subgroup size 32"])
    }

    /// The layout check fails a measurement that does not cover each element exactly once.
    func testALayoutMeasurementMustBeConsistent() {
        let good = CooperativeMatrixLayout(float32: CooperativeMatrixLayout.nvidiaMMA, float16: CooperativeMatrixLayout.nvidiaMMA,
                                           float32Narrow: CooperativeMatrixLayout.nvidiaMMANarrow, float16B: CooperativeMatrixLayout.nvidiaMMAB)
        XCTAssertTrue(good.isConsistent)
        // The B layout the word-by-word loads assume is the A layout transposed.
        XCTAssertEqual(CooperativeMatrixLayout.nvidiaMMAB.map { $0.map { CooperativeMatrixLayout.Coordinate(row: $0.column, column: $0.row) } },
                       CooperativeMatrixLayout.nvidiaMMA)
        XCTAssertTrue(good.summary.contains("fp16 B 8/lane [lane 0: (0,0) (1,0) (8,0) (9,0) (0,8)"), good.summary)
        var badB = good
        badB.float16B = Array(repeating: CooperativeMatrixLayout.nvidiaMMAB[0], count: 32)
        XCTAssertFalse(badB.isConsistent)
        var twice = CooperativeMatrixLayout.nvidiaMMA
        twice[3][0] = twice[3][1]
        XCTAssertFalse(CooperativeMatrixLayout(float32: twice, float16: CooperativeMatrixLayout.nvidiaMMA).isConsistent)
        XCTAssertFalse(CooperativeMatrixLayout(float32: Array(CooperativeMatrixLayout.nvidiaMMA.prefix(16)), float16: CooperativeMatrixLayout.nvidiaMMA).isConsistent)
    }

    func testSelectionByIndexNameAndPreference() throws {
        func caps(_ name: String, _ type: DeviceType, _ index: Int) -> DeviceCapabilities {
            var c = try! Device.availableDevices(validation: true)[0]
            c.name = name; c.type = type; c.index = index
            return c
        }
        let list = [caps("llvmpipe", .cpu, 0), caps("Intel UHD", .integrated, 1), caps("NVIDIA H200", .discrete, 2), caps("Radeon", .discrete, 3)]
        XCTAssertEqual(try Device.choose(list, selector: nil), 2, "first discrete wins")
        XCTAssertEqual(try Device.choose(Array(list.prefix(2)), selector: ""), 1, "integrated beats CPU")
        XCTAssertEqual(try Device.choose(list, selector: "0"), 0)
        XCTAssertEqual(try Device.choose(list, selector: "radeon"), 3, "name substring, any case")
        XCTAssertThrowsError(try Device.choose(list, selector: "7")) { error in
            XCTAssertTrue("\(error)".contains("no device with that index"), "\(error)")
        }
        XCTAssertThrowsError(try Device.choose(list, selector: "Apple")) { error in
            XCTAssertTrue("\(error)".contains("2: NVIDIA H200"), "the message lists the devices: \(error)")
        }
        // The real thing: open lavapipe by name and by index.
        let byName = try Device(selector: "LLVMPIPE", options: .init(validation: true))
        XCTAssertTrue(byName.capabilities.name.contains("llvmpipe"))
        XCTAssertThrowsError(try Device(selector: "no-such-gpu", options: .init(validation: true)))
    }

    func testOverLimitAllocationIsACleanError() throws {
        let limit = device.capabilities.maxMemoryAllocation
        XCTAssertThrowsError(try device.makeBuffer(bytes: limit + 1)) { error in
            guard case FlexError.limitExceeded(let message) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(message.contains("at most"), message)
        }
        XCTAssertThrowsError(try device.makeBuffer(bytes: -1))
    }

    func testBindingLargerThanStorageRangeIsACleanError() throws {
        let big = try device.makeBuffer(bytes: device.capabilities.maxStorageBufferRange + 4096)
        let small = try device.makeBuffer(bytes: 64)
        let pipeline = try device.pipeline(for: "vkflex.subgroup_sum") { try DeviceChecks.subgroupSumDescription(device) }
        XCTAssertThrowsError(try device.record { rec in
            try rec.dispatch(pipeline, bindings: [BufferBinding(big), BufferBinding(small, writes: true)],
                             pushConstants: pushBytes(1, 1), groups: (1, 1, 1))
        }) { error in
            guard case FlexError.limitExceeded(let m) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(m.contains("binds at most 128 MiB"), m)
        }
    }

    func testVulkanErrorNamesCallAndResult() {
        let e = FlexError.vulkan(call: "vkCreateInstance", result: -9)
        XCTAssertEqual(e.description, "vkCreateInstance failed: VK_ERROR_INCOMPATIBLE_DRIVER (-9)")
        XCTAssertEqual(vkResultName(-2), "VK_ERROR_OUT_OF_DEVICE_MEMORY")
    }

    /// The validation layer is really on: a bad call is reported (and then forgiven).
    func testValidationLayerCatchesMisuse() throws {
        let before = ValidationLog.shared.count
        var info = VkBufferCreateInfo()
        info.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO
        info.size = 0 // invalid: VUID-VkBufferCreateInfo-size-00912
        info.usage = VkBufferUsageFlags(VK_BUFFER_USAGE_STORAGE_BUFFER_BIT.rawValue)
        var buffer: VkBuffer?
        _ = vkCreateBuffer(device.handle, &info, nil, &buffer)
        if let buffer { vkDestroyBuffer(device.handle, buffer, nil) }
        XCTAssertGreaterThan(ValidationLog.shared.count, before, "the validation layer did not report a zero-sized buffer")
        // Forgive the deliberate message so tearDown does not fail this test.
        try super.setUpWithError()
    }

    func testWrappingAnotherDevicesVulkanObjects() throws {
        let owner = device!
        let wrapped = try Device(wrapping: owner.instance.handle, physicalDevice: owner.physicalDevice, device: owner.handle,
                                 queue: owner.queue, queueFamilyIndex: owner.queueFamilyIndex,
                                 enabledFeatures: owner.enabledFeatures, options: .init(pipelineCacheDirectory: nil))
        try owner.synchronize()
        let (sums, expected) = try DeviceChecks.runSubgroupSum(wrapped, count: 3000, perGroup: 300)
        for (a, b) in zip(sums, expected) { XCTAssertEqual(a, b, accuracy: 1e-3) }
        // A Tensor-level wrap of an engine's VkBuffer: upload through the owner, read through the wrapper.
        let engineBuffer = try owner.makeBuffer(bytes: 64)
        try engineBuffer.upload((0..<16).map(Float.init))
        try owner.synchronize()
        let view = wrapped.wrapBuffer(engineBuffer.handle, size: 64)
        XCTAssertEqual(try view.download(count: 16, as: Float.self), (0..<16).map(Float.init))
        try wrapped.synchronize()
    }

    /// Which cooperative-matrix extension a device uses (the rewrite itself is tested in VKFlexSPIRVTests).
    func testTheExtensionChoiceFollowsTheDeviceTheEnvironmentAndTheValidationLayer() throws {
        var caps = device.capabilities
        XCTAssertNil(try CooperativeMatrixAPI.choice(caps), "lavapipe has neither extension")
        XCTAssertNil(device.cooperativeMatrixAPI)
        XCTAssertTrue(device.cooperativeMatrixShapes.isEmpty)
        caps.vulkanMemoryModel = true
        caps.cooperativeMatrixNV = true
        caps.cooperativeMatrixKHR = true
        let old = (1 << 22) | (3 << 12) | 239 as UInt32, new = (1 << 22) | (4 << 12) | 309 as UInt32
        XCTAssertEqual(try CooperativeMatrixAPI.choice(caps), .khr)
        XCTAssertEqual(try CooperativeMatrixAPI.choice(caps, validationLayer: new), .khr)
        XCTAssertEqual(try CooperativeMatrixAPI.choice(caps, validationLayer: old), .nv, "Debian 12's layer predates the KHR extension")
        caps.cooperativeMatrixNV = false
        XCTAssertEqual(try CooperativeMatrixAPI.choice(caps, validationLayer: old), .khr, "no NV to fall back to")
        caps.cooperativeMatrixNV = true
        defer { unsetenv("VKFLEX_COOPMAT_API") }
        setenv("VKFLEX_COOPMAT_API", "nv", 1)
        XCTAssertEqual(try CooperativeMatrixAPI.choice(caps), .nv)
        setenv("VKFLEX_COOPMAT_API", "KHR", 1)
        XCTAssertEqual(try CooperativeMatrixAPI.choice(caps, validationLayer: old), .khr, "forced")
        caps.cooperativeMatrixKHR = false
        XCTAssertNil(try CooperativeMatrixAPI.choice(caps), "forced but absent: no cooperative matrices")
        setenv("VKFLEX_COOPMAT_API", "amx", 1)
        XCTAssertThrowsError(try CooperativeMatrixAPI.choice(caps)) { XCTAssertTrue("\($0)".contains("use nv, khr or auto"), "\($0)") }
        caps.vulkanMemoryModel = false
        setenv("VKFLEX_COOPMAT_API", "auto", 1)
        XCTAssertNil(try CooperativeMatrixAPI.choice(caps), "both extensions need the Vulkan memory model")
    }
}

/// Freed large buffers are kept for reuse up to the cache's limit (a training loop's gradients
/// find their memory again instead of a new allocation each step), and `emptyCache` frees them.
final class BufferCacheTests: VulkanTestCase {
    func testLargeBuffersAreReusedWithinTheLimitAndFreedOnRequest() throws {
        let d = try Device(selector: ProcessInfo.processInfo.environment["VKFLEX_DEVICE"] ?? "llvmpipe",
                           options: .init(validation: true, bufferCacheBytes: 48 << 20))
        let mib = 1 << 20
        let start = d.liveAllocations
        var a: Buffer? = try d.makeBuffer(bytes: 20 * mib)
        try a!.upload([Float](repeating: 1, count: 16))
        try d.synchronize()
        a = nil
        XCTAssertEqual(d.cachedBytes, 20 * mib, "a freed 20 MiB buffer is kept")
        // A size of the same 2 MiB class takes it back: no new allocation.
        var b: Buffer? = try d.makeBuffer(bytes: 19 * mib + 12)
        XCTAssertEqual(b?.size, 19 * mib + 12)
        XCTAssertEqual(d.cachedBytes, 0)
        XCTAssertEqual(d.liveAllocations, start + 1)
        // Past the limit (48 MiB) a freed buffer is freed: 20 + 30 MiB do not both fit.
        var c: Buffer? = try d.makeBuffer(bytes: 30 * mib)
        XCTAssertEqual(d.liveAllocations, start + 2)
        var e: Buffer? = b
        b = nil
        try d.synchronize()
        e = nil   // kept: 20 MiB
        c = nil   // freed: 20 + 30 MiB would pass the limit
        XCTAssertNil(e ?? c)
        XCTAssertEqual(d.cachedBytes, 20 * mib)
        XCTAssertEqual(d.liveAllocations, start + 1)
        d.emptyCache()
        XCTAssertEqual(d.cachedBytes, 0)
        XCTAssertEqual(d.liveAllocations, start)
        // Off: every large buffer is freed at once.
        let off = try Device(selector: ProcessInfo.processInfo.environment["VKFLEX_DEVICE"] ?? "llvmpipe",
                             options: .init(validation: true, bufferCacheBytes: 0))
        var f: Buffer? = try off.makeBuffer(bytes: 20 * mib)
        _ = f
        f = nil
        XCTAssertEqual(off.cachedBytes, 0)
        XCTAssertThrowsError(try Device(selector: "llvmpipe", options: .init(bufferCacheBytes: -1))) {
            XCTAssertTrue("\($0)".contains("bufferCacheBytes is -1; it must be 0 or more"), "\($0)")
        }
    }
}
