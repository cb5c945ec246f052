import Foundation

extension Expr {
    /// The derivative of this (score-mod) graph with respect to `score`, simplified; what the
    /// backward pass splices as `score_mod_grad`. Gradients follow PyTorch's autograd
    /// conventions: `abs` has gradient 0 at 0, `minimum`/`maximum` split ties evenly, `clamp`
    /// passes the gradient inside `[lo, hi]` (inclusive), `floor` and `//` have gradient 0.
    ///
    /// ```swift
    /// let softcap = ScoreMod { score, _, _, _, _ in 20 * tanh(score / 20) }
    /// print(softcap.graph.derivative().text)   // (1.0 - (tanh((score / 20)) * tanh((score / 20))))
    /// ```
    public func derivative(_ wrt: Argument = .score) -> Expr {
        d(.arg(wrt)).simplified()
    }

    /// The derivative of this graph with respect to one of its nodes, taken as an independent
    /// variable: a float load of a captured tensor (what the gradient of a learnable bias
    /// scatters, by the load's index), or an argument. A node read in several places (the same
    /// load twice) gets the sum of its paths.
    ///
    /// ```swift
    /// let rb = try device.tensor([Float](repeating: 0, count: 2 * S - 1), shape: [2 * S - 1], name: "rb")
    /// let rel = try ScoreMod(parsing: "score + rb[q_idx - kv_idx + \(S - 1)]", captures: ["rb": rb])
    /// for load in rel.graph.floatLoads { print(rel.graph.derivative(withRespectTo: load).text) }   // 1.0
    /// ```
    public func derivative(withRespectTo node: Expr) -> Expr {
        d(node).simplified()
    }

    /// The distinct loads of float captures the graph reads, in order of first appearance
    /// (depth-first, left to right): the variables of the captures' gradients.
    public var floatLoads: [Expr] {
        var seen: [Expr] = []
        func walk(_ e: Expr) {
            for c in e.children { walk(c) }
            if case .load(let cap, _) = e, cap.dtype == .float32, !seen.contains(e) { seen.append(e) }
        }
        walk(self)
        return seen
    }

    private func d(_ x: Expr) -> Expr {
        if self == x { return .float(1) }
        guard contains(where: { $0 == x }), (try? type()) == .float else { return .float(0) }
        switch self {
        case .arg, .int, .float, .bool, .invalid, .load: return .float(0)
        case .unary(let op, let a):
            return op == .neg ? .unary(.neg, a.d(x)) : .float(0)
        case .binary(let op, let a, let b):
            let da = a.d(x), db = b.d(x)
            switch op {
            case .add: return .binary(.add, da, db)
            case .sub: return .binary(.sub, da, db)
            case .mul: return .binary(.add, .binary(.mul, da, b), .binary(.mul, a, db))
            case .div:
                if !b.contains(where: { $0 == x }) { return .binary(.div, da, b) }
                return .binary(.div, .binary(.sub, .binary(.mul, da, b), .binary(.mul, a, db)), .binary(.mul, b, b))
            case .floorDiv: return .float(0)
            case .mod: // a - b * floor(a / b)
                return .binary(.sub, da, .binary(.mul, db, .call(.floor, [.binary(.div, a, b)])))
            case .pow:
                if !b.contains(where: { $0 == x }) {
                    return .binary(.mul, .binary(.mul, b, .binary(.pow, a, .binary(.sub, b, .int(1)))), da)
                }
                return .binary(.mul, .binary(.pow, a, b),
                               .binary(.add, .binary(.mul, db, .call(.log, [a])), .binary(.div, .binary(.mul, b, da), a)))
            case .min, .max:
                let pick: BinaryOp = op == .min ? .lt : .gt
                return .select(.binary(.eq, a, b), .binary(.mul, .binary(.add, da, db), .float(0.5)),
                               .select(.binary(pick, a, b), da, db))
            default: return .float(0)
            }
        case .call(let f, let args):
            let a = args[0], da = a.d(x)
            let inner: Expr
            switch f {
            case .abs: return .select(.binary(.gt, a, .int(0)), da, .select(.binary(.lt, a, .int(0)), .unary(.neg, da), .float(0)))
            case .floor: return .float(0)
            case .exp: inner = .call(.exp, [a])
            case .exp2: inner = .binary(.mul, .call(.exp2, [a]), .float(M_LN2))
            case .log: return .binary(.div, da, a)
            case .log2: return .binary(.div, da, .binary(.mul, a, .float(M_LN2)))
            case .sqrt: return .binary(.div, da, .binary(.mul, .float(2), .call(.sqrt, [a])))
            case .tanh: inner = .binary(.sub, .float(1), .binary(.mul, .call(.tanh, [a]), .call(.tanh, [a])))
            case .sin: inner = .call(.cos, [a])
            case .cos: inner = .unary(.neg, .call(.sin, [a]))
            case .tan: inner = .binary(.add, .float(1), .binary(.mul, .call(.tan, [a]), .call(.tan, [a])))
            case .sigmoid: inner = .binary(.mul, .call(.sigmoid, [a]), .binary(.sub, .float(1), .call(.sigmoid, [a])))
            case .clamp:
                let lo = args[1], hi = args[2]
                let inside = Expr.binary(.and, .binary(.ge, a, lo), .binary(.le, a, hi))
                let toLo = Expr.binary(.and, .binary(.lt, a, lo), .binary(.lt, lo, hi))
                return .select(inside, da, .select(toLo, lo.d(x), hi.d(x)))
            }
            return .binary(.mul, inner, da)
        case .select(let c, let a, let b):
            return .select(c, a.d(x), b.d(x))
        }
    }

