import Foundation

extension ScoreMod {
    /// Parses the text form of a score-mod (Python syntax and precedence, as in PyTorch):
    ///
    /// ```swift
    /// let mod = try ScoreMod(parsing: "where(q_idx >= kv_idx, score + slope[h] * (kv_idx - q_idx), -inf)",
    ///                        captures: ["slope": slopes])
    /// ```
    /// Names: `score`, `b`, `h`, `q_idx`, `kv_idx` (aliases `q`, `kv`, `batch`, `head`, `token_q`,
    /// `token_kv`, `k_idx`, which a capture of the same name shadows), `inf`, `nan`, `True`,
    /// `False`, the captures, and the functions of the expression language.
    ///
    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public init(parsing text: String, captures: [String: any Capturable] = [:]) throws {
        var parser = ModParser(text: text, role: "score_mod", allowScore: true, captures: captures)
        let expr = try parser.parse()
        guard let t = try? expr.type(), t.isNumber else {
            throw FlexError.expression(ExpressionError("a score_mod must give a number, not a condition (use where(cond, score, -inf) to mask)",
                                                       role: "score_mod", text: text, position: 0))
        }
        self.init(graph: expr)
    }
}

extension MaskMod {
    /// Parses the text form of a mask-mod, e.g. `"(q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])"`.
    ///
    /// - Throws: ``FlexError/expression(_:)`` for an expression that does not parse or type-check (with a caret where the text form was used).
    public init(parsing text: String, captures: [String: any Capturable] = [:]) throws {
        var parser = ModParser(text: text, role: "mask_mod", allowScore: false, captures: captures)
        let expr = try parser.parse()
        guard (try? expr.type()) == .bool else {
            throw FlexError.expression(ExpressionError("a mask_mod must give a condition (a comparison), not a number",
                                                       role: "mask_mod", text: text, position: 0))
        }
        self.init(graph: expr)
    }
}

struct ModParser {
    enum Tok: Equatable {
        case int(Int), float(Double), name(String), op(String), end
    }
    struct Token { var tok: Tok; var pos: Int }

    enum Value {
        case expr(Expr)
        case tensor(CaptureInfo, [Expr])
        case function(String)
    }

    let text: String
    let role: String
    let allowScore: Bool
    let captures: [String: CaptureInfo]
    var tokens: [Token] = []
    var index = 0

    init(text: String, role: String, allowScore: Bool, captures: [String: any Capturable]) {
        self.text = text
        self.role = role
        self.allowScore = allowScore
        self.captures = captures.mapValues(\.captureInfo)
    }

    func fail(_ message: String, at pos: Int) -> FlexError {
        .expression(ExpressionError(message, role: role, text: text, position: pos))
    }

    static let functions: Set<String> = ["where", "minimum", "maximum", "min", "max", "abs", "floor", "exp", "exp2",
                                         "log", "log2", "sqrt", "tanh", "sin", "cos", "tan", "sigmoid", "clamp", "pow"]

