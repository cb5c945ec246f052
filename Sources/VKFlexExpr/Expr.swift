import Foundation
@_exported import VKFlexCore

/// The scalar type of an expression node: PyTorch's int32, float and bool.
public enum ScalarType: String, Sendable, Hashable {
    case int, float, bool

    var isNumber: Bool { self != .bool }
}

/// The arguments a mod receives. `score` exists only in score-mods.
public enum Argument: String, Sendable, Hashable, CaseIterable {
    case score, b, h, q = "q_idx", kv = "kv_idx"
}

public enum UnaryOp: String, Sendable, Hashable {
    case neg = "-", not = "!", bitNot = "~"
}

public enum BinaryOp: String, Sendable, Hashable {
    case add = "+", sub = "-", mul = "*", div = "/", floorDiv = "//", mod = "%", pow = "**"
    case and = "&", or = "|", xor = "^"
    case lt = "<", le = "<=", gt = ">", ge = ">=", eq = "==", ne = "!="
    case min = "minimum", max = "maximum"

    var isComparison: Bool { [.lt, .le, .gt, .ge, .eq, .ne].contains(self) }
    var isBitwise: Bool { [.and, .or, .xor].contains(self) }
}

public enum Function: String, Sendable, Hashable, CaseIterable {
    case abs, floor, exp, exp2, log, log2, sqrt, tanh, sin, cos, tan, sigmoid, clamp

    /// Whether the result is float whatever the argument (PyTorch's promotion of int inputs).
    var promotesToFloat: Bool { ![.abs, .floor, .clamp].contains(self) }
    var arity: Int { self == .clamp ? 3 : 1 }
}

/// The element type of a captured tensor.
public enum CaptureDType: String, Sendable, Hashable {
    case int32, float32

    public var scalarType: ScalarType { self == .int32 ? .int : .float }
}

/// Keeps the object behind a capture (a device tensor) alive as long as a graph refers to it.
public final class CaptureStorage: @unchecked Sendable {
    public let object: AnyObject?
    public init(_ object: AnyObject?) { self.object = object }
}

/// A tensor captured by a mod: identity, name (for messages), element type and shape.
/// Two captures are the same when their `id`s are.
public struct CaptureInfo: Sendable, Hashable, CustomStringConvertible {
    public let id: Int
    public let name: String
    public let dtype: CaptureDType
    public let shape: [Int]
    public let storage: CaptureStorage

    public init(id: Int, name: String, dtype: CaptureDType, shape: [Int], storage: CaptureStorage = CaptureStorage(nil)) {
        self.id = id
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.storage = storage
    }

    /// A fresh process-unique id.
    public static func newID() -> Int { captureIDs.next() }

    public static func == (a: CaptureInfo, b: CaptureInfo) -> Bool { a.id == b.id }
    public func hash(into h: inout Hasher) { h.combine(id) }
    public var description: String { "\(name)\(shape)" }
}

private final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func next() -> Int { lock.withLock { value += 1; return value } }
}
private let captureIDs = Counter()

/// Something a mod can capture and index: a device tensor, or host values for CPU-only use.
public protocol Capturable {
    var captureInfo: CaptureInfo { get }
}

/// One node of a mod's expression graph. Build graphs with ``Num``/``Cond`` (Swift closures) or
/// ``ScoreMod/init(parsing:captures:)`` (text); both give the same graph for the same expression.
public indirect enum Expr: Sendable, Hashable {
    case arg(Argument)
    case int(Int32)
    case float(Double)
    case bool(Bool)
    case unary(UnaryOp, Expr)
    case binary(BinaryOp, Expr, Expr)
    case call(Function, [Expr])
    case select(Expr, Expr, Expr)
    case load(CaptureInfo, [Expr])
    /// A type error met while tracing a Swift closure; reported when the mod is checked.
    case invalid(String)
}

/// A type error in a mod expression, as the one public error type.
func typeError(_ message: String) -> FlexError { .expression(ExpressionError(message)) }

/// A problem with a mod found when it was built or used.
func modError(_ message: String) -> FlexError { .expression(ExpressionError(message)) }

