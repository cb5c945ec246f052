import Foundation
import VKFlexTestSupport
import XCTest
@testable import VKFlexVulkan

final class ExecutionTests: VulkanTestCase {
    func testRoundTripsOfSeveralSizesAndTypes() throws {
        for count in [1, 3, 4096, 1 << 20] {
            let f = (0..<count).map { _ in Float.random(in: -100...100) }
            let b = try device.makeBuffer(bytes: count * 4)
            try b.upload(f)
            XCTAssertEqual(try b.download(count: count, as: Float.self), f)
            let h = (0..<count).map { _ in Float16(Float.random(in: -8...8)) }
            let bh = try device.makeBuffer(bytes: count * 2)
            try bh.upload(h)
            XCTAssertEqual(try bh.download(count: count, as: Float16.self), h)
            let i = (0..<count).map { _ in Int32.random(in: .min ... .max) }
            let bi = try device.makeBuffer(bytes: count * 4)
            try bi.upload(i)
            XCTAssertEqual(try bi.download(count: count, as: Int32.self), i)
        }
        let b = try device.makeBuffer(bytes: 16)
        XCTAssertThrowsError(try b.upload([Float](repeating: 0, count: 5)))
        XCTAssertThrowsError(try b.download(count: 5, as: Float.self))
    }

    func testStagingPathRoundTrip() throws {
        // The staging path is what discrete GPUs use; force it with host-invisible semantics by
        // copying through a second buffer on the queue.
        let a = try device.makeBuffer(bytes: 4096)
        let c = try device.makeBuffer(bytes: 4096)
        let values = (0..<1024).map { Int32($0 * 3) }
        try a.upload(values)
        try device.record { $0.copy(from: a, to: c, bytes: 4096) }
        XCTAssertEqual(try c.download(count: 1024, as: Int32.self), values)
        try c.fill(pattern: 0xFFFF_FFFF, byteOffset: 8, bytes: 8)
        let filled = try c.download(count: 4, as: Int32.self)
        XCTAssertEqual(filled, [0, 3, -1, -1])
    }

    func testSubgroupReductionForAnyWorkgroupShape() throws {
        for (count, per) in [(1, 1), (10, 3), (1000, 1000), (100_000, 777)] {
            let (sums, expected) = try DeviceChecks.runSubgroupSum(device, count: count, perGroup: per)
            XCTAssertEqual(sums.count, expected.count)
            for (a, b) in zip(sums, expected) { XCTAssertEqual(a, b, accuracy: 1e-3 * max(1, abs(b))) }
        }
    }

    func testReadingWaitsOnlyForTheWriterAndBuffersOutliveTheirOwners() throws {
        let pipeline = try device.pipeline(for: "vkflex.subgroup_sum") { try DeviceChecks.subgroupSumDescription(device) }
        let out = try device.makeBuffer(bytes: 4)
        do {
            // The input is released by the caller before the work runs; the batch keeps it alive.
            let input = try device.makeBuffer(bytes: 4 * 64)
            try input.upload([Float](repeating: 1, count: 64))
            try device.record { rec in
                try rec.dispatch(pipeline, bindings: [BufferBinding(input), BufferBinding(out, writes: true)],
                                 pushConstants: pushBytes(64, 64), groups: (1, 1, 1))
            }
        }
        // Several calls share one batch until a read needs it.
        XCTAssertNotNil(device.recording)
        XCTAssertEqual(try out.download(count: 1, as: Float.self), [64])
        XCTAssertNil(device.recording, "the read submitted the batch")
    }

    func testManyCommandsAreSplitIntoBatches() throws {
        let pipeline = try device.pipeline(for: "vkflex.subgroup_sum") { try DeviceChecks.subgroupSumDescription(device) }
        let input = try device.makeBuffer(bytes: 4 * 8)
        try input.upload([Float](repeating: 2, count: 8))
        let outs = try (0..<300).map { _ in try device.makeBuffer(bytes: 4) }
        for o in outs {
            try device.record { rec in
                try rec.dispatch(pipeline, bindings: [BufferBinding(input), BufferBinding(o, writes: true)],
                                 pushConstants: pushBytes(8, 8), groups: (1, 1, 1))
            }
        }
        try device.synchronize()
        for o in outs { XCTAssertEqual(try o.download(count: 1, as: Float.self), [16]) }
    }

    func testDispatchArgumentErrors() throws {
        let pipeline = try device.pipeline(for: "vkflex.subgroup_sum") { try DeviceChecks.subgroupSumDescription(device) }
        let b = try device.makeBuffer(bytes: 64)
        XCTAssertThrowsError(try device.record { try $0.dispatch(pipeline, bindings: [BufferBinding(b)], pushConstants: pushBytes(1, 1), groups: (1, 1, 1)) })
        XCTAssertThrowsError(try device.record { try $0.dispatch(pipeline, bindings: [BufferBinding(b), BufferBinding(b)], pushConstants: [], groups: (1, 1, 1)) })
        XCTAssertThrowsError(try device.record { try $0.dispatch(pipeline, bindings: [BufferBinding(b), BufferBinding(b, offset: 4)], pushConstants: pushBytes(1, 1), groups: (1, 1, 1)) })
        XCTAssertThrowsError(try device.record { try $0.dispatch(pipeline, bindings: [BufferBinding(b), BufferBinding(b)], pushConstants: pushBytes(1, 1), groups: (0, 1, 1)) })
    }

    func testTimestampsMeasureWork() throws {
        let result = try DeviceChecks.all.first { $0.name == "GPU timestamps" }!.run(device)
        XCTAssertTrue(result.contains("ms"), result)
    }
}

extension ExecutionTests {
    func testSmallBuffersAreRecycledOnlyAfterTheirWorkCompletes() throws {
        var first: Buffer? = try device.makeBuffer(bytes: 1000)
        let handle = first!.handle
        try first!.upload([Float](repeating: 7, count: 250))
        first = nil
        let second = try device.makeBuffer(bytes: 900)          // same size class: the freed one comes back
        XCTAssertEqual(second.handle, handle)
        XCTAssertEqual(second.size, 900)
        // A buffer still used by recorded work is not recycled before that work completes.
        let pipeline = try device.pipeline(for: "vkflex.subgroup_sum") { try DeviceChecks.subgroupSumDescription(device) }
        let out = try device.makeBuffer(bytes: 4)
        var input: Buffer? = try device.makeBuffer(bytes: 256)
        try input!.upload([Float](repeating: 1, count: 64))
        let inputHandle = input!.handle
        try device.record { try $0.dispatch(pipeline, bindings: [BufferBinding(input!), BufferBinding(out, writes: true)], pushConstants: pushBytes(64, 64), groups: (1, 1, 1)) }
        input = nil
        let other = try device.makeBuffer(bytes: 256)
        XCTAssertNotEqual(other.handle, inputHandle, "the batch still holds the input")
        XCTAssertEqual(try out.download(count: 1, as: Float.self), [64])
    }
}