    /// Folds constants and removes identities (`x + 0`, `x * 1`, `x * 0`, `--x`, `where(c, a, a)`).
    public func simplified() -> Expr {
        switch self {
        case .arg, .int, .float, .bool, .invalid: return self
        case .load(let c, let idx): return .load(c, idx.map { $0.simplified() })
        case .unary(let op, let a):
            let s = a.simplified()
            if op == .neg {
                if case .float(let v) = s { return .float(-v) }
                if case .int(let v) = s { return .int(0 &- v) }
                if case .unary(.neg, let inner) = s { return inner }
            }
            return .unary(op, s)
        case .call(let f, let args): return .call(f, args.map { $0.simplified() })
        case .select(let c, let a, let b):
            let sa = a.simplified(), sb = b.simplified(), sc = c.simplified()
            if sa == sb { return sa }
            if case .bool(let v) = sc { return v ? sa : sb }
            return .select(sc, sa, sb)
        case .binary(let op, let a, let b):
            let sa = a.simplified(), sb = b.simplified()
            let za = sa.isZero, zb = sb.isZero, oa = sa.isOne, ob = sb.isOne
            // Keep the type float when an identity would leave an int behind in a float position.
            func keepFloat(_ e: Expr) -> Expr { (try? e.type()) == .int && (try? self.type()) == .float ? .binary(.mul, e, .float(1)) : e }
            switch op {
            case .add:
                if za { return keepFloat(sb) }
                if zb { return keepFloat(sa) }
            case .sub:
                if zb { return keepFloat(sa) }
                if za { return keepFloat(Expr.unary(.neg, sb).simplified()) }
            case .mul:
                if za || zb { return (try? self.type()) == .int ? .int(0) : .float(0) }
                if oa, (try? sb.type()) == .float { return sb }
                if ob, (try? sa.type()) == .float { return sa }
            case .div:
                if ob, (try? sa.type()) == .float { return sa }
                if za, !sb.isZero { return .float(0) }
            default: break
            }
            if let x = sa.constantValue, let y = sb.constantValue, (try? self.type()) == .float {
                switch op {
                case .add: return .float(x + y)
                case .sub: return .float(x - y)
                case .mul: return .float(x * y)
                case .div: return .float(x / y)
                default: break
                }
            }
            return .binary(op, sa, sb)
        }
    }

    /// The value of an int or float literal.
    var constantValue: Double? {
        if case .float(let v) = self { return v }
        if case .int(let v) = self { return Double(v) }
        return nil
    }

    var isZero: Bool {
        if case .float(let v) = self { return v == 0 }
        if case .int(let v) = self { return v == 0 }
        return false
    }

    var isOne: Bool {
        if case .float(let v) = self { return v == 1 }
        if case .int(let v) = self { return v == 1 }
        return false
    }
}
