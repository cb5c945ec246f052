import CVulkan
import Foundation

/// One command buffer's worth of work: recorded, submitted once, completed when its fence signals.
/// It retains every buffer and pipeline it uses until then.
final class Batch: @unchecked Sendable {
    let id: UInt64
    let commandBuffer: VkCommandBuffer
    var fence: VkFence?
    var descriptorPools: [VkDescriptorPool] = []
    var setsLeftInPool = 0
    var retained: [AnyObject] = []
    var commandCount = 0
    var submitted = false
    var completed = false
    var queryPool: VkQueryPool?
    var queryCount = 0
    var timestamps: [GPUTimestamp] = []
    /// Reset descriptor pools from a recycled batch, not yet in use.
    var poolsToReuse: [VkDescriptorPool] = []

    init(id: UInt64, commandBuffer: VkCommandBuffer) {
        self.id = id
        self.commandBuffer = commandBuffer
    }
}

/// A GPU timestamp written into a batch; its value is known once the batch has completed.
///
/// ```swift
/// let (start, end) = try device.record { rec -> (GPUTimestamp, GPUTimestamp) in
///     let s = try rec.timestamp()
///     try rec.dispatch(pipeline, bindings: bindings, groups: (64, 1, 1))   // the work to time
///     return (s, try rec.timestamp())
/// }
/// let seconds = try device.seconds(from: start, to: end)
/// ```
public final class GPUTimestamp: @unchecked Sendable {
    let index: Int
    weak var batch: Batch?
    /// Nanoseconds on the device's clock, once known.
    var nanoseconds: Double?
    init(index: Int, batch: Batch) { self.index = index; self.batch = batch }
}

/// A binding of (part of) a buffer to a storage-buffer slot of a pipeline.
public struct BufferBinding {
    public var buffer: Buffer
    public var offset: Int
    public var size: Int
    /// Whether the dispatch writes the buffer (readers of it then wait for this work).
    public var writes: Bool

    public init(_ buffer: Buffer, offset: Int = 0, size: Int? = nil, writes: Bool = false) {
        self.buffer = buffer
        self.offset = offset
        self.size = size ?? (buffer.size - offset)
        self.writes = writes
    }
}

/// One region of a buffer-to-buffer copy, in bytes.
public struct BufferCopyRegion: Sendable, Hashable {
    public var sourceOffset: Int, destinationOffset: Int, bytes: Int
    public init(sourceOffset: Int, destinationOffset: Int, bytes: Int) {
        self.sourceOffset = sourceOffset; self.destinationOffset = destinationOffset; self.bytes = bytes
    }
}

/// Records commands into the device's current batch. Obtained from ``Device/record(_:)``; valid
/// only inside that closure. A barrier separates consecutive commands, so each sees the
/// previous one's writes.
public struct CommandRecorder {
    let device: Device
    let batch: Batch

    private func barrier() {
        if batch.commandCount > 0 {
            var mb = VkMemoryBarrier()
            mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER
            mb.srcAccessMask = VkAccessFlags(VK_ACCESS_SHADER_WRITE_BIT.rawValue | VK_ACCESS_TRANSFER_WRITE_BIT.rawValue)
            mb.dstAccessMask = VkAccessFlags(VK_ACCESS_SHADER_READ_BIT.rawValue | VK_ACCESS_SHADER_WRITE_BIT.rawValue
                                             | VK_ACCESS_TRANSFER_READ_BIT.rawValue | VK_ACCESS_TRANSFER_WRITE_BIT.rawValue)
            let stages = VkPipelineStageFlags(VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT.rawValue | VK_PIPELINE_STAGE_TRANSFER_BIT.rawValue)
            vkCmdPipelineBarrier(batch.commandBuffer, stages, stages, 0, 1, &mb, 0, nil, 0, nil)
        }
        batch.commandCount += 1
    }