    mutating func tokenize() throws {
        let chars = Array(text.unicodeScalars)
        var i = 0
        while i < chars.count {
            let c = chars[i]
            if c == " " || c == "\t" || c == "\n" { i += 1; continue }
            let start = i
            if CharacterSet.decimalDigits.contains(c) || (c == "." && i + 1 < chars.count && CharacterSet.decimalDigits.contains(chars[i + 1])) {
                var s = ""
                var isFloat = false
                while i < chars.count, CharacterSet.decimalDigits.contains(chars[i]) || chars[i] == "_" { if chars[i] != "_" { s.unicodeScalars.append(chars[i]) }; i += 1 }
                if i < chars.count, chars[i] == "." { isFloat = true; s += "."; i += 1
                    while i < chars.count, CharacterSet.decimalDigits.contains(chars[i]) { s.unicodeScalars.append(chars[i]); i += 1 } }
                if i < chars.count, chars[i] == "e" || chars[i] == "E" {
                    var j = i + 1
                    if j < chars.count, chars[j] == "+" || chars[j] == "-" { j += 1 }
                    if j < chars.count, CharacterSet.decimalDigits.contains(chars[j]) {
                        isFloat = true
                        s += String(String.UnicodeScalarView(chars[i..<j]))
                        i = j
                        while i < chars.count, CharacterSet.decimalDigits.contains(chars[i]) { s.unicodeScalars.append(chars[i]); i += 1 }
                    }
                }
                if isFloat {
                    guard let v = Double(s.hasPrefix(".") ? "0" + s : (s.hasSuffix(".") ? s + "0" : s)) else { throw fail("bad number \(s)", at: start) }
                    tokens.append(Token(tok: .float(v), pos: start))
                } else {
                    guard let v = Int(s) else { throw fail("integer \(s) is too large", at: start) }
                    tokens.append(Token(tok: .int(v), pos: start))
                }
                continue
            }
            if CharacterSet.letters.contains(c) || c == "_" {
                var s = ""
                while i < chars.count, CharacterSet.alphanumerics.contains(chars[i]) || chars[i] == "_" { s.unicodeScalars.append(chars[i]); i += 1 }
                tokens.append(Token(tok: .name(s), pos: start))
                continue
            }
            let two = i + 1 < chars.count ? String(String.UnicodeScalarView([c, chars[i + 1]])) : ""
            if ["//", "**", "<=", ">=", "==", "!=", "&&", "||"].contains(two) {
                if two == "&&" || two == "||" { throw fail("\(two) is not Python: use \(two.first!) (elementwise, as on PyTorch tensors)", at: start) }
                tokens.append(Token(tok: .op(two), pos: start)); i += 2; continue
            }
            let one = String(c)
            if "+-*/%&|^~<>()[],.".contains(one) {
                tokens.append(Token(tok: .op(one), pos: start)); i += 1; continue
            }
            if one == "!" { throw fail("! is not Python: use ~ to negate a condition", at: start) }
            throw fail("unexpected character '\(one)'", at: start)
        }
        tokens.append(Token(tok: .end, pos: chars.count))
    }

    var peek: Token { tokens[index] }
    mutating func advance() -> Token { let t = tokens[index]; index += 1; return t }
    mutating func accept(_ op: String) -> Bool {
        if peek.tok == .op(op) { index += 1; return true }
        return false
    }
    mutating func expect(_ op: String, context: String) throws {
        guard accept(op) else { throw fail("expected '\(op)' \(context)", at: peek.pos) }
    }

    /// Names a capture cannot take: the mod's own arguments (in Python a parameter hides a global
    /// of the same name, so PyTorch could not read such a capture either) and the language's words.
    static let reservedNames: Set<String> = ["score", "b", "h", "q_idx", "kv_idx", "inf", "nan", "True", "False", "torch", "math",
                                             "and", "or", "not", "if", "else"]

    mutating func parse() throws -> Expr {
        for name in captures.keys.sorted() where ModParser.reservedNames.contains(name) || ModParser.functions.contains(name) {
            let what = ["score", "b", "h", "q_idx", "kv_idx"].contains(name) ? "the \(role)'s argument \(name)"
                : ModParser.functions.contains(name) ? "the function \(name)" : "a word of the expression language"
            throw FlexError.expression(ExpressionError("a captured tensor cannot be named '\(name)': that is \(what); rename the capture",
                                                       role: role, text: text, position: 0))
        }
        try tokenize()
        if peek.tok == .end { throw fail("empty expression", at: 0) }
        let (v, pos) = try parseComparison()
        let e = try asExpr(v, at: pos)
        guard peek.tok == .end else {
            if case .name(let n) = peek.tok, ["and", "or", "not", "if", "else"].contains(n) {
                throw fail("'\(n)' does not work on tensors: use &, | and ~ with parentheses", at: peek.pos)
            }
            throw fail("unexpected \(describe(peek.tok)) after a complete expression", at: peek.pos)
        }
        return e
    }

