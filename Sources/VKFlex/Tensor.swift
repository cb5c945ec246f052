import CVulkan
import Foundation
import VKFlexExpr
import VKFlexVulkan

/// Element types of tensors.
public enum DType: String, Sendable, CaseIterable, Codable {
    case float32, float16, bfloat16, int32

    /// Bytes per element.
    public var size: Int { self == .float16 || self == .bfloat16 ? 2 : 4 }

    /// Whether the elements are floating point.
    public var isFloat: Bool { self != .int32 }
}

/// An n-dimensional array in a device buffer: a shape, strides (in elements) and a dtype.
///
/// ```swift
/// let q = try device.tensor(values, shape: [1, 8, 1024, 64], dtype: .float16)
/// let bshd = try device.tensor(values, shape: [B, S, H, D])          // the layout models keep
/// let bhsd = try bshd.permuted(0, 2, 1, 3)                           // a view: no copy
/// let out: [Float] = try q.toArray()
/// ```
///
/// Work that writes a tensor is enqueued; reading it (``toArray()``) waits only for that work.
/// A tensor captured by a mod (`docs[q]`) is bound to the kernel as a buffer.
public final class Tensor: @unchecked Sendable, Capturable, CaptureValuesProvider, CustomStringConvertible {
    public let device: Device
    public let buffer: Buffer
    /// Offset of element 0 in the buffer, in bytes.
    public let byteOffset: Int
    public let shape: [Int]
    /// Strides in elements.
    public let strides: [Int]
    public let dtype: DType
    private let checkLock = NSLock()
    private var checks: [ErrorCheck] = []
    /// A name for messages (captured tensors are named by it); defaults to `tensor<N>`.
    public var name: String
    let id: Int

    init(device: Device, buffer: Buffer, byteOffset: Int, shape: [Int], strides: [Int], dtype: DType, name: String?) {
        self.device = device
        self.buffer = buffer
        self.byteOffset = byteOffset
        self.shape = shape
        self.strides = strides
        self.dtype = dtype
        self.id = CaptureInfo.newID()
        self.name = name ?? "tensor\(id)"
    }

    /// A binding of the bytes this (contiguous) tensor covers.
    func binding(writes: Bool = false) -> BufferBinding {
        if writes { checkLock.withLock { hostInt32 = nil } }
        return BufferBinding(buffer, offset: byteOffset, size: max(4, count * dtype.size), writes: writes)
    }

    /// The values of an int32 tensor the host gave it (``Device/tensor(_:shape:name:)``,
    /// ``copy(from:)``), until a kernel writes it: key lengths, offsets and page tables are then
    /// checked without a read-back (a wait). A write into its `buffer` by other means is not seen.
    private var hostInt32: [Int32]?

    func rememberHostValues(_ values: [Int32]) { checkLock.withLock { hostInt32 = values } }

    /// The int32 values, from the host's copy where there is one, else read back.
    func int32Values() throws -> [Int32] {
        if let known = checkLock.withLock({ hostInt32 }) { return known }
        return try toInt32Array()
    }

    /// Row-major strides for `shape`.
    public static func contiguousStrides(_ shape: [Int]) -> [Int] {
        var strides = [Int](repeating: 1, count: shape.count)
        for d in stride(from: shape.count - 2, through: 0, by: -1) { strides[d] = strides[d + 1] * shape[d + 1] }
        return strides
    }

    public var count: Int { shape.reduce(1, *) }
    public var rank: Int { shape.count }
    public var isContiguous: Bool { strides == Tensor.contiguousStrides(shape) || count <= 1 }

    /// The bytes from the first to one past the last element this view touches.
    var byteSpan: (lower: Int, upper: Int) {
        guard count > 0 else { return (byteOffset, byteOffset) }
        var lo = 0, hi = 0
        for (n, s) in zip(shape, strides) {
            if s >= 0 { hi += (n - 1) * s } else { lo += (n - 1) * s }
        }
        return (byteOffset + lo * dtype.size, byteOffset + (hi + 1) * dtype.size)
    }

    public var description: String { "Tensor(\(name), shape: \(shape), dtype: \(dtype.rawValue)\(isContiguous ? "" : ", strides: \(strides)"))" }