    private func use(_ buffer: Buffer, writes: Bool) {
        buffer.lastUse = batch
        if writes { buffer.lastWrite = batch }
        batch.retained.append(buffer)
    }

    /// Records a dispatch of `pipeline` over `groups` workgroups.
    ///
    /// With `overlapsPrevious`, no barrier separates it from the command recorded just before, so
    /// the GPU may run the two at once (the second's first workgroups fill the compute units the
    /// first's last ones leave idle). The caller promises that neither writes what the other
    /// reads or writes; the commands before the last barrier stay ordered before both. Under
    /// `VKFLEX_PROFILE` the barrier stays, so that each dispatch's time is its own.
    ///
    /// ```swift
    /// // Two dispatches that read the same buffers and write none of them (or each its own):
    /// try device.record { rec in
    ///     try rec.dispatch(pipeline, bindings: bindings, groups: (n, 1, 1))
    ///     try rec.dispatch(pipeline, bindings: bindings, groups: (n, 1, 1), overlapsPrevious: true)
    /// }
    /// ```
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func dispatch(_ pipeline: ComputePipeline, bindings: [BufferBinding], pushConstants: [UInt8] = [],
                         groups: (x: Int, y: Int, z: Int), overlapsPrevious: Bool = false) throws {
        guard bindings.count == pipeline.bindingCount else {
            throw FlexError.invalidArgument("pipeline \(pipeline.name) takes \(pipeline.bindingCount) buffers, got \(bindings.count)")
        }
        guard pushConstants.count == pipeline.pushConstantSize else {
            throw FlexError.invalidArgument("pipeline \(pipeline.name) takes \(pipeline.pushConstantSize) bytes of push constants, got \(pushConstants.count)")
        }
        let caps = device.capabilities
        for (i, b) in bindings.enumerated() {
            guard b.buffer.device === device else {
                throw FlexError.invalidArgument("binding \(i) of \(pipeline.name) is a buffer of another device")
            }
            guard b.offset >= 0, b.size > 0, b.offset + b.size <= b.buffer.size else {
                throw FlexError.invalidArgument("binding \(i) of \(pipeline.name): range \(b.offset)..<\(b.offset + b.size) is outside a buffer of \(b.buffer.size) bytes")
            }
            guard b.offset % caps.minStorageBufferOffsetAlignment == 0 else {
                throw FlexError.invalidArgument("binding \(i) of \(pipeline.name): offset \(b.offset) is not a multiple of the device's storage-buffer alignment \(caps.minStorageBufferOffsetAlignment)")
            }
            guard b.size <= caps.maxStorageBufferRange else {
                throw FlexError.limitExceeded("binding \(i) of \(pipeline.name) spans \(formatBytes(b.size)); \(caps.name) binds at most \(formatBytes(caps.maxStorageBufferRange)) per storage buffer")
            }
        }
        let maxGroups = caps.maxWorkgroupCount
        guard groups.x >= 1, groups.y >= 1, groups.z >= 1,
              groups.x <= maxGroups[0], groups.y <= maxGroups[1], groups.z <= maxGroups[2] else {
            throw FlexError.limitExceeded("dispatch of \(pipeline.name) over \(groups.x)x\(groups.y)x\(groups.z) workgroups is outside the device's limit \(maxGroups.map(String.init).joined(separator: "x"))")
        }
        let set = try device.allocateDescriptorSet(pipeline.setLayout, in: batch, bindings: bindings.count)
        if !bindings.isEmpty {
            var infos = bindings.map { b -> VkDescriptorBufferInfo in
                var info = VkDescriptorBufferInfo()
                info.buffer = b.buffer.handle
                info.offset = VkDeviceSize(b.offset)
                info.range = VkDeviceSize(b.size)
                return info
            }
            infos.withUnsafeMutableBufferPointer { ip in
                var writes = (0..<bindings.count).map { i -> VkWriteDescriptorSet in
                    var w = VkWriteDescriptorSet()
                    w.sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET
                    w.dstSet = set
                    w.dstBinding = UInt32(i)
                    w.descriptorCount = 1
                    w.descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER
                    w.pBufferInfo = UnsafePointer(ip.baseAddress! + i)
                    return w
                }
                vkUpdateDescriptorSets(device.handle, UInt32(writes.count), &writes, 0, nil)
            }
        }
        if overlapsPrevious && !device.profilesDispatches && batch.commandCount > 0 {
            batch.commandCount += 1
        } else {
            barrier()
        }
        // VKFLEX_PROFILE=1: timestamps around the dispatch, leaving a quarter of the batch's query
        // pool to the caller's own (``timestamp()`` throws past it).
        let profileStart = device.profilesDispatches && device.capabilities.timestamps && batch.queryCount + 2 <= 192 ? try timestamp() : nil
        let cb = batch.commandBuffer
        vkCmdBindPipeline(cb, VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.pipeline)
        var s: VkDescriptorSet? = set
        vkCmdBindDescriptorSets(cb, VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.layout, 0, 1, &s, 0, nil)
        if !pushConstants.isEmpty {
            pushConstants.withUnsafeBytes {
                vkCmdPushConstants(cb, pipeline.layout, VkShaderStageFlags(VK_SHADER_STAGE_COMPUTE_BIT.rawValue), 0, UInt32($0.count), $0.baseAddress)
            }
        }
        vkCmdDispatch(cb, UInt32(groups.x), UInt32(groups.y), UInt32(groups.z))
        if let profileStart { device.dispatchProfile.append((pipeline.name, profileStart, try timestamp())) }
        for b in bindings { use(b.buffer, writes: b.writes) }
        batch.retained.append(pipeline)
    }

