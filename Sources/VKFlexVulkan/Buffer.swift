import CVulkan
import Foundation

/// A storage buffer on a ``Device``: device-local memory, mapped directly when the device's memory
/// is unified (lavapipe, integrated GPUs), uploaded and read back through staging buffers otherwise.
///
/// A buffer stays alive until the last GPU work that uses it has completed, even when the caller
/// lets go of it earlier: each batch retains the buffers it uses.
///
/// ```swift
/// let buffer = try device.makeBuffer(bytes: 4 * 1024)
/// try buffer.upload([Float](repeating: 2, count: 1024))
/// let back: [Float] = try buffer.download(count: 1024)
/// ```
public final class Buffer: @unchecked Sendable {
    public let device: Device
    /// The `VkBuffer` (interop).
    public let handle: VkBuffer
    let memory: VkDeviceMemory?
    /// Size in bytes.
    public let size: Int
    /// The host address when the memory is mapped (unified memory), else `nil`.
    let mapped: UnsafeMutableRawPointer?
    let owned: Bool
    /// The size class this buffer was allocated with, when it goes back to the device's pool.
    var poolClass: BufferPool.Class?
    /// The GPU address when buffer device addresses are enabled.
    public let deviceAddress: UInt64?
    /// The last batch that wrote the buffer and the last that used it (guarded by the device lock).
    var lastWrite: Batch?
    var lastUse: Batch?

    /// Whether every write recorded to this buffer so far has completed on the device, without
    /// waiting (work recorded but not yet submitted has not).
    public var writesCompleted: Bool { device.writesCompleted(to: self) }

    /// Hands the Vulkan objects to another Buffer: this one no longer frees them.
    func disown() { isOwner = false }
    private var isOwner = true

    init(device: Device, handle: VkBuffer, memory: VkDeviceMemory?, size: Int, mapped: UnsafeMutableRawPointer?,
         owned: Bool, deviceAddress: UInt64?) {
        self.device = device
        self.handle = handle
        self.memory = memory
        self.size = size
        self.mapped = mapped
        self.owned = owned
        self.deviceAddress = deviceAddress
    }

    deinit {
        guard owned, isOwner else { return }
        if let poolClass, let memory, device.bufferPool.give(BufferPool.Entry(buffer: handle, memory: memory, mapped: mapped, address: deviceAddress), to: poolClass) {
            return
        }
        vkDestroyBuffer(device.handle, handle, nil)
        if let memory {
            vkFreeMemory(device.handle, memory, nil)
            device.bufferPool.countFree()
        }
    }

