import Foundation

/// The values of a captured tensor on the host, row-major.
public enum CaptureValues: Sendable {
    case int32([Int32])
    case float32([Float])

    public var count: Int {
        switch self {
        case .int32(let v): v.count
        case .float32(let v): v.count
        }
    }
}

/// A captured tensor that lives on the host only: for CPU evaluation, tests and the reference.
///
/// ```swift
/// let docs = HostTensor(name: "doc", int32: [0, 0, 1, 1], shape: [4])
/// let mask = MaskMod { _, _, q, kv in docs[q] == docs[kv] }
/// ```
public struct HostTensor: Capturable, Sendable {
    public let captureInfo: CaptureInfo
    public let values: CaptureValues

    public init(name: String, int32 values: [Int32], shape: [Int]) {
        self.values = .int32(values)
        captureInfo = CaptureInfo(id: CaptureInfo.newID(), name: name, dtype: .int32, shape: shape,
                                  storage: CaptureStorage(HostValues(self.values)))
    }

    public init(name: String, float32 values: [Float], shape: [Int]) {
        self.values = .float32(values)
        captureInfo = CaptureInfo(id: CaptureInfo.newID(), name: name, dtype: .float32, shape: shape,
                                  storage: CaptureStorage(HostValues(self.values)))
    }
}

/// An object behind a capture that can hand its values to the CPU interpreter (a device tensor
/// downloads them).
public protocol CaptureValuesProvider: AnyObject {
    func captureValues() throws -> CaptureValues
}

final class HostValues: CaptureValuesProvider, @unchecked Sendable {
    let values: CaptureValues
    init(_ values: CaptureValues) { self.values = values }
    func captureValues() throws -> CaptureValues { values }
}


/// Evaluates a mod graph on the CPU with PyTorch's semantics: exact int32 arithmetic (wrapping),
/// Python's floor division and modulo, and float64 math — or float32, rounding after every float
/// operation, to compare with a GPU at decision boundaries.
///
/// The graph is compiled once into closures, so evaluating over large index grids is fast.
///
/// ```swift
/// let eval = try Interpreter(causal.graph)
/// eval.bool(b: 0, h: 0, q: 3, kv: 5)   // false
/// ```
public final class Interpreter: @unchecked Sendable {
    public enum Precision: Sendable { case float64, float32 }

    struct Env { var score: Double; var b: Int32; var h: Int32; var q: Int32; var kv: Int32 }
    enum Compiled {
        case int((Env) -> Int32)
        case float((Env) -> Double)
        case bool((Env) -> Bool)
    }

    public let graph: Expr
    public let precision: Precision
    private var root: Compiled!
    /// The first error met (out-of-range index, division by zero), if any.
    public private(set) var error: FlexError?

    /// - Parameter captures: values of each captured tensor by capture id; `HostTensor`s in the
    ///   graph supply their own.
    ///
    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public init(_ graph: Expr, captures: [Int: CaptureValues] = [:], precision: Precision = .float64) throws {
        self.graph = graph
        self.precision = precision
        _ = try graph.type()
        var values = captures
        try Interpreter.collectHostValues(graph, into: &values)
        root = try compile(graph, values)
    }

    static func collectHostValues(_ e: Expr, into values: inout [Int: CaptureValues]) throws {
        for c in e.captures where values[c.id] == nil {
            guard let provider = c.storage.object as? CaptureValuesProvider else {
                throw modError("no values for the captured tensor \(c.name) (pass them in captures:)")
            }
            values[c.id] = try provider.captureValues()
        }
    }

    /// Forgets a recorded error.
    public func clearError() { error = nil }

    private func env(_ score: Double, _ b: Int, _ h: Int, _ q: Int, _ kv: Int) -> Env {
        Env(score: score, b: Int32(truncatingIfNeeded: b), h: Int32(truncatingIfNeeded: h),
            q: Int32(truncatingIfNeeded: q), kv: Int32(truncatingIfNeeded: kv))
    }

    /// The value at one point, as a Double (ints converted, bools 0/1).
    public func float(score: Double = 0, b: Int, h: Int, q: Int, kv: Int) -> Double {
        let e = env(score, b, h, q, kv)
        switch root! {
        case .float(let f): return f(e)
        case .int(let f): return Double(f(e))
        case .bool(let f): return f(e) ? 1 : 0
        }
    }

    /// The value at one point, as an Int32 (floats truncated, bools 0/1).
    public func int(b: Int, h: Int, q: Int, kv: Int, score: Double = 0) -> Int32 {
        let e = env(score, b, h, q, kv)
        switch root! {
        case .int(let f): return f(e)
        case .float(let f): return Int32(f(e))
        case .bool(let f): return f(e) ? 1 : 0
        }
    }

