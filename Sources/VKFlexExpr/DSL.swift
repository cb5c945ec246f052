import Foundation

/// A symbolic number (PyTorch int32 or float) inside a mod closure.
///
/// ```swift
/// let alibi = ScoreMod { score, b, h, q, kv in score + slopes[h] * (kv - q) }
/// let softcap = ScoreMod { score, _, _, _, _ in 20 * tanh(score / 20) }
/// ```
/// Arithmetic follows PyTorch: int op int stays int (wrapping), a float anywhere makes a float,
/// `/` is true division (a float even for two ints), `%` and ``floorDiv(_:_:)`` use Python's
/// floor semantics. Swift `Int`, `Double` and `Float` values mix in and become constants.
///
/// A Swift `Int` on the *left* of `/` or `%` stays Swift arithmetic (`KW / 2` is `1`, computed in
/// Swift, as the notebook's `K_W // 2`); to divide a captured Swift value by a symbolic one,
/// wrap it: `Num(W) / q`.
public struct Num: Sendable, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral, CustomStringConvertible {
    public let expr: Expr
    public init(_ expr: Expr) { self.expr = expr }
    public init(integerLiteral value: Int) { self.init(constant: value) }
    public init(floatLiteral value: Double) { expr = .float(value) }
    public init(_ value: Int) { self.init(constant: value) }
    public init(_ value: Double) { expr = .float(value) }
    public init(_ value: Float) { expr = .float(Double(value)) }

    private init(constant value: Int) {
        if let v = Int32(exactly: value) { expr = .int(v) }
        else { expr = .invalid("the constant \(value) does not fit in int32") }
    }

    public var description: String { expr.text }
}

/// A symbolic condition (PyTorch bool) inside a mod closure.
///
/// ```swift
/// let sliding = MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= 1024) }
/// ```
/// `&`, `|`, `^` and `!` are logical on conditions.
public struct Cond: Sendable, ExpressibleByBooleanLiteral, CustomStringConvertible {
    public let expr: Expr
    public init(_ expr: Expr) { self.expr = expr }
    public init(booleanLiteral value: Bool) { expr = .bool(value) }
    public var description: String { expr.text }
}

/// A Swift value that mixes with ``Num`` as a constant (`let W = 128; q % W`).
/// Swift `Int` and `Double` values mix with `Num` in operators; other types (`Float`, `Int32`) work through
/// the generic functions below or `Num(x)`.
public protocol NumConstant { var num: Num { get } }
extension Int: NumConstant { public var num: Num { Num(self) } }
extension Int32: NumConstant { public var num: Num { Num(Int(self)) } }
extension Double: NumConstant { public var num: Num { Num(self) } }
extension Float: NumConstant { public var num: Num { Num(self) } }

@inline(__always) func traced(_ make: () throws -> Expr) -> Expr {
    do { return try make() } catch { return .invalid("\(error)") }
}

private func bin(_ op: BinaryOp, _ a: Expr, _ b: Expr) -> Expr { traced { try .makeBinary(op, a, b) } }

// MARK: Arithmetic
extension Num {
    public static func + (a: Num, b: Num) -> Num { Num(bin(.add, a.expr, b.expr)) }
    public static func - (a: Num, b: Num) -> Num { Num(bin(.sub, a.expr, b.expr)) }
    public static func * (a: Num, b: Num) -> Num { Num(bin(.mul, a.expr, b.expr)) }
    /// True division: always a float (Python's `/`).
    public static func / (a: Num, b: Num) -> Num { Num(bin(.div, a.expr, b.expr)) }
    /// Python's modulo: the result has the sign of the divisor.
    public static func % (a: Num, b: Num) -> Num { Num(bin(.mod, a.expr, b.expr)) }
    public static prefix func - (a: Num) -> Num { Num(traced { try .makeUnary(.neg, a.expr) }) }
    /// Bitwise and/or/xor of ints (Python's `&`, `|`, `^` on ints).
    public static func & (a: Num, b: Num) -> Num { Num(bin(.and, a.expr, b.expr)) }
    public static func | (a: Num, b: Num) -> Num { Num(bin(.or, a.expr, b.expr)) }
    public static func ^ (a: Num, b: Num) -> Num { Num(bin(.xor, a.expr, b.expr)) }
    /// Bitwise not of an int.
    public static prefix func ~ (a: Num) -> Num { Num(traced { try .makeUnary(.bitNot, a.expr) }) }