extension Expr {
    /// The type of the node; throws the first type error found in the graph.
    ///
    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public func type() throws -> ScalarType {
        switch self {
        case .arg(let a): return a == .score ? .float : .int
        case .int: return .int
        case .float: return .float
        case .bool: return .bool
        case .invalid(let m): throw typeError(m)
        case .unary(let op, let x): return try Expr.unaryType(op, try x.type())
        case .binary(let op, let a, let b): return try Expr.binaryType(op, try a.type(), try b.type())
        case .call(let f, let args): return try Expr.callType(f, try args.map { try $0.type() })
        case .select(let c, let a, let b): return try Expr.selectType(try c.type(), try a.type(), try b.type())
        case .load(let cap, let idx):
            try Expr.checkLoad(cap, try idx.map { try $0.type() })
            return cap.dtype.scalarType
        }
    }

    static func unaryType(_ op: UnaryOp, _ t: ScalarType) throws -> ScalarType {
        switch op {
        case .neg:
            guard t.isNumber else { throw typeError("unary - needs a number, got a bool (use ~ or ! to negate a condition)") }
            return t
        case .not:
            guard t == .bool else { throw typeError("! needs a bool, got \(t.rawValue) (use ~ for bitwise not of an int)") }
            return .bool
        case .bitNot:
            switch t {
            case .bool: return .bool
            case .int: return .int
            case .float: throw typeError("~ needs a bool or an int, got a float")
            }
        }
    }

    static func binaryType(_ op: BinaryOp, _ a: ScalarType, _ b: ScalarType) throws -> ScalarType {
        let sym = op.rawValue
        switch op {
        case .and, .or, .xor:
            if a == .bool && b == .bool { return .bool }
            if a == .int && b == .int { return .int }
            if a == .float || b == .float { throw typeError("\(sym) needs two bools (logical) or two ints (bitwise), got a float") }
            throw typeError("\(sym) mixes a bool with an int: compare the int first (e.g. (x != 0))")
        case .eq, .ne:
            if a == .bool && b == .bool { return .bool }
            fallthrough
        case .lt, .le, .gt, .ge:
            guard a.isNumber && b.isNumber else { throw typeError("comparison \(sym) needs two numbers, got \(a.rawValue) and \(b.rawValue)") }
            return .bool
        default:
            guard a.isNumber && b.isNumber else {
                let name = op == .min || op == .max ? op.rawValue : sym
                throw typeError("\(name) needs numbers, got a bool (use where(cond, a, b) to turn a condition into a number)")
            }
            if op == .div { return .float }
            return a == .int && b == .int ? .int : .float
        }
    }

    static func callType(_ f: Function, _ args: [ScalarType]) throws -> ScalarType {
        guard args.count == f.arity else {
            throw typeError("\(f.rawValue) takes \(f.arity) argument\(f.arity == 1 ? "" : "s"), got \(args.count)")
        }
        guard args.allSatisfy(\.isNumber) else {
            throw typeError("\(f.rawValue) needs a number, got a bool")
        }
        if f.promotesToFloat { return .float }
        return args.allSatisfy { $0 == .int } ? .int : .float
    }

    static func selectType(_ c: ScalarType, _ a: ScalarType, _ b: ScalarType) throws -> ScalarType {
        guard c == .bool else { throw typeError("the condition of where(...) must be a bool, got \(c.rawValue) (compare it, e.g. (x != 0))") }
        if a == .bool && b == .bool { return .bool }
        guard a.isNumber && b.isNumber else { throw typeError("where(...) mixes a bool and a number in its branches") }
        return a == .int && b == .int ? .int : .float
    }

    static func checkLoad(_ cap: CaptureInfo, _ idx: [ScalarType]) throws {
        guard idx.count == cap.shape.count else {
            throw typeError("\(cap.name) has \(cap.shape.count) dimension\(cap.shape.count == 1 ? "" : "s") (shape \(cap.shape)) but is indexed with \(idx.count)")
        }
        for t in idx where t != .int {
            throw typeError("\(cap.name) is indexed with a \(t.rawValue); indices must be ints (use floorDiv / // for integer division)")
        }
    }
}

// MARK: - Smart constructors: type-checked, with constant folding of negated literals.