    func describe(_ t: Tok) -> String {
        switch t {
        case .int(let v): return "number \(v)"
        case .float(let v): return "number \(v)"
        case .name(let n): return "name '\(n)'"
        case .op(let o): return "'\(o)'"
        case .end: return "end of text"
        }
    }

    func asExpr(_ v: Value, at pos: Int) throws -> Expr {
        switch v {
        case .expr(let e): return e
        case .tensor(let cap, let idx):
            throw fail("\(cap.name) has \(cap.shape.count) dimension\(cap.shape.count == 1 ? "" : "s") (shape \(cap.shape)) but is indexed with \(idx.count)", at: pos)
        case .function(let name):
            throw fail("\(name) is a function: call it, e.g. \(name)(x)", at: pos)
        }
    }

    func build(_ pos: Int, _ make: () throws -> Expr) throws -> Expr {
        do { return try make() } catch FlexError.expression(let e) { throw fail(e.message, at: pos) }
    }

    static let comparisons: [String: BinaryOp] = ["<": .lt, "<=": .le, ">": .gt, ">=": .ge, "==": .eq, "!=": .ne]

    mutating func parseComparison() throws -> (Value, Int) {
        let (lhs, pos) = try parseBinary(level: 0)
        guard case .op(let o) = peek.tok, let op = ModParser.comparisons[o] else { return (lhs, pos) }
        let opPos = advance().pos
        let (rhs, rpos) = try parseBinary(level: 0)
        if case .op(let o2) = peek.tok, ModParser.comparisons[o2] != nil {
            throw fail("chained comparisons are not supported on tensors: write (a \(o) b) & (b \(o2) c)", at: peek.pos)
        }
        let a = try asExpr(lhs, at: pos), b = try asExpr(rhs, at: rpos)
        return (.expr(try build(opPos) { try .makeBinary(op, a, b) }), pos)
    }

    /// Binary levels from loosest to tightest: | ^ & (+ -) (* / // %)
    static let levels: [[String: BinaryOp]] = [
        ["|": .or], ["^": .xor], ["&": .and], ["+": .add, "-": .sub],
        ["*": .mul, "/": .div, "//": .floorDiv, "%": .mod],
    ]

    mutating func parseBinary(level: Int) throws -> (Value, Int) {
        if level == ModParser.levels.count { return try parseUnary() }
        var (lhs, pos) = try parseBinary(level: level + 1)
        while case .op(let o) = peek.tok, let op = ModParser.levels[level][o] {
            let opPos = advance().pos
            let (rhs, rpos) = try parseBinary(level: level + 1)
            let a = try asExpr(lhs, at: pos), b = try asExpr(rhs, at: rpos)
            lhs = .expr(try build(opPos) { try .makeBinary(op, a, b) })
        }
        return (lhs, pos)
    }

    mutating func parseUnary() throws -> (Value, Int) {
        let pos = peek.pos
        if accept("-") {
            let (v, p) = try parseUnary()
            let e = try asExpr(v, at: p)
            return (.expr(try build(pos) { try .makeUnary(.neg, e) }), pos)
        }
        if accept("+") {
            let (v, p) = try parseUnary()
            let e = try asExpr(v, at: p)
            guard (try? e.type())?.isNumber == true else { throw fail("unary + needs a number", at: pos) }
            return (.expr(e), pos)
        }
        if accept("~") {
            let (v, p) = try parseUnary()
            let e = try asExpr(v, at: p)
            return (.expr(try build(pos) { try .makeUnary(.bitNot, e) }), pos)
        }
        return try parsePower()
    }