    public static func + (a: Num, b: Int) -> Num { a + b.num }
    public static func + (a: Num, b: Double) -> Num { a + b.num }
    public static func + (a: Int, b: Num) -> Num { a.num + b }
    public static func + (a: Double, b: Num) -> Num { a.num + b }
    public static func - (a: Num, b: Int) -> Num { a - b.num }
    public static func - (a: Num, b: Double) -> Num { a - b.num }
    public static func - (a: Int, b: Num) -> Num { a.num - b }
    public static func - (a: Double, b: Num) -> Num { a.num - b }
    public static func * (a: Num, b: Int) -> Num { a * b.num }
    public static func * (a: Num, b: Double) -> Num { a * b.num }
    public static func * (a: Int, b: Num) -> Num { a.num * b }
    public static func * (a: Double, b: Num) -> Num { a.num * b }
    public static func / (a: Num, b: Int) -> Num { a / b.num }
    public static func / (a: Num, b: Double) -> Num { a / b.num }
    public static func % (a: Num, b: Int) -> Num { a % b.num }
    public static func % (a: Num, b: Double) -> Num { a % b.num }

    // MARK: Comparisons
    public static func < (a: Num, b: Num) -> Cond { Cond(bin(.lt, a.expr, b.expr)) }
    public static func <= (a: Num, b: Num) -> Cond { Cond(bin(.le, a.expr, b.expr)) }
    public static func > (a: Num, b: Num) -> Cond { Cond(bin(.gt, a.expr, b.expr)) }
    public static func >= (a: Num, b: Num) -> Cond { Cond(bin(.ge, a.expr, b.expr)) }
    public static func == (a: Num, b: Num) -> Cond { Cond(bin(.eq, a.expr, b.expr)) }
    public static func != (a: Num, b: Num) -> Cond { Cond(bin(.ne, a.expr, b.expr)) }
    public static func < (a: Num, b: Int) -> Cond { a < b.num }
    public static func < (a: Num, b: Double) -> Cond { a < b.num }
    public static func < (a: Int, b: Num) -> Cond { a.num < b }
    public static func < (a: Double, b: Num) -> Cond { a.num < b }
    public static func <= (a: Num, b: Int) -> Cond { a <= b.num }
    public static func <= (a: Num, b: Double) -> Cond { a <= b.num }
    public static func <= (a: Int, b: Num) -> Cond { a.num <= b }
    public static func <= (a: Double, b: Num) -> Cond { a.num <= b }
    public static func > (a: Num, b: Int) -> Cond { a > b.num }
    public static func > (a: Num, b: Double) -> Cond { a > b.num }
    public static func > (a: Int, b: Num) -> Cond { a.num > b }
    public static func > (a: Double, b: Num) -> Cond { a.num > b }
    public static func >= (a: Num, b: Int) -> Cond { a >= b.num }
    public static func >= (a: Num, b: Double) -> Cond { a >= b.num }
    public static func >= (a: Int, b: Num) -> Cond { a.num >= b }
    public static func >= (a: Double, b: Num) -> Cond { a.num >= b }
    public static func == (a: Num, b: Int) -> Cond { a == b.num }
    public static func == (a: Num, b: Double) -> Cond { a == b.num }
    public static func == (a: Int, b: Num) -> Cond { a.num == b }
    public static func == (a: Double, b: Num) -> Cond { a.num == b }
    public static func != (a: Num, b: Int) -> Cond { a != b.num }
    public static func != (a: Num, b: Double) -> Cond { a != b.num }
    public static func != (a: Int, b: Num) -> Cond { a.num != b }
    public static func != (a: Double, b: Num) -> Cond { a.num != b }
}

extension Cond {
    /// Logical and/or/xor (PyTorch's `&`, `|`, `^` on bool tensors).
    public static func & (a: Cond, b: Cond) -> Cond { Cond(bin(.and, a.expr, b.expr)) }
    public static func | (a: Cond, b: Cond) -> Cond { Cond(bin(.or, a.expr, b.expr)) }
    public static func ^ (a: Cond, b: Cond) -> Cond { Cond(bin(.xor, a.expr, b.expr)) }
    public static func && (a: Cond, b: Cond) -> Cond { a & b }
    public static func || (a: Cond, b: Cond) -> Cond { a | b }
    public static prefix func ! (a: Cond) -> Cond { Cond(traced { try .makeUnary(.not, a.expr) }) }
    public static func == (a: Cond, b: Cond) -> Cond { Cond(bin(.eq, a.expr, b.expr)) }
    public static func != (a: Cond, b: Cond) -> Cond { Cond(bin(.ne, a.expr, b.expr)) }
}