extension Expr {
    /// Negation, folding literals (so `-1024` and `-inf` are constants in both forms).
    ///
    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public static func makeUnary(_ op: UnaryOp, _ x: Expr) throws -> Expr {
        _ = try unaryType(op, try x.type())
        switch (op, x) {
        case (.neg, .int(let v)): return .int(0 &- v)
        case (.neg, .float(let v)): return .float(-v)
        case (.not, .bool(let v)), (.bitNot, .bool(let v)): return .bool(!v)
        case (.bitNot, .int(let v)): return .int(~v)
        case (.bitNot, _) where try x.type() == .bool: return .unary(.not, x)
        default: return .unary(op, x)
        }
    }

    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public static func makeBinary(_ op: BinaryOp, _ a: Expr, _ b: Expr) throws -> Expr {
        _ = try binaryType(op, try a.type(), try b.type())
        if op == .pow, try a.type() == .int, try b.type() == .int, case .int(let e) = b, e < 0 {
            throw typeError("integers to negative integer powers are not allowed (write the base as a float, e.g. 2.0 ** \(e))")
        }
        return .binary(op, a, b)
    }

    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public static func makeCall(_ f: Function, _ args: [Expr]) throws -> Expr {
        _ = try callType(f, try args.map { try $0.type() })
        return .call(f, args)
    }

    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public static func makeSelect(_ c: Expr, _ a: Expr, _ b: Expr) throws -> Expr {
        _ = try selectType(try c.type(), try a.type(), try b.type())
        return .select(c, a, b)
    }

    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public static func makeLoad(_ cap: CaptureInfo, _ idx: [Expr]) throws -> Expr {
        try checkLoad(cap, try idx.map { try $0.type() })
        return .load(cap, idx)
    }
}

// MARK: - Traversal

extension Expr {
    /// The direct children of the node.
    public var children: [Expr] {
        switch self {
        case .arg, .int, .float, .bool, .invalid: return []
        case .unary(_, let x): return [x]
        case .binary(_, let a, let b): return [a, b]
        case .call(_, let args): return args
        case .select(let c, let a, let b): return [c, a, b]
        case .load(_, let idx): return idx
        }
    }

    /// Whether any node satisfies `predicate`.
    public func contains(where predicate: (Expr) -> Bool) -> Bool {
        if predicate(self) { return true }
        return children.contains { $0.contains(where: predicate) }
    }

    /// The same graph with its captures' storage dropped (their id, name, dtype and shape kept):
    /// a key for caches that must not keep captured tensors alive.
    public var withoutCaptureStorage: Expr {
        switch self {
        case .arg, .int, .float, .bool, .invalid: return self
        case .unary(let op, let x): return .unary(op, x.withoutCaptureStorage)
        case .binary(let op, let a, let b): return .binary(op, a.withoutCaptureStorage, b.withoutCaptureStorage)
        case .call(let f, let args): return .call(f, args.map(\.withoutCaptureStorage))
        case .select(let c, let a, let b): return .select(c.withoutCaptureStorage, a.withoutCaptureStorage, b.withoutCaptureStorage)
        case .load(let cap, let idx):
            return .load(CaptureInfo(id: cap.id, name: cap.name, dtype: cap.dtype, shape: cap.shape), idx.map(\.withoutCaptureStorage))
        }
    }

    /// The captures the graph reads, in order of first appearance (depth-first, left to right).
    public var captures: [CaptureInfo] {
        var seen: [CaptureInfo] = []
        func walk(_ e: Expr) {
            for c in e.children { walk(c) }
            if case .load(let cap, _) = e, !seen.contains(cap) { seen.append(cap) }
        }
        walk(self)
        return seen
    }

    /// Whether evaluating the graph can report an error: it reads a captured tensor (index out
    /// of range) or divides ints (division by zero, negative power).
    public var canFail: Bool {
        contains { e in
            switch e {
            case .load: return true
            case .binary(let op, let a, let b) where op == .floorDiv || op == .mod || op == .pow:
                return (try? a.type()) == .int && (try? b.type()) == .int
            default: return false
            }
        }
    }

    /// Whether the graph reads `arg`.
    public func uses(_ arg: Argument) -> Bool { contains { $0 == .arg(arg) } }

    /// Whether the graph is int/bool throughout (no float node): such graphs evaluate exactly
    /// the same on any GPU and on the CPU.
    public var isExact: Bool {
        !contains { e in (try? e.type()) == .float }
    }
}
