import Foundation

/// Reverse-mode differentiation of a score-mod at one point, in float64: the value, the
/// derivative by `score`, and the derivative by every element of the float captures it reads
/// (each load's adjoint added to the element it read). An implementation independent of the
/// symbolic ``Expr/derivative(withRespectTo:)`` the kernels splice, with the same conventions
/// (PyTorch autograd's): `abs` has gradient 0 at 0, `minimum`/`maximum` split ties evenly,
/// `clamp` passes the gradient inside `[lo, hi]`, `floor`, `//` and every int node have none.
/// What the float64 reference of the captures' gradients is built on.
///
/// ```swift
/// let alibi = ScoreMod { score, _, h, q, kv in score + slope[h] * (kv - q) }
/// let rm = try ReverseMode(alibi.graph)
/// let point = rm.evaluate(score: 0.3, b: 0, h: 1, q: 5, kv: 2)
/// // point.captures[slope.captureInfo.id]?[1]: d alibi / d slope[1] = kv - q = -3
/// ```
public final class ReverseMode: @unchecked Sendable {
    /// The graph at one point: its value and its derivatives.
    public struct Point {
        /// The score-mod's value.
        public var value: Double
        /// Its derivative by `score`.
        public var dScore: Double
        /// Capture id → (element → derivative), for the elements the point read.
        public var captures: [Int: [Int: Double]]
    }

    /// The score-mod differentiated.
    public let graph: Expr
    private let values: [Int: CaptureValues]
    private var interpreters: [Expr: Interpreter] = [:]
    private let lock = NSLock()

    /// - Parameter captures: values of captured tensors by capture id (device tensors and host
    ///   tensors in the graph supply their own).
    /// - Throws: ``FlexError/expression(_:)`` for a graph that does not type-check.
    public init(_ graph: Expr, captures: [Int: CaptureValues] = [:]) throws {
        _ = try graph.type()
        self.graph = graph
        var v = captures
        try Interpreter.collectHostValues(graph, into: &v)
        values = v
    }

    private func interpreter(_ e: Expr) -> Interpreter {
        lock.withLock {
            if let i = interpreters[e] { return i }
            let i = try! Interpreter(e, captures: values)   // a subgraph of a graph that type-checked
            interpreters[e] = i
            return i
        }
    }

    /// The graph's value and derivatives at one point.
    public func evaluate(score: Double, b: Int, h: Int, q: Int, kv: Int) -> Point {
        var point = Point(value: interpreter(graph).float(score: score, b: b, h: h, q: q, kv: kv), dScore: 0, captures: [:])
        func value(_ e: Expr) -> Double { interpreter(e).float(score: score, b: b, h: h, q: q, kv: kv) }
        func back(_ e: Expr, _ adj: Double) {
            guard (try? e.type()) == .float else { return }   // int and bool nodes carry no gradient
            switch e {
            case .arg(.score): point.dScore += adj
            case .arg, .int, .float, .bool, .invalid: return
            case .load(let cap, let idx):
                var flat = 0
                for (d, i) in idx.enumerated() {
                    var x = Int(interpreter(i).int(b: b, h: h, q: q, kv: kv, score: score))
                    if x < 0 { x += cap.shape[d] }
                    guard x >= 0, x < cap.shape[d] else { return }
                    flat = flat * cap.shape[d] + x
                }
                point.captures[cap.id, default: [:]][flat, default: 0] += adj
            case .unary(let op, let a):
                if op == .neg { back(a, -adj) }
            case .binary(let op, let a, let c):
                let va = value(a), vc = value(c)
                switch op {
                case .add: back(a, adj); back(c, adj)
                case .sub: back(a, adj); back(c, -adj)
                case .mul: back(a, adj * vc); back(c, adj * va)
                case .div: back(a, adj / vc); back(c, -adj * va / (vc * vc))
                case .mod: back(a, adj); back(c, -adj * Foundation.floor(va / vc))
                case .pow:
                    back(a, adj * vc * Foundation.pow(va, vc - 1))
                    if c.contains(where: { (try? $0.type()) == .float }) { back(c, adj * Foundation.pow(va, vc) * Foundation.log(va)) }
                case .min, .max:
                    if va == vc { back(a, adj / 2); back(c, adj / 2) }
                    else if (op == .min) == (va < vc) { back(a, adj) } else { back(c, adj) }
                default: return
                }
            case .call(let f, let args):
                let a = args[0], va = value(a)
                switch f {
                case .abs: back(a, va > 0 ? adj : va < 0 ? -adj : 0)
                case .floor: return
                case .exp: back(a, adj * Foundation.exp(va))
                case .exp2: back(a, adj * Foundation.exp2(va) * M_LN2)
                case .log: back(a, adj / va)
                case .log2: back(a, adj / (va * M_LN2))
                case .sqrt: back(a, adj / (2 * va.squareRoot()))
                case .tanh: let t = Foundation.tanh(va); back(a, adj * (1 - t * t))
                case .sin: back(a, adj * Foundation.cos(va))
                case .cos: back(a, -adj * Foundation.sin(va))
                case .tan: let t = Foundation.tan(va); back(a, adj * (1 + t * t))
                case .sigmoid: let s = 1 / (1 + Foundation.exp(-va)); back(a, adj * s * (1 - s))
                case .clamp:
                    let lo = value(args[1]), hi = value(args[2])
                    if va >= lo && va <= hi { back(a, adj) } else if va < lo && lo < hi { back(args[1], adj) } else { back(args[2], adj) }
                }
            case .select(let c, let x, let y):
                back(interpreter(c).bool(b: b, h: h, q: q, kv: kv, score: score) ? x : y, adj)
            }
        }
        back(graph, 1)
        return point
    }
}