// MARK: Functions

/// `torch.where(cond, a, b)` (`where` is a Swift keyword).
public func select(_ cond: Cond, _ a: Num, _ b: Num) -> Num { Num(traced { try .makeSelect(cond.expr, a.expr, b.expr) }) }
public func select(_ cond: Cond, _ a: Num, _ b: Int) -> Num { select(cond, a, b.num) }
public func select(_ cond: Cond, _ a: Num, _ b: Double) -> Num { select(cond, a, b.num) }
public func select(_ cond: Cond, _ a: Int, _ b: Num) -> Num { select(cond, a.num, b) }
public func select(_ cond: Cond, _ a: Double, _ b: Num) -> Num { select(cond, a.num, b) }
/// `torch.where` on two conditions.
public func select(_ cond: Cond, _ a: Cond, _ b: Cond) -> Cond { Cond(traced { try .makeSelect(cond.expr, a.expr, b.expr) }) }

/// Python's `a // b`: floor division (ints stay ints; rounds toward negative infinity).
public func floorDiv(_ a: Num, _ b: Num) -> Num { Num(bin(.floorDiv, a.expr, b.expr)) }
public func floorDiv(_ a: Num, _ b: Int) -> Num { floorDiv(a, b.num) }
public func floorDiv(_ a: Num, _ b: Double) -> Num { floorDiv(a, b.num) }
/// Python's `a ** b` (int ** non-negative int stays int).
public func pow(_ a: Num, _ b: Num) -> Num { Num(bin(.pow, a.expr, b.expr)) }
public func pow(_ a: Num, _ b: Int) -> Num { pow(a, b.num) }
public func pow(_ a: Num, _ b: Double) -> Num { pow(a, b.num) }
/// `torch.minimum` / `torch.maximum`.
public func min(_ a: Num, _ b: Num) -> Num { Num(bin(.min, a.expr, b.expr)) }
public func max(_ a: Num, _ b: Num) -> Num { Num(bin(.max, a.expr, b.expr)) }
public func min(_ a: Num, _ b: Int) -> Num { min(a, b.num) }
public func min(_ a: Num, _ b: Double) -> Num { min(a, b.num) }
public func max(_ a: Num, _ b: Int) -> Num { max(a, b.num) }
public func max(_ a: Num, _ b: Double) -> Num { max(a, b.num) }
/// `x.clamp(lo, hi)` = `minimum(maximum(x, lo), hi)`.
public func clamp(_ x: Num, _ lo: Num, _ hi: Num) -> Num { Num(traced { try .makeCall(.clamp, [x.expr, lo.expr, hi.expr]) }) }
public func clamp(_ x: Num, _ lo: Int, _ hi: Int) -> Num { clamp(x, lo.num, hi.num) }
public func clamp(_ x: Num, _ lo: Double, _ hi: Double) -> Num { clamp(x, lo.num, hi.num) }

private func fn(_ f: Function, _ x: Num) -> Num { Num(traced { try .makeCall(f, [x.expr]) }) }
public func abs(_ x: Num) -> Num { fn(.abs, x) }
public func floor(_ x: Num) -> Num { fn(.floor, x) }
public func exp(_ x: Num) -> Num { fn(.exp, x) }
public func exp2(_ x: Num) -> Num { fn(.exp2, x) }
public func log(_ x: Num) -> Num { fn(.log, x) }
public func log2(_ x: Num) -> Num { fn(.log2, x) }
public func sqrt(_ x: Num) -> Num { fn(.sqrt, x) }
public func tanh(_ x: Num) -> Num { fn(.tanh, x) }
public func sin(_ x: Num) -> Num { fn(.sin, x) }
public func cos(_ x: Num) -> Num { fn(.cos, x) }
public func tan(_ x: Num) -> Num { fn(.tan, x) }
public func sigmoid(_ x: Num) -> Num { fn(.sigmoid, x) }