    /// Copies `values` into the buffer at `byteOffset`. Waits for GPU work still using the buffer
    /// when writing through a mapping; otherwise the copy is ordered after that work on the queue.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func upload<T>(_ values: [T], byteOffset: Int = 0) throws {
        try values.withUnsafeBytes { try upload(bytes: $0, byteOffset: byteOffset) }
    }

    /// Copies raw bytes into the buffer at `byteOffset`.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func upload(bytes: UnsafeRawBufferPointer, byteOffset: Int = 0) throws {
        guard byteOffset >= 0, byteOffset + bytes.count <= size else {
            throw FlexError.invalidArgument("upload of \(bytes.count) bytes at offset \(byteOffset) overruns a buffer of \(size) bytes")
        }
        guard bytes.count > 0, let base = bytes.baseAddress else { return }
        if let mapped {
            try device.waitForUse(of: self)
            mapped.advanced(by: byteOffset).copyMemory(from: base, byteCount: bytes.count)
            return
        }
        let staging = try device.makeBuffer(bytes: bytes.count, hostVisible: true)
        staging.mapped!.copyMemory(from: base, byteCount: bytes.count)
        try device.record { rec in
            rec.copy(from: staging, to: self, bytes: bytes.count, sourceOffset: 0, destinationOffset: byteOffset)
        }
    }

    /// Reads `count` values of `T` starting at `byteOffset`, after the work that writes the buffer completes.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func download<T>(count: Int, as type: T.Type = T.self, byteOffset: Int = 0) throws -> [T] {
        let bytes = count * MemoryLayout<T>.stride
        guard byteOffset >= 0, byteOffset + bytes <= size else {
            throw FlexError.invalidArgument("download of \(bytes) bytes at offset \(byteOffset) overruns a buffer of \(size) bytes")
        }
        var result = [T]()
        result.reserveCapacity(count)
        try withUnsafeTemporaryAllocation(byteCount: max(bytes, 1), alignment: 16) { tmp in
            try download(into: UnsafeMutableRawBufferPointer(rebasing: tmp[0..<bytes]), byteOffset: byteOffset)
            result.append(contentsOf: UnsafeRawBufferPointer(rebasing: tmp[0..<bytes]).bindMemory(to: T.self))
        }
        return result
    }

    /// Reads raw bytes starting at `byteOffset` into `destination`.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func download(into destination: UnsafeMutableRawBufferPointer, byteOffset: Int = 0) throws {
        guard destination.count > 0, let dst = destination.baseAddress else { return }
        if let mapped {
            try device.waitForWrites(to: self)
            dst.copyMemory(from: mapped.advanced(by: byteOffset), byteCount: destination.count)
            return
        }
        let staging = try device.makeBuffer(bytes: destination.count, hostVisible: true)
        let batch = try device.record { rec in
            rec.copy(from: self, to: staging, bytes: destination.count, sourceOffset: byteOffset, destinationOffset: 0)
            return rec.batch
        }
        try device.wait(for: batch)
        dst.copyMemory(from: staging.mapped!, byteCount: destination.count)
    }

    /// Fills `bytes` bytes from `byteOffset` with a repeated 32-bit pattern, on the GPU queue.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func fill(pattern: UInt32, byteOffset: Int = 0, bytes: Int? = nil) throws {
        let count = bytes ?? (size - byteOffset)
        try device.record { rec in rec.fill(self, pattern: pattern, offset: byteOffset, bytes: count) }
    }
}

