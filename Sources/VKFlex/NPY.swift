import Foundation

/// A NumPy `.npy` array: the formats `vkflex attend` reads and writes (little-endian float32,
/// float16 and int32, C order).
///
/// ```swift
/// let q = try NPYArray(contentsOf: URL(fileURLWithPath: "q.npy"))
/// try NPYArray(float32: values, shape: [1, 8, 128, 64]).write(to: URL(fileURLWithPath: "out.npy"))
/// ```
public struct NPYArray: Sendable {
    public enum Storage: Sendable {
        case float32([Float])
        case float16([Float16])
        case int32([Int32])
    }

    public var shape: [Int]
    public var storage: Storage

    public init(float32 values: [Float], shape: [Int]) { self.shape = shape; storage = .float32(values) }
    public init(int32 values: [Int32], shape: [Int]) { self.shape = shape; storage = .int32(values) }

    public var dtype: DType {
        switch storage {
        case .float32: .float32
        case .float16: .float16
        case .int32: .int32
        }
    }

    /// The values as Float (int32 converted).
    public var floats: [Float] {
        switch storage {
        case .float32(let v): v
        case .float16(let v): v.map(Float.init)
        case .int32(let v): v.map(Float.init)
        }
    }

    /// Reads an `.npy` file; every problem is a ``FlexError`` naming the file.
    ///
    /// - Throws: ``FlexError/file(_:)`` when the file cannot be read or written or is not a float32, float16 or int32 `.npy` file.
    public init(contentsOf url: URL) throws {
        let name = url.lastPathComponent
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw FlexError.file("cannot read \(url.path): \(FileManager.default.fileExists(atPath: url.path) ? "permission denied or not a file" : "no such file")")
        }
        try self.init(data: data, name: name)
    }

    /// - Throws: ``FlexError/file(_:)`` when the file cannot be read or written or is not a float32, float16 or int32 `.npy` file.
    public init(data: Data, name: String = "array") throws {
        let bytes = [UInt8](data)
        guard bytes.count >= 10, bytes[0] == 0x93, Array(bytes[1...5]) == Array("NUMPY".utf8) else {
            throw FlexError.file("\(name) is not a NumPy .npy file (bad magic)")
        }
        let major = bytes[6]
        let headerLen: Int, start: Int
        switch major {
        case 1: headerLen = Int(bytes[8]) | Int(bytes[9]) << 8; start = 10
        case 2, 3:
            guard bytes.count >= 12 else { throw FlexError.file("\(name) is truncated (header)") }
            headerLen = Int(bytes[8]) | Int(bytes[9]) << 8 | Int(bytes[10]) << 16 | Int(bytes[11]) << 24; start = 12
        default: throw FlexError.file("\(name): unsupported .npy version \(major)")
        }
        guard bytes.count >= start + headerLen else { throw FlexError.file("\(name) is truncated (header)") }
        guard let header = String(bytes: bytes[start..<(start + headerLen)], encoding: .utf8) else {
            throw FlexError.file("\(name): the .npy header is not text")
        }
        func field(_ key: String) -> String? {
            guard let r = header.range(of: "'\(key)':") else { return nil }
            return String(header[r.upperBound...]).trimmingCharacters(in: .whitespaces)
        }
        guard let descrField = field("descr"), let q1 = descrField.firstIndex(of: "'"),
              let q2 = descrField[descrField.index(after: q1)...].firstIndex(of: "'") else {
            throw FlexError.file("\(name): the .npy header has no dtype")
        }
        let descr = String(descrField[descrField.index(after: q1)..<q2])
        if let fo = field("fortran_order"), fo.hasPrefix("True") {
            throw FlexError.file("\(name) is in Fortran order; save it in C order (np.ascontiguousarray)")
        }
        guard let shapeField = field("shape"), let open = shapeField.firstIndex(of: "("), let close = shapeField.firstIndex(of: ")") else {
            throw FlexError.file("\(name): the .npy header has no shape")
        }
        let dims = shapeField[shapeField.index(after: open)..<close].split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        var shape: [Int] = []
        for d in dims {
            guard let n = Int(d), n >= 0 else { throw FlexError.file("\(name): bad dimension '\(d)' in the .npy shape") }
            shape.append(n)
        }
        let (count, overflow) = shape.reduce((1, false)) { acc, n in
            let (v, o) = acc.0.multipliedReportingOverflow(by: n); return (v, acc.1 || o)
        }
        guard !overflow, count < 1 << 34 else { throw FlexError.file("\(name): shape \(shape) is too large") }
        let body = start + headerLen
        let size: Int
        switch descr {
        case "<f4", "=f4", "|f4": size = 4
        case "<f2", "=f2", "|f2": size = 2
        case "<i4", "=i4", "|i4": size = 4
        default:
            let friendly = ["<f8": "float64", "<i8": "int64", ">f4": "big-endian float32", "|b1": "bool", "|u1": "uint8", "|i1": "int8"][descr] ?? descr
            throw FlexError.file("\(name) has dtype \(friendly) ('\(descr)'); vkflex reads float32, float16 or int32 .npy files")
        }
        guard bytes.count >= body + count * size else {
            throw FlexError.file("\(name) is truncated: shape \(shape) needs \(count * size) bytes of data, the file has \(bytes.count - body)")
        }
        self.shape = shape
        let raw = Data(bytes[body..<(body + count * size)])
        switch descr.dropFirst() {
        case "f4": storage = .float32(raw.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) })
        case "f2": storage = .float16(raw.withUnsafeBytes { Array($0.bindMemory(to: Float16.self)) })
        default: storage = .int32(raw.withUnsafeBytes { Array($0.bindMemory(to: Int32.self)) })
        }
    }

    /// The `.npy` bytes (version 1.0).
    public func data() -> Data {
        let descr: String
        let body: Data
        switch storage {
        case .float32(let v): descr = "<f4"; body = v.withUnsafeBytes { Data($0) }
        case .float16(let v): descr = "<f2"; body = v.withUnsafeBytes { Data($0) }
        case .int32(let v): descr = "<i4"; body = v.withUnsafeBytes { Data($0) }
        }
        let shapeText = shape.count == 1 ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
        var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shapeText), }"
        let total = 10 + header.utf8.count + 1
        header += String(repeating: " ", count: (64 - total % 64) % 64) + "\n"
        var out = Data([0x93] + Array("NUMPY".utf8) + [1, 0])
        let len = header.utf8.count
        out.append(contentsOf: [UInt8(len & 0xff), UInt8(len >> 8)])
        out.append(contentsOf: Array(header.utf8))
        out.append(body)
        return out
    }

    /// - Throws: ``FlexError/file(_:)`` when the file cannot be read or written or is not a float32, float16 or int32 `.npy` file.
    public func write(to url: URL) throws {
        do { try data().write(to: url) } catch { throw FlexError.file("cannot write \(url.path): \(error.localizedDescription)") }
    }
}

extension Device {
    /// A device tensor with the array's values and shape.
    ///
    /// - Throws: ``FlexError/file(_:)`` when the file cannot be read or written or is not a float32, float16 or int32 `.npy` file.
    public func tensor(_ array: NPYArray, name: String? = nil) throws -> Tensor {
        switch array.storage {
        case .float32(let v): return try tensor(v, shape: array.shape, dtype: .float32, name: name)
        case .float16(let v):
            try checkShape(array.shape, count: v.count)
            let t = try empty(shape: array.shape, dtype: .float16, name: name)
            try t.buffer.upload(v)
            return t
        case .int32(let v): return try tensor(v, shape: array.shape, name: name)
        }
    }
}