extension Capturable {
    /// `t[i]`, `t[i, j]`, ... : reads the captured tensor at integer indices (negative ones wrap once).
    public subscript(_ indices: Num...) -> Num {
        Num(traced { try .makeLoad(captureInfo, indices.map(\.expr)) })
    }
}

// MARK: - Mods

/// PyTorch's `score_mod`: rewrites each attention score.
///
/// ```swift
/// let causalBias = ScoreMod { score, b, h, q, kv in select(q >= kv, score, Num(-Float.infinity)) }
/// let alibi = try ScoreMod(parsing: "score + slope[h] * (kv_idx - q_idx)", captures: ["slope": slopes])
/// ```
/// The closure runs once, at construction, on symbolic arguments; what it builds is the graph.
/// A type error Swift cannot see (indexing with a float, `~` on a float) is kept and thrown by
/// ``check()`` and by everything that uses the mod.
public struct ScoreMod: Sendable, CustomStringConvertible {
    /// The expression graph (of type float).
    public let graph: Expr

    public init(_ body: (_ score: Num, _ b: Num, _ h: Num, _ q: Num, _ kv: Num) -> Num) {
        graph = body(Num(.arg(.score)), Num(.arg(.b)), Num(.arg(.h)), Num(.arg(.q)), Num(.arg(.kv))).expr
    }

    /// A mod from its graph (checked by ``check()``).
    public init(graph: Expr) { self.graph = graph }

    /// The identity: `score` unchanged.
    public static let identity = ScoreMod { score, _, _, _, _ in score }

    /// Whether the mod returns `score` unchanged.
    public var isIdentity: Bool { graph == .arg(.score) }

    /// Throws the type error the closure made, if any. A score-mod must give a number; an int
    /// result is promoted to float, as PyTorch does when it adds to the float score.
    ///
    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public func check() throws {
        do {
            let t = try graph.type()
            guard t.isNumber else { throw FlexError.expression(ExpressionError("a score_mod must return a number, not a bool (use where(cond, score, -inf) to mask)", role: "score_mod")) }
        } catch FlexError.expression(var e) { e.role = "score_mod"; throw FlexError.expression(e) }
    }

    public var description: String { graph.text }
}

/// PyTorch's `mask_mod`: says which (query, key) pairs exist.
///
/// ```swift
/// let causal = MaskMod { b, h, q, kv in q >= kv }
/// let document = andMasks(causal, MaskMod { _, _, q, kv in docs[q] == docs[kv] })
/// ```
public struct MaskMod: Sendable, CustomStringConvertible {
    /// The expression graph (of type bool).
    public let graph: Expr

    public init(_ body: (_ b: Num, _ h: Num, _ q: Num, _ kv: Num) -> Cond) {
        graph = body(Num(.arg(.b)), Num(.arg(.h)), Num(.arg(.q)), Num(.arg(.kv))).expr
    }

    public init(graph: Expr) { self.graph = graph }

    /// Throws the type error the closure made, if any.
    ///
    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public func check() throws {
        do {
            guard try graph.type() == .bool else { throw FlexError.expression(ExpressionError("a mask_mod must return a bool (a comparison), not a number", role: "mask_mod")) }
        } catch FlexError.expression(var e) { e.role = "mask_mod"; throw FlexError.expression(e) }
        if graph.uses(.score) { throw FlexError.expression(ExpressionError("score is not available in a mask_mod (use a score_mod)", role: "mask_mod")) }
    }

    /// Whether every pair is kept.
    public var isNoop: Bool { graph == .bool(true) }

    public var description: String { graph.text }
}

/// The mask that keeps every pair.
public let noopMask = MaskMod { _, _, _, _ in true }

/// The intersection of masks (PyTorch's `and_masks`).
public func andMasks(_ masks: MaskMod...) -> MaskMod { combine(masks, .and, identity: true) }
/// The union of masks (PyTorch's `or_masks`).
public func orMasks(_ masks: MaskMod...) -> MaskMod { combine(masks, .or, identity: false) }

private func combine(_ masks: [MaskMod], _ op: BinaryOp, identity: Bool) -> MaskMod {
    guard var acc = masks.first?.graph else { return MaskMod(graph: .bool(identity)) }
    for m in masks.dropFirst() { acc = bin(op, acc, m.graph) }
    return MaskMod(graph: acc)
}