    /// Records a buffer-to-buffer copy.
    public func copy(from source: Buffer, to destination: Buffer, bytes: Int, sourceOffset: Int = 0, destinationOffset: Int = 0) {
        barrier()
        var region = VkBufferCopy(srcOffset: VkDeviceSize(sourceOffset), dstOffset: VkDeviceSize(destinationOffset), size: VkDeviceSize(bytes))
        vkCmdCopyBuffer(batch.commandBuffer, source.handle, destination.handle, 1, &region)
        use(source, writes: false)
        use(destination, writes: true)
    }

    /// Records one copy of many regions between two buffers (none: nothing is recorded).
    public func copy(from source: Buffer, to destination: Buffer, regions: [BufferCopyRegion]) {
        guard !regions.isEmpty else { return }
        barrier()
        var vk = regions.map { VkBufferCopy(srcOffset: VkDeviceSize($0.sourceOffset), dstOffset: VkDeviceSize($0.destinationOffset), size: VkDeviceSize($0.bytes)) }
        vkCmdCopyBuffer(batch.commandBuffer, source.handle, destination.handle, UInt32(vk.count), &vk)
        use(source, writes: false)
        use(destination, writes: true)
    }

    /// Records a fill of `bytes` bytes (a multiple of 4) with a 32-bit pattern.
    public func fill(_ buffer: Buffer, pattern: UInt32, offset: Int = 0, bytes: Int) {
        barrier()
        vkCmdFillBuffer(batch.commandBuffer, buffer.handle, VkDeviceSize(offset), VkDeviceSize(bytes.roundedUp(to: 4)), pattern)
        use(buffer, writes: true)
    }

    /// Records a GPU timestamp after all previous commands of the batch.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func timestamp() throws -> GPUTimestamp {
        guard device.capabilities.timestamps else { throw FlexError.unsupported("\(device.capabilities.name) has no compute timestamps") }
        if batch.queryPool == nil {
            var info = VkQueryPoolCreateInfo()
            info.sType = VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO
            info.queryType = VK_QUERY_TYPE_TIMESTAMP
            info.queryCount = 256
            var pool: VkQueryPool?
            try check(vkCreateQueryPool(device.handle, &info, nil, &pool), "vkCreateQueryPool")
            batch.queryPool = pool
            vkCmdResetQueryPool(batch.commandBuffer, pool, 0, 256)
        }
        guard batch.queryCount < 256 else { throw FlexError.limitExceeded("more than 256 timestamps in one batch") }
        let index = batch.queryCount
        batch.queryCount += 1
        vkCmdWriteTimestamp(batch.commandBuffer, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, batch.queryPool, UInt32(index))
        let ts = GPUTimestamp(index: index, batch: batch)
        batch.timestamps.append(ts)
        return ts
    }
}