extension Device {
    /// Allocates a storage buffer of `bytes` bytes (at least 4).
    ///
    /// Throws ``FlexError/limitExceeded(_:)`` before calling the driver when the size is over the
    /// device's largest allocation or memory heap.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func makeBuffer(bytes: Int, hostVisible: Bool = false) throws -> Buffer {
        guard bytes >= 0 else { throw FlexError.invalidArgument("buffer size \(bytes) is negative") }
        // Freed buffers are kept for reuse by size class: small ones (parameters, error flags,
        // masks) always, large ones (a backward's gradients, a step's scratch) up to the cache's
        // limit. An allocation can cost far more than the work: a backward call that allocated
        // three 256 MiB gradients spent 12.6-17.2 ms of host time on an H100, 2026-12-07.
        let cls = BufferPool.Class(bytes: bytes, hostVisible: hostVisible)
        guard cls.bytes <= capabilities.maxMemoryAllocation else { return try allocateBuffer(bytes: bytes, hostVisible: hostVisible) }
        if let e = bufferPool.take(cls) {
            let b = Buffer(device: self, handle: e.buffer, memory: e.memory, size: max(bytes, 4).roundedUp(to: 4),
                           mapped: e.mapped, owned: true, deviceAddress: e.address)
            b.poolClass = cls
            return b
        }
        let b: Buffer
        do {
            b = try allocateBuffer(bytes: cls.bytes, hostVisible: hostVisible)
        } catch FlexError.vulkan(_, let result) where (result == VK_ERROR_OUT_OF_DEVICE_MEMORY.rawValue || result == VK_ERROR_OUT_OF_HOST_MEMORY.rawValue)
                    && cachedBytes > 0 {
            // Out of memory with buffers held for reuse: free them and try once more.
            emptyCache()
            b = try allocateBuffer(bytes: cls.bytes, hostVisible: hostVisible)
        }
        let sized = Buffer(device: self, handle: b.handle, memory: b.memory, size: max(bytes, 4).roundedUp(to: 4),
                           mapped: b.mapped, owned: true, deviceAddress: b.deviceAddress)
        sized.poolClass = cls
        b.disown()
        return sized
    }

    /// Bytes of device memory in freed buffers the device keeps for reuse (small and large),
    /// not in use by any tensor.
    ///
    /// ```swift
    /// var scratch: Buffer? = try device.makeBuffer(bytes: 64 << 20)
    /// scratch = nil                 // kept once the device is done with it
    /// try device.synchronize()
    /// print(device.cachedBytes)     // 64 MiB, for the next buffer of that size
    /// ```
    public var cachedBytes: Int { bufferPool.cachedBytes }

    /// Frees the device memory of every buffer kept for reuse, as PyTorch's
    /// `torch.cuda.empty_cache()`: for another process, or before a phase with other sizes.
    /// Buffers still in use stay; an allocation that runs out of memory does this by itself first.
    ///
    /// ```swift
    /// device.emptyCache()
    /// print(device.cachedBytes)   // 0
    /// ```
    public func emptyCache() {
        for e in bufferPool.takeAll() {
            vkDestroyBuffer(handle, e.buffer, nil)
            vkFreeMemory(handle, e.memory, nil)
            bufferPool.countFree()
        }
    }

    func allocateBuffer(bytes: Int, hostVisible: Bool) throws -> Buffer {
        let size = max(bytes, 4).roundedUp(to: 4)
        let caps = capabilities
        if size > caps.maxMemoryAllocation {
            throw FlexError.limitExceeded("cannot allocate \(formatBytes(size)): \(caps.name) allows at most \(formatBytes(caps.maxMemoryAllocation)) in one allocation")
        }
        var info = VkBufferCreateInfo()
        info.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO
        info.size = VkDeviceSize(size)
        var usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT.rawValue | VK_BUFFER_USAGE_TRANSFER_SRC_BIT.rawValue | VK_BUFFER_USAGE_TRANSFER_DST_BIT.rawValue
        if enabledFeatures.bufferDeviceAddress { usage |= VK_BUFFER_USAGE_SHADER_DEVICE_ADDRESS_BIT.rawValue }
        info.usage = VkBufferUsageFlags(usage)
        info.sharingMode = VK_SHARING_MODE_EXCLUSIVE
        var buffer: VkBuffer?
        try check(vkCreateBuffer(handle, &info, nil, &buffer), "vkCreateBuffer")
        guard let buffer else { throw FlexError.vulkan(call: "vkCreateBuffer", result: VK_ERROR_UNKNOWN.rawValue) }
        var requirements = VkMemoryRequirements()
        vkGetBufferMemoryRequirements(handle, buffer, &requirements)

        let hostFlags = VkMemoryPropertyFlags(VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT.rawValue | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT.rawValue)
        let local = VkMemoryPropertyFlags(VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT.rawValue)
        let wantHost = hostVisible || caps.unifiedMemory
        let choice = wantHost
            ? memoryTypeIndex(bits: requirements.memoryTypeBits, required: hostFlags,
                              preferred: hostVisible && !caps.unifiedMemory ? VkMemoryPropertyFlags(VK_MEMORY_PROPERTY_HOST_CACHED_BIT.rawValue) : local)
            : memoryTypeIndex(bits: requirements.memoryTypeBits, required: local)
        guard let choice else {
            vkDestroyBuffer(handle, buffer, nil)
            throw FlexError.unsupported("no memory type fits a storage buffer on \(caps.name)")
        }
        let heap = heapSize(ofType: choice.index)
        if Int(requirements.size) > heap {
            vkDestroyBuffer(handle, buffer, nil)
            throw FlexError.limitExceeded("cannot allocate \(formatBytes(size)): the memory heap of \(caps.name) holds \(formatBytes(heap))")
        }
        var flagsInfo = VkMemoryAllocateFlagsInfo()
        flagsInfo.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_FLAGS_INFO
        flagsInfo.flags = VkMemoryAllocateFlags(VK_MEMORY_ALLOCATE_DEVICE_ADDRESS_BIT.rawValue)
        var memory: VkDeviceMemory?
        let allocResult: VkResult = withUnsafePointer(to: &flagsInfo) { fp in
            var alloc = VkMemoryAllocateInfo()
            alloc.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO
            alloc.allocationSize = requirements.size
            alloc.memoryTypeIndex = choice.index
            if enabledFeatures.bufferDeviceAddress { alloc.pNext = UnsafeRawPointer(fp) }
            return vkAllocateMemory(handle, &alloc, nil, &memory)
        }
        guard allocResult == VK_SUCCESS, let memory else {
            vkDestroyBuffer(handle, buffer, nil)
            throw FlexError.vulkan(call: "vkAllocateMemory(\(formatBytes(size)))", result: allocResult.rawValue)
        }
        let bindResult = vkBindBufferMemory(handle, buffer, memory, 0)
        guard bindResult == VK_SUCCESS else {
            vkDestroyBuffer(handle, buffer, nil)
            vkFreeMemory(handle, memory, nil)
            throw FlexError.vulkan(call: "vkBindBufferMemory", result: bindResult.rawValue)
        }
        var mapped: UnsafeMutableRawPointer?
        if choice.flags & hostFlags == hostFlags {
            let mapResult = vkMapMemory(handle, memory, 0, VkDeviceSize(VK_WHOLE_SIZE), 0, &mapped)
            if mapResult != VK_SUCCESS {
                vkDestroyBuffer(handle, buffer, nil)
                vkFreeMemory(handle, memory, nil)
                throw FlexError.vulkan(call: "vkMapMemory", result: mapResult.rawValue)
            }
        }
        var address: UInt64?
        if enabledFeatures.bufferDeviceAddress {
            var ai = VkBufferDeviceAddressInfo()
            ai.sType = VK_STRUCTURE_TYPE_BUFFER_DEVICE_ADDRESS_INFO
            ai.buffer = buffer
            address = vkGetBufferDeviceAddress(handle, &ai)
        }
        bufferPool.countAllocation()
        return Buffer(device: self, handle: buffer, memory: memory, size: size, mapped: mapped, owned: true, deviceAddress: address)
    }

    /// The device-memory allocations vkflex holds now: buffers in use and freed small ones kept
    /// for reuse. A driver caps them (`maxMemoryAllocationCount`, 4096 on NVIDIA), so a loop whose
    /// count grows step after step will fail; a steady loop's stays flat.
    ///
    /// ```swift
    /// let before = device.liveAllocations
    /// for _ in 0..<100 { _ = try flexAttention(q, k, v, scoreMod: scoreMod, out: out) }
    /// try device.synchronize()
    /// print(device.liveAllocations - before)   // a few, not 100
    /// ```
    public var liveAllocations: Int { bufferPool.liveAllocations }

    /// The largest buffer `makeBuffer` always takes from (and returns to) its pool of freed
    /// buffers; a larger one is reused only while the large-buffer cache has room
    /// (``Options/bufferCacheBytes``), else it is a new device-memory allocation, which costs
    /// hundreds of microseconds of host time (an H100, 2026-12-06: a split-KV call whose 17.3 MB
    /// of partials missed the pool took 415 µs of host time against 42 µs at 16 MiB). Scratch a
    /// call makes every time should stay within it.
    ///
    /// ```swift
    /// let rowBytes = 4 * 1024 * 128   // float32 partials of 1,024 rows at Dv = 128
    /// let splits = max(1, min(32, Device.maxPooledBufferBytes / rowBytes))
    /// let scratch = try device.makeBuffer(bytes: splits * rowBytes)   // reused call after call
    /// ```
    public static var maxPooledBufferBytes: Int { BufferPool.maxPooledBytes }

    /// Wraps a `VkBuffer` that an engine owns (interop). vkflex never destroys it; `size` is the
    /// number of bytes it may use. The buffer must have been created with storage-buffer and
    /// transfer usage. Reads and writes go through the queue (it is not mapped).
    public func wrapBuffer(_ buffer: VkBuffer, size: Int) -> Buffer {
        Buffer(device: self, handle: buffer, memory: nil, size: size, mapped: nil, owned: false, deviceAddress: nil)
    }
}