    mutating func parsePower() throws -> (Value, Int) {
        let (base, pos) = try parsePostfix()
        if case .op("**") = peek.tok {
            let opPos = advance().pos
            let (exp, epos) = try parseUnary() // right-associative, binds tighter than unary on its left
            let a = try asExpr(base, at: pos), b = try asExpr(exp, at: epos)
            return (.expr(try build(opPos) { try .makeBinary(.pow, a, b) }), pos)
        }
        return (base, pos)
    }

    mutating func parseArgs(close: String) throws -> [(Expr, Int)] {
        var args: [(Expr, Int)] = []
        if accept(close) { return args }
        repeat {
            if case .name(let n) = peek.tok, index + 1 < tokens.count, tokens[index + 1].tok == .op("=") {
                throw fail("keyword argument \(n)= is not supported: pass arguments by position", at: peek.pos)
            }
            let (v, p) = try parseComparison()
            args.append((try asExpr(v, at: p), p))
        } while accept(",")
        try expect(close, context: close == ")" ? "to close the call" : "to close the index")
        return args
    }

    mutating func parsePostfix() throws -> (Value, Int) {
        var (value, pos) = try parseAtom()
        while true {
            if case .op("[") = peek.tok {
                let bracket = advance().pos
                guard case .tensor(let cap, let prior) = value else {
                    throw fail("only captured tensors can be indexed", at: bracket)
                }
                let idx = try parseArgs(close: "]")
                let all = prior + idx.map(\.0)
                guard all.count <= cap.shape.count else {
                    throw fail("\(cap.name) has \(cap.shape.count) dimension\(cap.shape.count == 1 ? "" : "s") (shape \(cap.shape)) but is indexed with \(all.count)", at: bracket)
                }
                for (e, p) in idx where (try? e.type()) != .int {
                    throw fail("indices must be ints, got a \((try? e.type())?.rawValue ?? "?") (use // for integer division)", at: p)
                }
                value = all.count == cap.shape.count ? .expr(try build(bracket) { try .makeLoad(cap, all) }) : .tensor(cap, all)
            } else if case .op("(") = peek.tok {
                let paren = advance().pos
                guard case .function(let name) = value else { throw fail("this is not a function", at: paren) }
                let args = try parseArgs(close: ")")
                value = .expr(try call(name, args, at: pos))
            } else if case .op(".") = peek.tok {
                let dot = advance().pos
                guard case .name(let method) = advance().tok, ModParser.functions.contains(method), method != "where" else {
                    throw fail("unknown method after '.': methods are abs, clamp, floor, exp, ... as functions", at: dot + 1)
                }
                try expect("(", context: "after .\(method)")
                let receiver = try asExpr(value, at: pos)
                let args = try parseArgs(close: ")")
                value = .expr(try call(method, [(receiver, pos)] + args, at: dot + 1))
            } else {
                return (value, pos)
            }
        }
    }

    func call(_ name: String, _ args: [(Expr, Int)], at pos: Int) throws -> Expr {
        let es = args.map(\.0)
        func arity(_ n: Int) throws {
            guard es.count == n else { throw fail("\(name) takes \(n) argument\(n == 1 ? "" : "s"), got \(es.count)", at: pos) }
        }
        switch name {
        case "where":
            try arity(3)
            return try build(args[0].1) { try .makeSelect(es[0], es[1], es[2]) }
        case "minimum", "min":
            try arity(2); return try build(pos) { try .makeBinary(.min, es[0], es[1]) }
        case "maximum", "max":
            try arity(2); return try build(pos) { try .makeBinary(.max, es[0], es[1]) }
        case "pow":
            try arity(2); return try build(pos) { try .makeBinary(.pow, es[0], es[1]) }
        default:
            let f = Function(rawValue: name)!
            try arity(f.arity)
            return try build(pos) { try .makeCall(f, es) }
        }
    }