    /// The value at one point, as a Bool (numbers: non-zero).
    public func bool(b: Int, h: Int, q: Int, kv: Int, score: Double = 0) -> Bool {
        let e = env(score, b, h, q, kv)
        switch root! {
        case .bool(let f): return f(e)
        case .int(let f): return f(e) != 0
        case .float(let f): return f(e) != 0
        }
    }

    private func record(_ e: FlexError) { if error == nil { error = e } }

    private func compile(_ e: Expr, _ caps: [Int: CaptureValues]) throws -> Compiled {
        let f32 = precision == .float32
        @inline(__always) func r(_ x: Double) -> Double { f32 ? Double(Float(x)) : x }
        func asFloat(_ c: Compiled) -> (Env) -> Double {
            switch c {
            case .float(let f): return f
            case .int(let f): return { r(Double(f($0))) }
            case .bool(let f): return { f($0) ? 1 : 0 }
            }
        }
        switch e {
        case .arg(let a):
            switch a {
            case .score: return .float { r($0.score) }
            case .b: return .int { $0.b }
            case .h: return .int { $0.h }
            case .q: return .int { $0.q }
            case .kv: return .int { $0.kv }
            }
        case .int(let v): return .int { _ in v }
        case .float(let v): let x = r(v); return .float { _ in x }
        case .bool(let v): return .bool { _ in v }
        case .invalid(let m): throw typeError(m)
        case .unary(let op, let x):
            let c = try compile(x, caps)
            switch (op, c) {
            case (.neg, .int(let f)): return .int { 0 &- f($0) }
            case (.neg, .float(let f)): return .float { -f($0) }
            case (.not, .bool(let f)), (.bitNot, .bool(let f)): return .bool { !f($0) }
            case (.bitNot, .int(let f)): return .int { ~f($0) }
            default: throw typeError("bad operand for \(op.rawValue)")
            }
        case .binary(let op, let x, let y):
            let a = try compile(x, caps), b = try compile(y, caps)
            if case .int(let fa) = a, case .int(let fb) = b {
                switch op {
                case .add: return .int { fa($0) &+ fb($0) }
                case .sub: return .int { fa($0) &- fb($0) }
                case .mul: return .int { fa($0) &* fb($0) }
                case .div: return .float { r(Double(fa($0)) / Double(fb($0))) }
                case .floorDiv:
                    return .int { [unowned self] env in
                        let p = fa(env), q = fb(env)
                        if q == 0 { self.record(.divisionByZero); return 0 }
                        let (d, _) = p.dividedReportingOverflow(by: q)
                        let (m, _) = p.remainderReportingOverflow(dividingBy: q)
                        return m != 0 && ((p < 0) != (q < 0)) ? d &- 1 : d
                    }
                case .mod:
                    return .int { [unowned self] env in
                        let p = fa(env), q = fb(env)
                        if q == 0 { self.record(.divisionByZero); return 0 }
                        var (m, _) = p.remainderReportingOverflow(dividingBy: q)
                        if m != 0 && ((m < 0) != (q < 0)) { m = m &+ q }
                        return m
                    }
                case .pow:
                    return .int { [unowned self] env in
                        var base = fa(env), e = fb(env)
                        if e < 0 { self.record(.negativePower); return 0 }
                        var result: Int32 = 1
                        while e > 0 { if e & 1 != 0 { result = result &* base }; base = base &* base; e >>= 1 }
                        return result
                    }
                case .and: return .int { fa($0) & fb($0) }
                case .or: return .int { fa($0) | fb($0) }
                case .xor: return .int { fa($0) ^ fb($0) }
                case .lt: return .bool { fa($0) < fb($0) }
                case .le: return .bool { fa($0) <= fb($0) }
                case .gt: return .bool { fa($0) > fb($0) }
                case .ge: return .bool { fa($0) >= fb($0) }
                case .eq: return .bool { fa($0) == fb($0) }
                case .ne: return .bool { fa($0) != fb($0) }
                case .min: return .int { Swift.min(fa($0), fb($0)) }
                case .max: return .int { Swift.max(fa($0), fb($0)) }
                }
            }
            if case .bool(let fa) = a, case .bool(let fb) = b {
                switch op {
                case .and: return .bool { fa($0) && fb($0) }
                case .or: return .bool { fa($0) || fb($0) }
                case .xor, .ne: return .bool { fa($0) != fb($0) }
                case .eq: return .bool { fa($0) == fb($0) }
                default: throw typeError("bad operands for \(op.rawValue)")
                }
            }
            let fa = asFloat(a), fb = asFloat(b)
            switch op {
            case .add: return .float { r(fa($0) + fb($0)) }
            case .sub: return .float { r(fa($0) - fb($0)) }
            case .mul: return .float { r(fa($0) * fb($0)) }
            case .div: return .float { r(fa($0) / fb($0)) }
            case .floorDiv: return .float { r(Foundation.floor(fa($0) / fb($0))) }
            case .mod: return .float { let p = fa($0), q = fb($0); return r(p - q * Foundation.floor(p / q)) }
            case .pow: return .float { r(Foundation.pow(fa($0), fb($0))) }
            case .lt: return .bool { fa($0) < fb($0) }
            case .le: return .bool { fa($0) <= fb($0) }
            case .gt: return .bool { fa($0) > fb($0) }
            case .ge: return .bool { fa($0) >= fb($0) }
            case .eq: return .bool { fa($0) == fb($0) }
            case .ne: return .bool { fa($0) != fb($0) }
            case .min: return .float { let p = fa($0), q = fb($0); return p.isNaN || q.isNaN ? .nan : Swift.min(p, q) }
            case .max: return .float { let p = fa($0), q = fb($0); return p.isNaN || q.isNaN ? .nan : Swift.max(p, q) }
            case .and, .or, .xor: throw typeError("\(op.rawValue) on floats")
            }
        case .call(let f, let args):
            let cs = try args.map { try compile($0, caps) }
            if f == .abs, case .int(let g) = cs[0] { return .int { let v = g($0); return v < 0 ? 0 &- v : v } }
            if f == .floor, case .int = cs[0] { return cs[0] }
            if f == .clamp, case .int(let x) = cs[0], case .int(let lo) = cs[1], case .int(let hi) = cs[2] {
                return .int { Swift.min(Swift.max(x($0), lo($0)), hi($0)) }
            }
            let g = asFloat(cs[0])
            switch f {
            case .abs: return .float { Swift.abs(g($0)) }
            case .floor: return .float { Foundation.floor(g($0)) }
            case .exp: return .float { r(Foundation.exp(g($0))) }
            case .exp2: return .float { r(Foundation.exp2(g($0))) }
            case .log: return .float { r(Foundation.log(g($0))) }
            case .log2: return .float { r(Foundation.log2(g($0))) }
            case .sqrt: return .float { r(Foundation.sqrt(g($0))) }
            case .tanh: return .float { r(Foundation.tanh(g($0))) }
            case .sin: return .float { r(Foundation.sin(g($0))) }
            case .cos: return .float { r(Foundation.cos(g($0))) }
            case .tan: return .float { r(Foundation.tan(g($0))) }
            case .sigmoid: return .float { r(1 / (1 + Foundation.exp(-g($0)))) }
            case .clamp:
                let lo = asFloat(cs[1]), hi = asFloat(cs[2])
                return .float { Swift.min(Swift.max(g($0), lo($0)), hi($0)) }
            }
        case .select(let c, let x, let y):
            guard case .bool(let fc) = try compile(c, caps) else { throw typeError("where needs a bool condition") }
            let a = try compile(x, caps), b = try compile(y, caps)
            switch (a, b) {
            case (.int(let fa), .int(let fb)): return .int { let p = fa($0), q = fb($0); return fc($0) ? p : q }
            case (.bool(let fa), .bool(let fb)): return .bool { let p = fa($0), q = fb($0); return fc($0) ? p : q }
            default:
                let fa = asFloat(a), fb = asFloat(b)
                return .float { let p = fa($0), q = fb($0); return fc($0) ? p : q }
            }
        case .load(let cap, let idx):
            guard let values = caps[cap.id] else { throw modError("no values for the captured tensor \(cap.name)") }
            guard values.count == cap.shape.reduce(1, *) else {
                throw modError("\(cap.name) has \(values.count) values but shape \(cap.shape)")
            }
            let fs: [(Env) -> Int32] = try idx.map {
                guard case .int(let f) = try compile($0, caps) else { throw typeError("indices must be ints") }
                return f
            }
            let shape = cap.shape.map { Int32($0) }
            var strides = [Int](repeating: 1, count: shape.count)
            for d in stride(from: shape.count - 2, through: 0, by: -1) { strides[d] = strides[d + 1] * cap.shape[d + 1] }
            let offset: (Env) -> Int? = { [unowned self] env in
                var flat = 0
                for d in 0..<fs.count {
                    let raw = fs[d](env)
                    var i = raw
                    if i < 0 { i = i &+ shape[d] }
                    if i < 0 || i >= shape[d] { self.record(.indexOutOfRange(name: cap.name, shape: cap.shape, index: raw, dim: d)); return nil }
                    flat += Int(i) * strides[d]
                }
                return flat
            }
            switch values {
            case .int32(let v): return .int { env in offset(env).map { v[$0] } ?? 0 }
            case .float32(let v): return .float { env in offset(env).map { Double(v[$0]) } ?? 0 }
            }
        }
    }
}

extension HostTensor {
    /// Values by capture id, for ``Interpreter/init(_:captures:precision:)``.
    public static func values(_ tensors: [HostTensor]) -> [Int: CaptureValues] {
        Dictionary(uniqueKeysWithValues: tensors.map { ($0.captureInfo.id, $0.values) })
    }
}