/// "1.5 GiB", "128 MiB", "512 B".
public func formatBytes(_ bytes: Int) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
    if unit == 0 { return "\(bytes) B" }
    let rounded = (value * 10).rounded() / 10
    return rounded == rounded.rounded() ? "\(Int(rounded)) \(units[unit])" : "\(rounded) \(units[unit])"
}

/// Freed buffers, by size class, for reuse. Small ones (up to `maxPooledBytes`, power-of-two
/// classes): at most `perClass` a class. Large ones (2 MiB classes, so a training loop's tensors
/// of one shape find their own again): at most `largeLimit` bytes in all.
final class BufferPool: @unchecked Sendable {
    static let maxPooledBytes = 16 << 20
    static let perClass = 32
    static let largeGranule = 2 << 20

    struct Class: Hashable {
        let bytes: Int
        let hostVisible: Bool
        init(bytes: Int, hostVisible: Bool) {
            if bytes <= BufferPool.maxPooledBytes {
                var n = 256
                while n < bytes { n <<= 1 }
                self.bytes = n
            } else {
                self.bytes = (bytes + BufferPool.largeGranule - 1) / BufferPool.largeGranule * BufferPool.largeGranule
            }
            self.hostVisible = hostVisible
        }
        var isLarge: Bool { bytes > BufferPool.maxPooledBytes }
    }