    mutating func parseAtom() throws -> (Value, Int) {
        let t = advance()
        switch t.tok {
        case .int(let v):
            guard let i = Int32(exactly: v) else { throw fail("integer \(v) does not fit in int32", at: t.pos) }
            return (.expr(.int(i)), t.pos)
        case .float(let v):
            return (.expr(.float(v)), t.pos)
        case .op("("):
            let (v, _) = try parseComparison()
            try expect(")", context: "to close '(' at \(t.pos)")
            return (v, t.pos)
        case .name(var name):
            if (name == "torch" || name == "math") && peek.tok == .op(".") {
                index += 1
                guard case .name(let n) = advance().tok else { throw fail("expected a name after \(name).", at: t.pos) }
                name = n
                if n == "inf" || n == "nan" || n == "pi" || n == "e" {
                    let v: Double = n == "inf" ? .infinity : n == "nan" ? .nan : n == "pi" ? Double.pi : M_E
                    return (.expr(.float(v)), t.pos)
                }
            }
            // A capture shadows the aliases (batch, head, q, kv, ...), as any Python name would.
            if let cap = captures[name] { return (.tensor(cap, []), t.pos) }
            switch name {
            case "score":
                guard allowScore else { throw fail("score is not available in a mask_mod (use a score_mod)", at: t.pos) }
                return (.expr(.arg(.score)), t.pos)
            case "b", "batch": return (.expr(.arg(.b)), t.pos)
            case "h", "head": return (.expr(.arg(.h)), t.pos)
            case "q_idx", "q", "token_q": return (.expr(.arg(.q)), t.pos)
            case "kv_idx", "kv", "token_kv", "k_idx": return (.expr(.arg(.kv)), t.pos)
            case "inf": return (.expr(.float(.infinity)), t.pos)
            case "nan": return (.expr(.float(.nan)), t.pos)
            case "True": return (.expr(.bool(true)), t.pos)
            case "False": return (.expr(.bool(false)), t.pos)
            default: break
            }
            if let cap = captures[name] { return (.tensor(cap, []), t.pos) }
            if ModParser.functions.contains(name) {
                guard peek.tok == .op("(") else { throw fail("\(name) is a function: call it, e.g. \(name)(x)", at: t.pos) }
                return (.function(name), t.pos)
            }
            if ["and", "or", "not"].contains(name) {
                throw fail("'\(name)' does not work on tensors: use &, | and ~ with parentheses", at: t.pos)
            }
            var known = allowScore ? ["score"] : []
            known += ["b", "h", "q_idx", "kv_idx"] + captures.keys.sorted()
            throw fail("unknown name '\(name)' (known: \(known.joined(separator: ", ")))", at: t.pos)
        case .end:
            throw fail("the expression ends too early", at: t.pos)
        default:
            throw fail("unexpected \(describe(t.tok))", at: t.pos)
        }
    }
}

// MARK: - Printing

extension Expr {
    /// The expression in the text form (Python syntax, fully parenthesized), parseable again.
    public var text: String {
        switch self {
        case .arg(let a): return a.rawValue
        case .int(let v): return String(v)
        case .float(let v):
            if v.isNaN { return "nan" }
            if v.isInfinite { return v < 0 ? "-inf" : "inf" }
            let s = "\(v)"
            return s.contains(".") || s.contains("e") ? s : s + ".0"
        case .bool(let v): return v ? "True" : "False"
        case .invalid(let m): return "<invalid: \(m)>"
        case .unary(let op, let x): return "(\(op == .neg ? "-" : "~")\(x.text))"
        case .binary(let op, let a, let b):
            switch op {
            case .min, .max: return "\(op.rawValue)(\(a.text), \(b.text))"
            default: return "(\(a.text) \(op.rawValue) \(b.text))"
            }
        case .call(let f, let args): return "\(f.rawValue)(\(args.map(\.text).joined(separator: ", ")))"
        case .select(let c, let a, let b): return "where(\(c.text), \(a.text), \(b.text))"
        case .load(let cap, let idx): return "\(cap.name)[\(idx.map(\.text).joined(separator: ", "))]"
        }
    }
}