extension Device {
    /// Records commands into the current batch (creating one if needed) and returns what `body`
    /// returns. The batch is submitted by ``flush()``, by a read that needs its results, by
    /// ``synchronize()``, or once it holds `maxCommandsPerBatch` commands.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    @discardableResult
    public func record<R>(_ body: (CommandRecorder) throws -> R) throws -> R {
        lock.lock()
        defer { lock.unlock() }
        let batch = try currentBatchLocked()
        let result = try body(CommandRecorder(device: self, batch: batch))
        if batch.commandCount >= options.maxCommandsPerBatch { try submitLocked(batch) }
        return result
    }

    /// Whether commands are recorded but not yet submitted (they go out with the next read,
    /// ``flush()`` or ``synchronize()``).
    public var hasUnsubmittedWork: Bool { lock.withLock { recording != nil } }

    /// Submits the batch being recorded, if any. Returns at once.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func flush() throws {
        try lock.withLock {
            if let batch = recording { try submitLocked(batch) }
        }
    }

    /// Waits until all work recorded so far has completed.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func synchronize() throws {
        let pending: [Batch] = try lock.withLock {
            if let batch = recording { try submitLocked(batch) }
            return inFlight
        }
        for batch in pending { try wait(for: batch) }
    }

    /// With `VKFLEX_PROFILE=1`, the device time of the dispatches recorded since the last call,
    /// summed per shader (the pipeline name up to its defines), longest first; waits for them.
    /// Empty without `VKFLEX_PROFILE=1` or timestamps.
    ///
    /// ```swift
    /// // VKFLEX_PROFILE=1 in the environment
    /// _ = try device.takeDispatchProfile()          // drop what came before
    /// for _ in 0..<10 { _ = try flexAttention(q, k, v) }
    /// for p in try device.takeDispatchProfile() { print(p.shader, p.seconds / 10, p.dispatches / 10) }
    /// ```
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when waiting for a batch fails.
    public func takeDispatchProfile() throws -> [(shader: String, seconds: Double, dispatches: Int)] {
        let taken = lock.withLock { () -> [(name: String, start: GPUTimestamp, end: GPUTimestamp)] in
            defer { dispatchProfile = [] }
            return dispatchProfile
        }
        var sums: [String: (Double, Int)] = [:]
        for d in taken {
            let shader = String(d.name.prefix { $0 != " " && $0 != "[" })
            let t = try seconds(from: d.start, to: d.end)
            sums[shader, default: (0, 0)].0 += t
            sums[shader, default: (0, 0)].1 += 1
        }
        return sums.map { (shader: $0.key, seconds: $0.value.0, dispatches: $0.value.1) }.sorted { $0.seconds > $1.seconds }
    }

    /// The elapsed device time between two timestamps, in seconds; waits for their batches.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func seconds(from start: GPUTimestamp, to end: GPUTimestamp) throws -> Double {
        for ts in [start, end] { if let b = ts.batch { try wait(for: b) } }
        guard let s = start.nanoseconds, let e = end.nanoseconds else {
            throw FlexError.invalidArgument("timestamp results are not available")
        }
        return (e - s) * 1e-9
    }

    func waitForWrites(to buffer: Buffer) throws {
        if let b = lock.withLock({ buffer.lastWrite }) { try wait(for: b) }
    }

    func writesCompleted(to buffer: Buffer) -> Bool {
        lock.withLock {
            guard let batch = buffer.lastWrite, !batch.completed else { return true }
            guard batch.submitted else { return false }
            try? reapLocked()   // fence status only: never waits
            return batch.completed
        }
    }

    func waitForUse(of buffer: Buffer) throws {
        if let b = lock.withLock({ buffer.lastUse }) { try wait(for: b) }
    }

    func wait(for batch: Batch) throws {
        let fence: VkFence? = try lock.withLock {
            if batch.completed { return nil }
            if !batch.submitted { try submitLocked(batch) }
            return batch.fence
        }
        guard let fence else { return }
        var f: VkFence? = fence
        while true {
            let r = vkWaitForFences(handle, 1, &f, VkBool32(VK_TRUE), 1_000_000_000)
            if r == VK_SUCCESS { break }
            if r != VK_TIMEOUT { try check(r, "vkWaitForFences") }
        }
        try lock.withLock { try reapLocked() }
    }

    // MARK: - Locked helpers

    private func currentBatchLocked() throws -> Batch {
        if let recording { return recording }
        var cb: VkCommandBuffer?
        var recycled: RecycledBatch?
        if let r = spareBatches.popLast() {
            recycled = r
            cb = r.commandBuffer
        } else {
            var info = VkCommandBufferAllocateInfo()
            info.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO
            info.commandPool = commandPool
            info.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY
            info.commandBufferCount = 1
            try check(vkAllocateCommandBuffers(handle, &info, &cb), "vkAllocateCommandBuffers")
        }
        var begin = VkCommandBufferBeginInfo()
        begin.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO
        begin.flags = VkCommandBufferUsageFlags(VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT.rawValue)
        try check(vkBeginCommandBuffer(cb, &begin), "vkBeginCommandBuffer")
        let batch = Batch(id: nextBatchID, commandBuffer: cb!)
        if let recycled {
            batch.fence = recycled.fence
            batch.descriptorPools = recycled.descriptorPools
            batch.setsLeftInPool = recycled.descriptorPools.isEmpty ? 0 : 64
            batch.poolsToReuse = Array(recycled.descriptorPools.dropLast())
        }
        nextBatchID += 1
        recording = batch
        return batch
    }

    private func submitLocked(_ batch: Batch) throws {
        guard !batch.submitted else { return }
        // Make the batch's writes visible to the host once its fence signals.
        var mb = VkMemoryBarrier()
        mb.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER
        mb.srcAccessMask = VkAccessFlags(VK_ACCESS_SHADER_WRITE_BIT.rawValue | VK_ACCESS_TRANSFER_WRITE_BIT.rawValue)
        mb.dstAccessMask = VkAccessFlags(VK_ACCESS_HOST_READ_BIT.rawValue)
        vkCmdPipelineBarrier(batch.commandBuffer,
                             VkPipelineStageFlags(VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT.rawValue | VK_PIPELINE_STAGE_TRANSFER_BIT.rawValue),
                             VkPipelineStageFlags(VK_PIPELINE_STAGE_HOST_BIT.rawValue), 0, 1, &mb, 0, nil, 0, nil)
        try check(vkEndCommandBuffer(batch.commandBuffer), "vkEndCommandBuffer")
        var fence: VkFence? = batch.fence
        if fence == nil {
            var fenceInfo = VkFenceCreateInfo()
            fenceInfo.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO
            try check(vkCreateFence(handle, &fenceInfo, nil, &fence), "vkCreateFence")
            batch.fence = fence
        }
        var cb: VkCommandBuffer? = batch.commandBuffer
        let result: VkResult = withUnsafePointer(to: &cb) { cbp in
            var submit = VkSubmitInfo()
            submit.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO
            submit.commandBufferCount = 1
            submit.pCommandBuffers = cbp
            return vkQueueSubmit(queue, 1, &submit, fence)
        }
        if recording === batch { recording = nil }
        batch.submitted = true
        inFlight.append(batch)
        try check(result, "vkQueueSubmit")
    }

    private func reapLocked() throws {
        var remaining: [Batch] = []
        for batch in inFlight {
            guard let fence = batch.fence, vkGetFenceStatus(handle, fence) == VK_SUCCESS else {
                remaining.append(batch)
                continue
            }
            if let pool = batch.queryPool {
                if batch.queryCount > 0 {
                    var values = [UInt64](repeating: 0, count: batch.queryCount)
                    let r = vkGetQueryPoolResults(handle, pool, 0, UInt32(batch.queryCount), values.count * 8, &values, 8,
                                                  VkQueryResultFlags(VK_QUERY_RESULT_64_BIT.rawValue | VK_QUERY_RESULT_WAIT_BIT.rawValue))
                    if r == VK_SUCCESS {
                        for ts in batch.timestamps { ts.nanoseconds = Double(values[ts.index]) * capabilities.timestampPeriodNs }
                    }
                }
                vkDestroyQueryPool(handle, pool, nil)
            }
            // Keep the command buffer, fence and descriptor pools for the next batch.
            var f: VkFence? = fence
            var reusable = vkResetFences(handle, 1, &f) == VK_SUCCESS
                && vkResetCommandBuffer(batch.commandBuffer, 0) == VK_SUCCESS
            for pool in batch.descriptorPools where vkResetDescriptorPool(handle, pool, 0) != VK_SUCCESS { reusable = false }
            if reusable && spareBatches.count < 8 {
                spareBatches.append(RecycledBatch(commandBuffer: batch.commandBuffer, fence: fence, descriptorPools: batch.descriptorPools))
            } else {
                vkDestroyFence(handle, fence, nil)
                var cb: VkCommandBuffer? = batch.commandBuffer
                vkFreeCommandBuffers(handle, commandPool, 1, &cb)
                for pool in batch.descriptorPools { vkDestroyDescriptorPool(handle, pool, nil) }
            }
            batch.fence = nil
            batch.descriptorPools = []
            batch.completed = true
            batch.retained = []
        }
        inFlight = remaining
    }

    func allocateDescriptorSet(_ layout: VkDescriptorSetLayout, in batch: Batch, bindings: Int) throws -> VkDescriptorSet {
        if batch.setsLeftInPool == 0, let reuse = batch.poolsToReuse.popLast() {
            // A recycled pool (already reset) becomes the current one.
            batch.descriptorPools.removeAll { $0 == reuse }
            batch.descriptorPools.append(reuse)
            batch.setsLeftInPool = 64
        }
        if batch.setsLeftInPool == 0 {
            let sets = 64
            var size = VkDescriptorPoolSize(type: VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, descriptorCount: UInt32(sets * 16))
            var info = VkDescriptorPoolCreateInfo()
            info.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO
            info.maxSets = UInt32(sets)
            info.poolSizeCount = 1
            var pool: VkDescriptorPool?
            let r = withUnsafePointer(to: &size) { sp in
                info.pPoolSizes = sp
                return vkCreateDescriptorPool(handle, &info, nil, &pool)
            }
            try check(r, "vkCreateDescriptorPool")
            batch.descriptorPools.append(pool!)
            batch.setsLeftInPool = sets
        }
        batch.setsLeftInPool -= 1
        var l: VkDescriptorSetLayout? = layout
        var info = VkDescriptorSetAllocateInfo()
        info.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO
        info.descriptorPool = batch.descriptorPools.last
        info.descriptorSetCount = 1
        var set: VkDescriptorSet?
        let r = withUnsafePointer(to: &l) { lp in
            info.pSetLayouts = lp
            return vkAllocateDescriptorSets(handle, &info, &set)
        }
        try check(r, "vkAllocateDescriptorSets")
        return set!
    }
}

/// The Vulkan objects of a completed batch, reset and kept for the next one.
struct RecycledBatch {
    let commandBuffer: VkCommandBuffer
    let fence: VkFence
    let descriptorPools: [VkDescriptorPool]
}