    init(largeLimit: Int) { self.largeLimit = largeLimit }
    /// Bytes of large buffers kept at most.
    let largeLimit: Int
    private var held = 0   // bytes of every kept buffer
    private var heldLarge = 0

    struct Entry {
        let buffer: VkBuffer
        let memory: VkDeviceMemory
        let mapped: UnsafeMutableRawPointer?
        let address: UInt64?
    }

    private let lock = NSLock()
    private var free: [Class: [Entry]] = [:]
    private var closed = false
    private var live = 0

    /// Device-memory allocations made and not yet freed, pooled ones included.
    var liveAllocations: Int { lock.withLock { live } }
    func countAllocation() { lock.withLock { live += 1 } }
    func countFree() { lock.withLock { live -= 1 } }

    /// Bytes of the buffers kept for reuse.
    var cachedBytes: Int { lock.withLock { held } }

    func take(_ c: Class) -> Entry? {
        lock.withLock {
            guard let e = free[c]?.popLast() else { return nil }
            held -= c.bytes
            if c.isLarge { heldLarge -= c.bytes }
            return e
        }
    }

    /// Keeps `e` for reuse; false when the pool is full or closed (the caller frees it).
    func give(_ e: Entry, to c: Class) -> Bool {
        lock.withLock {
            guard !closed, free[c, default: []].count < BufferPool.perClass else { return false }
            if c.isLarge {
                guard heldLarge + c.bytes <= largeLimit else { return false }
                heldLarge += c.bytes
            }
            held += c.bytes
            free[c, default: []].append(e)
            return true
        }
    }

    /// Every kept buffer, no longer kept (the caller frees them).
    func takeAll() -> [Entry] {
        lock.withLock {
            defer { free = [:]; held = 0; heldLarge = 0 }
            return free.values.flatMap { $0 }
        }
    }

    func drain(_ device: VkDevice) {
        lock.withLock { closed = true }
        let all = takeAll()
        for e in all {
            vkDestroyBuffer(device, e.buffer, nil)
            vkFreeMemory(device, e.memory, nil)
        }
        lock.withLock { live -= all.count }
    }
}