    /// A view with dimensions reordered: `permuted(0, 2, 1, 3)` turns `[B, S, H, D]` into `[B, H, S, D]`.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func permuted(_ order: Int...) throws -> Tensor {
        guard order.sorted() == Array(0..<rank) else {
            throw FlexError("permuted\(order) is not a permutation of the \(rank) dimensions of \(name)")
        }
        return Tensor(device: device, buffer: buffer, byteOffset: byteOffset, shape: order.map { shape[$0] },
                      strides: order.map { strides[$0] }, dtype: dtype, name: name)
    }

    /// A view of the same buffer with any shape, strides (elements) and offset (PyTorch's
    /// `as_strided`); it must stay inside the buffer.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func asStrided(shape: [Int], strides: [Int], byteOffset: Int? = nil) throws -> Tensor {
        guard shape.count == strides.count else { throw FlexError("asStrided: \(shape.count) sizes but \(strides.count) strides") }
        let t = Tensor(device: device, buffer: buffer, byteOffset: byteOffset ?? self.byteOffset, shape: shape, strides: strides, dtype: dtype, name: name)
        let (lo, hi) = t.byteSpan
        guard lo >= 0, hi <= buffer.size else { throw FlexError("asStrided: the view spans bytes \(lo)..<\(hi) of a \(buffer.size)-byte buffer") }
        guard t.byteOffset % dtype.size == 0 else { throw FlexError("asStrided: offset \(t.byteOffset) is not a multiple of the element size") }
        return t
    }

    /// A view of the same elements with another shape (the tensor must be contiguous).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func reshaped(_ newShape: [Int]) throws -> Tensor {
        guard isContiguous else { throw FlexError("reshaped: \(name) is not contiguous") }
        guard newShape.reduce(1, *) == count, newShape.allSatisfy({ $0 >= 0 }) else {
            throw FlexError("cannot reshape \(name) of shape \(shape) (\(count) elements) to \(newShape)")
        }
        return Tensor(device: device, buffer: buffer, byteOffset: byteOffset, shape: newShape,
                      strides: Tensor.contiguousStrides(newShape), dtype: dtype, name: name)
    }

    // MARK: Reading

    /// The elements in row-major order of the shape, as Float; waits for the work that writes the tensor.
    ///
    /// - Throws: ``FlexError/modFailed(_:)`` when a kernel that wrote the tensor reported a mod failure (a captured index out of range, an integer division by zero); ``FlexError/vulkan(call:result:)`` when the device fails.
    public func toArray() throws -> [Float] {
        switch dtype {
        case .float32: return try gather(Float.self) { $0 }
        case .float16: return try gather(Float16.self) { Float($0) }
        case .bfloat16: return try gather(UInt16.self) { Float(bfloat16Bits: $0) }
        case .int32: return try gather(Int32.self) { Float($0) }
        }
    }

    /// Overwrites the tensor's values in place (row-major, converted to its dtype as
    /// ``Device/tensor(_:shape:dtype:name:)`` converts them), ordered after the work already
    /// enqueued that uses it: PyTorch's `copy_`. What a training loop does to a learnable capture
    /// after a step; the mods that capture it need no rebuilding.
    ///
    /// ```swift
    /// var w = try table.toArray()
    /// for (e, g) in try grads.gradient(of: table)!.toArray().enumerated() { w[e] -= 0.1 * g }
    /// try table.copy(from: w)
    /// ```
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` when `values` has not one value per element, the
    ///   tensor is a strided view, or an int32 tensor gets a non-integer.
    public func copy(from values: [Float]) throws {
        guard values.count == count else { throw FlexError("\(name) has \(count) elements; copy(from:) got \(values.count) values") }
        guard isContiguous else { throw FlexError("\(name) is a strided view; copy(from:) writes contiguous tensors") }
        switch dtype {
        case .float32: try buffer.upload(values, byteOffset: byteOffset)
        case .float16: try buffer.upload(values.map { Float16($0) }, byteOffset: byteOffset)
        case .bfloat16: try buffer.upload(values.map(\.bfloat16Bits), byteOffset: byteOffset)
        case .int32:
            guard values.allSatisfy({ $0 == $0.rounded() && abs($0) < 2_147_483_648 }) else {
                throw FlexError("\(name) is int32: copy(from:) takes integers in int32 range")
            }
            let ints = values.map { Int32($0) }
            try buffer.upload(ints, byteOffset: byteOffset)
            rememberHostValues(ints)
        }
    }

    /// The elements of an int32 tensor.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func toInt32Array() throws -> [Int32] {
        guard dtype == .int32 else { throw FlexError("\(name) is \(dtype.rawValue), not int32") }
        return try gather(Int32.self) { $0 }
    }

    /// Adds the error check of a kernel that writes this tensor. Once the tensor holds 8, those
    /// whose kernels completed clean are dropped first (their flags go back to the device's pool),
    /// so a tensor written call after call (`out:` in a loop) keeps a short list; one check is
    /// never kept twice.
    func addCheck(_ check: ErrorCheck) {
        // Pruned only past a few, so that most calls ask the device nothing. Settled checks are
        // found outside the tensor's lock: settledClean takes the device's, which a recording
        // thread holds while it binds tensors.
        let current = checkLock.withLock { checks }
        let settled = current.count < 8 ? [] : current.filter { $0 !== check && $0.settledClean }
        checkLock.withLock {
            checks.removeAll { c in settled.contains { $0 === c } }
            if !checks.contains(where: { $0 === check }) { checks.append(check) }
        }
    }

    /// The error checks a read of this tensor would run (for tests).
    var pendingCheckCount: Int { checkLock.withLock { checks.count } }

    /// Throws what the kernels that wrote this tensor reported (an out-of-range captured index,
    /// an integer division by zero); waits for them.
    ///
    /// - Throws: ``FlexError/modFailed(_:)`` with what a kernel reported.
    public func checkErrors() throws {
        let pending = checkLock.withLock { checks }
        for c in pending { try c.run() }
        // Each ran clean (and waited for its kernels): none of them has anything more to report.
        checkLock.withLock { checks.removeAll { c in pending.contains { $0 === c } } }
    }

    func gather<T, R>(_ type: T.Type, _ convert: (T) -> R) throws -> [R] {
        let result = try gatherUnchecked(type, convert)
        try checkErrors()
        return result
    }

    func gatherUnchecked<T, R>(_ type: T.Type, _ convert: (T) -> R) throws -> [R] {
        let (lo, hi) = byteSpan
        guard hi > lo else { return [] }
        let raw = try buffer.download(count: (hi - lo) / MemoryLayout<T>.stride, as: T.self, byteOffset: lo)
        if isContiguous { return raw.map(convert) }
        let base = (byteOffset - lo) / dtype.size
        var out = [R]()
        out.reserveCapacity(count)
        var index = [Int](repeating: 0, count: rank)
        for _ in 0..<count {
            var off = base
            for d in 0..<rank { off += index[d] * strides[d] }
            out.append(convert(raw[off]))
            var d = rank - 1
            while d >= 0 { index[d] += 1; if index[d] < shape[d] { break }; index[d] = 0; d -= 1 }
        }
        return out
    }

    // MARK: Capture

    /// How a mod sees this tensor when it indexes it.
    public var captureInfo: CaptureInfo {
        CaptureInfo(id: id, name: name, dtype: dtype == .int32 ? .int32 : .float32, shape: shape, storage: CaptureStorage(self))
    }

    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func captureValues() throws -> CaptureValues {
        dtype == .int32 ? .int32(try toInt32Array()) : .float32(try toArray())
    }
}

extension Device {
    /// A new tensor holding `values` (row-major), converted to `dtype` (`.float32`, `.float16` or `.int32`).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func tensor(_ values: [Float], shape: [Int], dtype: DType = .float32, name: String? = nil) throws -> Tensor {
        try checkShape(shape, count: values.count)
        let t = try empty(shape: shape, dtype: dtype, name: name)
        switch dtype {
        case .float32: try t.buffer.upload(values)
        case .float16: try t.buffer.upload(values.map { Float16($0) })
        case .bfloat16: try t.buffer.upload(values.map(\.bfloat16Bits))
        case .int32:
            guard values.allSatisfy({ $0 == $0.rounded() && abs($0) < 2_147_483_648 }) else {
                throw FlexError("int32 tensor \(name ?? ""): values must be integers in int32 range")
            }
            let ints = values.map { Int32($0) }
            try t.buffer.upload(ints)
            t.rememberHostValues(ints)
        }
        return t
    }

    /// A new int32 tensor (document ids, offsets...).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func tensor(_ values: [Int32], shape: [Int], name: String? = nil) throws -> Tensor {
        try checkShape(shape, count: values.count)
        let t = try empty(shape: shape, dtype: .int32, name: name)
        try t.buffer.upload(values)
        t.rememberHostValues(values)
        return t
    }

    /// A new int32 tensor from Swift `Int`s (document ids, offsets...): each must fit in int32.
    ///
    /// ```swift
    /// let docs = try device.tensor([0, 0, 0, 1, 1, 2] as [Int], shape: [6], name: "doc")
    /// ```
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` naming the first value outside int32, or for a shape that does not hold the values.
    public func tensor(_ values: [Int], shape: [Int], name: String? = nil) throws -> Tensor {
        if let i = values.firstIndex(where: { Int32(exactly: $0) == nil }) {
            throw FlexError("int32 tensor \(name ?? ""): value \(values[i]) at index \(i) does not fit in int32")
        }
        return try tensor(values.map { Int32($0) }, shape: shape, name: name)
    }

    /// A new float16 tensor from `Float16` values (stored as they are).
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a shape that does not hold the values; device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    /// (Generic, so that a literal array of decimals still makes a float32 tensor.)
    public func tensor<C: Collection<Float16>>(_ values: C, shape: [Int], name: String? = nil) throws -> Tensor {
        let values = Array(values)
        try checkShape(shape, count: values.count)
        let t = try empty(shape: shape, dtype: .float16, name: name)
        try t.buffer.upload(values)
        return t
    }

    /// A new tensor with unspecified contents.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func empty(shape: [Int], dtype: DType, name: String? = nil) throws -> Tensor {
        guard shape.allSatisfy({ $0 >= 0 }) else { throw FlexError("shape \(shape) has a negative dimension") }
        let (bytes, overflow) = shape.reduce(dtype.size) { $0 * $1 }.multipliedReportingOverflow(by: 1)
        guard !overflow else { throw FlexError("shape \(shape) is too large") }
        let buffer = try makeBuffer(bytes: bytes)
        return Tensor(device: self, buffer: buffer, byteOffset: 0, shape: shape, strides: Tensor.contiguousStrides(shape), dtype: dtype, name: name)
    }

    /// Wraps an engine's `VkBuffer` as a tensor (interop): `byteOffset` to element 0, strides in
    /// elements (row-major when `nil`). vkflex never frees the buffer.
    ///
    /// - Throws: ``FlexError/invalidArgument(_:)`` for a bad argument (the message says which); device errors as ``FlexError/vulkan(call:result:)`` or ``FlexError/limitExceeded(_:)``.
    public func tensor(wrapping vkBuffer: VkBuffer, bufferSize: Int, byteOffset: Int = 0, shape: [Int],
                       strides: [Int]? = nil, dtype: DType, name: String? = nil) throws -> Tensor {
        let s = strides ?? Tensor.contiguousStrides(shape)
        guard s.count == shape.count else { throw FlexError("strides \(s) do not match shape \(shape)") }
        let t = Tensor(device: self, buffer: wrapBuffer(vkBuffer, size: bufferSize), byteOffset: byteOffset,
                       shape: shape, strides: s, dtype: dtype, name: name)
        let (lo, hi) = t.byteSpan
        guard lo >= 0, hi <= bufferSize else {
            throw FlexError("a tensor of shape \(shape) at offset \(byteOffset) does not fit in a buffer of \(bufferSize) bytes")
        }
        return t
    }

    func checkShape(_ shape: [Int], count: Int) throws {
        guard shape.allSatisfy({ $0 >= 0 }) else { throw FlexError("shape \(shape) has a negative dimension") }
        guard shape.reduce(1, *) == count else {
            throw FlexError("shape \(shape) holds \(shape.reduce(1, *)) elements but \(count) values were given")
        }
    }
}
