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

extension ExecutionTests {
    /// VKFLEX_RESIDENCY's probe: every subgroup of every workgroup of a probed pipeline is
    /// recorded once, the kernel's own work is unchanged, and unprobed pipelines record nothing.
    func testResidencyProbeRecordsEverySubgroupOnce() throws {
        let probed = try Device(selector: ProcessInfo.processInfo.environment["VKFLEX_DEVICE"] ?? "llvmpipe",
                                options: .init(validation: true, residency: "probe_test"))
        XCTAssertTrue(probed.probesResidency)
        XCTAssertFalse(device.probesResidency, "off unless asked for")
        // A barrier, an early return and a helper function: what the wrapped main must survive.
        let text = """
            #version 450
            layout(local_size_x = 64) in;
            layout(binding = 0) buffer Out { float y[]; };
            shared float s[64];
            float twice(float x) { return 2.0 * x; }
            void main() {
                const uint i = gl_LocalInvocationIndex, g = gl_WorkGroupID.x + gl_NumWorkGroups.x * (gl_WorkGroupID.y + gl_NumWorkGroups.y * gl_WorkGroupID.z);
                s[i] = float(g * 64u + i);
                barrier();
                if (i == 5u) { y[g * 64u + i] = -1.0; return; }
                y[g * 64u + i] = twice(s[63u - i]);
            }
            """
        let out = try probed.makeBuffer(bytes: 4 * 64 * 30)
        for name in ["probe_test", "not_probed"] {
            let pipeline = try probed.pipeline(for: name) { PipelineDescription(source: ShaderSource(name: name, text: text), bindingCount: 1) }
            try probed.record { try $0.dispatch(pipeline, bindings: [BufferBinding(out, writes: true)], groups: (5, 3, 2)) }
            let y = try out.download(count: 64 * 30, as: Float.self)
            for g in 0..<30 {
                for i in 0..<64 { XCTAssertEqual(y[g * 64 + i], i == 5 ? -1 : 2 * Float(g * 64 + 63 - i), "\(name) group \(g) lane \(i)") }
            }
            let reports = try probed.takeResidency()
            guard name == "probe_test" else { XCTAssertTrue(reports.isEmpty, "\(reports.map(\.summary))"); continue }
            XCTAssertEqual(reports.count, 1)
            let r = try XCTUnwrap(reports.first)
            let perGroup = 64 / probed.capabilities.subgroupSize
            XCTAssertEqual(r.pipeline, "probe_test")
            XCTAssertEqual(r.workgroups, 30, r.summary)
            XCTAssertEqual(r.subgroupsPerWorkgroup, perGroup, r.summary)
            XCTAssertEqual(r.units, 1, "lavapipe has no SM id: \(r.summary)")
            XCTAssertTrue((1...30 * perGroup).contains(r.maxSubgroupsAtOnce), r.summary)
            XCTAssertTrue(r.meanSubgroupsAtOnce >= 1 && r.meanSubgroupsAtOnce <= Double(r.maxSubgroupsAtOnce), r.summary)
            XCTAssertNotNil(r.medianRun, "lavapipe has a device clock")
            XCTAssertEqual(r.dropped, 0)
            XCTAssertTrue(r.summary.hasPrefix("probe_test: 30 workgroups × \(perGroup) subgroups on 1 unit, at once on a unit at most "), r.summary)
        }
        // The records themselves: each (workgroup, subgroup) exactly once.
        let pipeline = try probed.pipeline(for: "probe_test") { PipelineDescription(source: ShaderSource(name: "probe_test", text: text), bindingCount: 1) }
        try probed.record { try $0.dispatch(pipeline, bindings: [BufferBinding(out, writes: true)], groups: (5, 3, 2)) }
        try probed.synchronize()
        let records = try XCTUnwrap(probed.residency).take().records
        let perGroup = 64 / probed.capabilities.subgroupSize
        XCTAssertEqual(records.map { $0.workgroup * perGroup + $0.subgroup }.sorted(), Array(0..<30 * perGroup))
        XCTAssertTrue(try probed.takeResidency().isEmpty, "taken once")
    }
}
