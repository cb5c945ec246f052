import CSPIRVOpt
@_exported import VKFlexCore
import Foundation

/// The role of a `VK_KHR_cooperative_matrix` type in `D = A·B + C` (SPIR-V's `Cooperative Matrix
/// Use`).
public enum CooperativeMatrixUse: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case a = 0, b = 1, accumulator = 2
    public var description: String { ["A", "B", "accumulator"][Int(rawValue)] }
}

/// Rewrites a SPIR-V module written against `SPV_NV_cooperative_matrix` into one against
/// `SPV_KHR_cooperative_matrix`.
///
/// vkflex writes its cooperative-matrix kernels in GLSL with `GL_NV_cooperative_matrix`, the only
/// cooperative-matrix extension the glslang of Debian 12 (12.0) compiles. NV matrix types carry no
/// use, so NVIDIA's compiler lays every fp16 fragment out as an A operand and transposes it with
/// a `MOVM` per register at each product that takes it as B (docs/performance.md). KHR types say
/// what each matrix is for, so a B operand is loaded in its own layout. This pass gives every
/// matrix value its use:
///
/// - the operands and results of `OpCooperativeMatrixMulAddNV` fix the uses they take;
/// - loads, stores, access chains, copies, φ and selects share a use between the values (and the
///   variables) they connect, so each connected group of values gets one use;
/// - a group that nothing fixes takes its source's use where it comes from a conversion, else
///   `accumulator` for 32-bit components and `A` for narrower ones;
/// - a type used in several roles is declared once per use, and so are constants.
///
/// A conversion between uses (an fp32 accumulator rounded into an fp16 A operand: P in attention)
/// is not allowed in core `SPV_KHR_cooperative_matrix`. It is lowered to an element-by-element
/// conversion: `elements` per invocation, extracted, converted and inserted at the same index.
/// That is correct only where both types hold the same (row, column) at each index, which the
/// caller must have measured (``CooperativeMatrixLayout``); on NVIDIA GPUs they do.
///
/// Anything the pass does not understand (a matrix passed to a function, stored in a struct, one
/// value used in two roles) throws, and the caller keeps the NV module.
///
/// ```swift
/// let khr = try CooperativeMatrixKHRRewriter.rewrite(nvWords, subgroupSize: 32)
/// ```
public enum CooperativeMatrixKHRRewriter {
    /// What the rewrite cannot do with a module (or, from ``verify(_:)``, what is wrong with one),
    /// in words, as ``FlexError/unsupported(_:)``; the device then cannot build that shader
    /// through the KHR extension (`VKFLEX_COOPMAT_API=nv` takes the NV one).
    static func Unsupported(description: String) -> FlexError { .unsupported(description) }

    // Opcodes (SPIR-V 1.6 unified, SPV_NV_cooperative_matrix, SPV_KHR_cooperative_matrix).
    enum Op {
        static let undef: UInt32 = 1, `extension`: UInt32 = 10, capability: UInt32 = 17
        static let typeArray: UInt32 = 28, typeRuntimeArray: UInt32 = 29, typeStruct: UInt32 = 30
        static let typePointer: UInt32 = 32, typeFunction: UInt32 = 33
        static let constantTrue: UInt32 = 41, constantFalse: UInt32 = 42, constant: UInt32 = 43
        static let constantComposite: UInt32 = 44, constantNull: UInt32 = 46
        static let function: UInt32 = 54, functionEnd: UInt32 = 56
        static let variable: UInt32 = 59, load: UInt32 = 61, store: UInt32 = 62
        static let accessChain: UInt32 = 65, inBoundsAccessChain: UInt32 = 66
        static let compositeConstruct: UInt32 = 80, compositeExtract: UInt32 = 81, compositeInsert: UInt32 = 82
        static let copyObject: UInt32 = 83, fConvert: UInt32 = 115
        static let fNegate: UInt32 = 127, fAdd: UInt32 = 129, fSub: UInt32 = 131, fMul: UInt32 = 133, fDiv: UInt32 = 136
        static let matrixTimesScalar: UInt32 = 143, select: UInt32 = 169, phi: UInt32 = 245
        static let typeNV: UInt32 = 5358, loadNV: UInt32 = 5359, storeNV: UInt32 = 5360, mulAddNV: UInt32 = 5361, lengthNV: UInt32 = 5362
        static let typeKHR: UInt32 = 4456, loadKHR: UInt32 = 4457, storeKHR: UInt32 = 4458, mulAddKHR: UInt32 = 4459, lengthKHR: UInt32 = 4460
        static let capabilityNV: UInt32 = 5357, capabilityKHR: UInt32 = 6022
    }

    struct Instruction {
        var op: UInt32
        var w: [UInt32]   // the operands, after the word holding count and opcode
    }

    /// Whether `words` declare `SPV_NV_cooperative_matrix`'s capability.
    public static func usesNVCooperativeMatrix(_ words: [UInt32]) -> Bool {
        // Capabilities open every module (SPIR-V's logical layout): read only those.
        var i = 5
        while i + 1 < words.count, words[i] & 0xffff == Op.capability, words[i] >> 16 >= 2 {
            if words[i + 1] == Op.capabilityNV { return true }
            i += Int(words[i] >> 16)
        }
        return false
    }

    static func parse(_ words: [UInt32]) throws -> [Instruction] {
        guard words.count >= 5, words[0] == 0x0723_0203 else { throw Unsupported(description: "not a SPIR-V module") }
        var list: [Instruction] = []
        var i = 5
        while i < words.count {
            let count = Int(words[i] >> 16), op = words[i] & 0xffff
            guard count >= 1, i + count <= words.count else { throw Unsupported(description: "truncated instruction at word \(i)") }
            list.append(Instruction(op: op, w: Array(words[(i + 1)..<(i + count)])))
            i += count
        }
        return list
    }

    static func resultLayout(_ op: UInt32) -> (result: Bool, type: Bool) {
        var r: Int32 = 0, t: Int32 = 0
        vkflex_spirv_has_result(op, &r, &t)
        return (r != 0, t != 0)
    }

    static func stringWords(_ s: String) -> [UInt32] {
        var bytes = Array(s.utf8) + [0]
        while bytes.count % 4 != 0 { bytes.append(0) }
        return stride(from: 0, to: bytes.count, by: 4).map {
            UInt32(bytes[$0]) | UInt32(bytes[$0 + 1]) << 8 | UInt32(bytes[$0 + 2]) << 16 | UInt32(bytes[$0 + 3]) << 24
        }
    }

    /// The rewritten module. `subgroupSize` sets how many elements each invocation holds where a
    /// conversion between uses is lowered (rows · columns / subgroupSize).
    ///
    /// - Throws: ``FlexError/unsupported(_:)`` naming what the module holds that the rewrite cannot take (or, from `verify`, what is wrong).
    public static func rewrite(_ words: [UInt32], subgroupSize: Int) throws -> [UInt32] {
        let list = try parse(words)
        var bound = words[3]
        func fresh() -> UInt32 { defer { bound += 1 }; return bound }

        // Types: the NV matrices and every array or pointer that holds one ("carriers").
        struct MatrixType { var component: UInt32, scope: UInt32, rows: UInt32, columns: UInt32 }
        var matrices: [UInt32: MatrixType] = [:]
        var child: [UInt32: UInt32] = [:]          // array or pointer -> its element / pointee
        var carrierOrder: [UInt32] = []           // declaration order
        var intConstants: [UInt32: (type: UInt32, value: UInt32)] = [:]
        var boolConstants: [UInt32: Bool] = [:]
        var floatWidth: [UInt32: UInt32] = [:]
        var typeOf: [UInt32: UInt32] = [:]
        func base(_ t: UInt32) -> UInt32 { var t = t; while let c = child[t] { t = c }; return t }
        func isCarrier(_ t: UInt32) -> Bool { matrices[t] != nil || child[t] != nil }

        for ins in list {
            switch ins.op {
            case Op.typeNV:
                matrices[ins.w[0]] = MatrixType(component: ins.w[1], scope: ins.w[2], rows: ins.w[3], columns: ins.w[4])
                carrierOrder.append(ins.w[0])
            case Op.typeArray, Op.typeRuntimeArray, Op.typePointer:
                let element = ins.op == Op.typePointer ? ins.w[2] : ins.w[1]
                if isCarrier(element) { child[ins.w[0]] = element; carrierOrder.append(ins.w[0]) }
            case Op.typeStruct:
                if ins.w.dropFirst().contains(where: isCarrier) { throw Unsupported(description: "a cooperative matrix inside a struct") }
            case Op.typeFunction:
                if ins.w.dropFirst().contains(where: isCarrier) { throw Unsupported(description: "a cooperative matrix as a function parameter or result") }
            case 22:   // OpTypeFloat
                floatWidth[ins.w[0]] = ins.w[1]
            case Op.constant where ins.w.count == 3:
                intConstants[ins.w[1]] = (ins.w[0], ins.w[2])
            case Op.constantTrue: boolConstants[ins.w[1]] = true
            case Op.constantFalse: boolConstants[ins.w[1]] = false
            default: break
            }
            let layout = resultLayout(ins.op)
            if layout.type, ins.w.count >= 2 { typeOf[ins.w[1]] = ins.w[0] }
        }
        guard !matrices.isEmpty else { return words }

        // Constants of matrix type (a splat, null, undef) are declared once per use they meet.
        var constants = Set<UInt32>()
        for ins in list where [Op.constantComposite, Op.constantNull, Op.undef].contains(ins.op) && isCarrier(ins.w[0]) {
            constants.insert(ins.w[1])
        }

        // Groups of values that must share a use: union-find over result ids.
        var parent: [UInt32: UInt32] = [:]
        func find(_ x: UInt32) -> UInt32 {
            var r = x
            while let p = parent[r], p != r { r = p }
            var y = x
            while let p = parent[y], p != r { parent[y] = r; y = p }
            return r
        }
        func union(_ a: UInt32, _ b: UInt32) { let ra = find(a), rb = find(b); if ra != rb { parent[ra] = rb } }
        var fixed: [(UInt32, CooperativeMatrixUse)] = []
        var conversions: [(result: UInt32, source: UInt32)] = []
        // Sites where a constant meets a use: (constant, value whose group decides) or a fixed use.
        enum Site { case group(UInt32), fixed(CooperativeMatrixUse) }
        var constantSites: [UInt32: [Site]] = [:]
        func isValue(_ id: UInt32) -> Bool { typeOf[id].map(isCarrier) == true && !constants.contains(id) }
        func connect(_ result: UInt32, _ operand: UInt32) {
            if constants.contains(operand) { constantSites[operand, default: []].append(.group(result)) }
            else if isValue(operand) { union(result, operand) }
        }
        func fix(_ id: UInt32, _ use: CooperativeMatrixUse) {
            if constants.contains(id) { constantSites[id, default: []].append(.fixed(use)) } else { fixed.append((id, use)) }
        }

        var inFunction = false
        for ins in list {
            if ins.op == Op.function {
                if isCarrier(ins.w[0]) { throw Unsupported(description: "a function returning a cooperative matrix") }
                inFunction = true
                continue
            }
            if ins.op == Op.functionEnd { inFunction = false; continue }
            guard inFunction else { continue }
            let w = ins.w
            switch ins.op {
            case Op.load:
                if isCarrier(w[0]) { connect(w[1], w[2]) }
            case Op.store:
                if isValue(w[1]) || constants.contains(w[1]) { connect(w[0], w[1]) }
            case Op.accessChain, Op.inBoundsAccessChain:
                if isCarrier(w[0]) { connect(w[1], w[2]) }
            case Op.copyObject:
                if isCarrier(w[0]) { connect(w[1], w[2]) }
            case Op.phi:
                if isCarrier(w[0]) { for k in stride(from: 2, to: w.count, by: 2) { connect(w[1], w[k]) } }
            case Op.select:
                if isCarrier(w[0]) { connect(w[1], w[3]); connect(w[1], w[4]) }
            case Op.compositeConstruct:
                if isCarrier(w[0]) { for k in 2..<w.count { connect(w[1], w[k]) } }
            case Op.compositeExtract:
                if isCarrier(w[0]) { connect(w[1], w[2]) }
            case Op.compositeInsert:
                if isCarrier(w[0]) { connect(w[1], w[3]); connect(w[1], w[2]) }
            case Op.fNegate, Op.fAdd, Op.fSub, Op.fMul, Op.fDiv, Op.matrixTimesScalar:
                if isCarrier(w[0]) { for k in 2..<w.count { connect(w[1], w[k]) } }
            case Op.fConvert:
                if isCarrier(w[0]) { conversions.append((w[1], w[2])) }
            case Op.mulAddNV:
                fix(w[2], .a); fix(w[3], .b); fix(w[4], .accumulator); fix(w[1], .accumulator)
            case Op.loadNV, Op.storeNV, Op.lengthNV, Op.variable:
                if ins.op == Op.variable, w.count > 3, isCarrier(w[0]) { throw Unsupported(description: "an initialized cooperative-matrix variable") }
            default:
                // Whatever else makes a matrix is not understood. (Instructions that only consume
                // one are the stores, extracts and products above; calls and returns are ruled
                // out by the function types. Operands are not scanned: without the grammar a
                // literal can look like an id.)
                let layout = resultLayout(ins.op)
                if layout.type, isCarrier(w[0]) { throw Unsupported(description: "opcode \(ins.op) produces a cooperative matrix") }
            }
        }

        // Each group's use: fixed by products, else from a conversion's source, else by component width.
        var use: [UInt32: CooperativeMatrixUse] = [:]
        for (id, u) in fixed {
            let root = find(id)
            if let known = use[root], known != u {
                throw Unsupported(description: "one cooperative matrix used both as \(known) and as \(u) (%\(id))")
            }
            use[root] = u
        }
        var changed = true
        while changed {
            changed = false
            for c in conversions where use[find(c.result)] == nil {
                if let u = use[find(c.source)] { use[find(c.result)] = u; changed = true }
            }
        }
        func defaultUse(_ t: UInt32) -> CooperativeMatrixUse {
            (floatWidth[matrices[base(t)]!.component] ?? 32) >= 32 ? .accumulator : .a
        }
        func useOf(_ id: UInt32) -> CooperativeMatrixUse {
            let root = find(id)
            if let u = use[root] { return u }
            let u = defaultUse(typeOf[id]!)
            use[root] = u
            return u
        }

        // The (type, use) pairs needed, closed over elements and pointees.
        var needs: [UInt32: Set<CooperativeMatrixUse>] = [:]
        for (id, t) in typeOf where isCarrier(t) && !constants.contains(id) { needs[t, default: []].insert(useOf(id)) }
        var constantUses: [UInt32: Set<CooperativeMatrixUse>] = [:]
        for (k, sites) in constantSites {
            for s in sites {
                switch s {
                case .group(let v): constantUses[k, default: []].insert(useOf(v))
                case .fixed(let u): constantUses[k, default: []].insert(u)
                }
            }
        }
        for k in constants where constantUses[k] == nil { constantUses[k] = [defaultUse(typeOf[k]!)] }
        for (k, us) in constantUses { needs[typeOf[k]!, default: []].formUnion(us) }
        for t in carrierOrder.reversed() {
            if needs[t, default: []].isEmpty { needs[t] = [defaultUse(t)] }
            if let c = child[t] { needs[c, default: []].formUnion(needs[t]!) }
        }
        func sorted(_ s: Set<CooperativeMatrixUse>) -> [CooperativeMatrixUse] { s.sorted { $0.rawValue < $1.rawValue } }
        // The first use of each type keeps the type's id.
        var typeID: [UInt32: [CooperativeMatrixUse: UInt32]] = [:]
        for t in carrierOrder {
            for (i, u) in sorted(needs[t]!).enumerated() { typeID[t, default: [:]][u] = i == 0 ? t : fresh() }
        }
        var constantID: [UInt32: [CooperativeMatrixUse: UInt32]] = [:]
        for (k, us) in constantUses {
            for (i, u) in sorted(us).enumerated() { constantID[k, default: [:]][u] = i == 0 ? k : fresh() }
        }
        func retype(_ t: UInt32, _ u: CooperativeMatrixUse) -> UInt32 { typeID[t]![u]! }
        func operand(_ id: UInt32, _ u: CooperativeMatrixUse) -> UInt32 { constants.contains(id) ? constantID[id]![u]! : id }

        // Integer constants for the uses and the load/store layouts, declared before the first matrix type.
        guard let firstMatrix = carrierOrder.first, let intType = intConstants[matrices[firstMatrix]!.rows]?.type else {
            throw Unsupported(description: "matrix dimensions that are not integer constants")
        }
        let useConstant = CooperativeMatrixUse.allCases.map { _ in fresh() }   // 0, 1, 2: also RowMajor, ColumnMajor

        var out: [UInt32] = Array(words[0..<5])
        func emit(_ op: UInt32, _ operands: [UInt32]) { out.append(UInt32(operands.count + 1) << 16 | op); out += operands }
        var declaredUseConstants = false
        for ins in list {
            let w = ins.w
            switch ins.op {
            case Op.capability where w[0] == Op.capabilityNV:
                emit(Op.capability, [Op.capabilityKHR])
            case Op.extension:
                // The literal string: rewrite the NV extension's name.
                let bytes = w.flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
                let name = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
                emit(Op.extension, name == "SPV_NV_cooperative_matrix" ? stringWords("SPV_KHR_cooperative_matrix") : w)
            case Op.typeNV:
                if !declaredUseConstants {
                    for (i, c) in useConstant.enumerated() { emit(Op.constant, [intType, c, UInt32(i)]) }
                    declaredUseConstants = true
                }
                for u in sorted(needs[w[0]]!) { emit(Op.typeKHR, [retype(w[0], u), w[1], w[2], w[3], w[4], useConstant[Int(u.rawValue)]]) }
            case Op.typeArray where child[w[0]] != nil, Op.typeRuntimeArray where child[w[0]] != nil:
                for u in sorted(needs[w[0]]!) { emit(ins.op, [retype(w[0], u), retype(w[1], u)] + w.dropFirst(2)) }
            case Op.typePointer where child[w[0]] != nil:
                for u in sorted(needs[w[0]]!) { emit(Op.typePointer, [retype(w[0], u), w[1], retype(w[2], u)]) }
            case Op.constantComposite where constants.contains(w[1]), Op.constantNull where constants.contains(w[1]),
                 Op.undef where constants.contains(w[1]):
                for u in sorted(constantUses[w[1]]!) { emit(ins.op, [retype(w[0], u), constantID[w[1]]![u]!] + w.dropFirst(2)) }
            case Op.loadNV:
                guard let column = boolConstants[w[4]] else { throw Unsupported(description: "a load whose layout is not a constant") }
                let u = useOf(w[1])
                emit(Op.loadKHR, [retype(w[0], u), w[1], w[2], useConstant[column ? 1 : 0], w[3]] + w.dropFirst(5))
            case Op.storeNV:
                guard let column = boolConstants[w[3]] else { throw Unsupported(description: "a store whose layout is not a constant") }
                let u = constants.contains(w[1]) ? constantUses[w[1]]!.first! : useOf(w[1])
                emit(Op.storeKHR, [w[0], operand(w[1], u), useConstant[column ? 1 : 0], w[2]] + w.dropFirst(4))
            case Op.mulAddNV:
                emit(Op.mulAddKHR, [retype(w[0], .accumulator), w[1], operand(w[2], .a), operand(w[3], .b), operand(w[4], .accumulator)])
            case Op.lengthNV:
                emit(Op.lengthKHR, [w[0], w[1], retype(w[2], sorted(needs[w[2]]!)[0])])
            case Op.fConvert where isCarrier(w[0]):
                let u = useOf(w[1]), from = useOf(w[2])
                if u == from {
                    emit(Op.fConvert, [retype(w[0], u), w[1], w[2]])
                } else {
                    // Element by element, at the same index: the caller has checked the layouts agree.
                    let m = matrices[base(w[0])]!, source = matrices[base(typeOf[w[2]]!)]!
                    guard let rows = intConstants[m.rows]?.value, let columns = intConstants[m.columns]?.value,
                          subgroupSize > 0, Int(rows * columns) % subgroupSize == 0 else {
                        throw Unsupported(description: "a conversion between uses of a matrix whose size is not a constant multiple of the subgroup")
                    }
                    let count = Int(rows * columns) / subgroupSize
                    let type = retype(w[0], u)
                    var current = fresh()
                    emit(Op.undef, [type, current])
                    for e in 0..<count {
                        let x = fresh(), y = fresh(), next = e == count - 1 ? w[1] : fresh()
                        emit(Op.compositeExtract, [source.component, x, w[2], UInt32(e)])
                        emit(Op.fConvert, [m.component, y, x])
                        emit(Op.compositeInsert, [type, next, y, current, UInt32(e)])
                        current = next
                    }
                }
            case Op.store where constants.contains(w[1]):
                emit(Op.store, [w[0], operand(w[1], useOf(w[0]))] + w.dropFirst(2))
            default:
                var operands = w
                let layout = resultLayout(ins.op)
                // A matrix value (or a variable holding matrices, global ones included) takes its use's type.
                if layout.type, w.count >= 2, isCarrier(w[0]), !constants.contains(w[1]) {
                    let u = useOf(w[1])
                    operands[0] = retype(w[0], u)
                    for k in 2..<operands.count where constants.contains(operands[k]) { operands[k] = operand(operands[k], u) }
                }
                emit(ins.op, operands)
            }
        }
        out[3] = bound
        try verify(out)
        return out
    }

    /// Writes a rewritten module to `dir/<name>-<hash>.khr.spv` and returns its path
    /// (`VKFLEX_DUMP_SHADERS=dir`: the GLSL there is the NV source, this is what the driver gets;
    /// Debian 12's `spirv-dis` predates the KHR opcodes, SPIRV-Tools 2023.6 and later read them).
    @discardableResult
    public static func dump(_ words: [UInt32], name: String, to dir: String) -> String? {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for w in words { h = (h ^ UInt64(w)) &* 0x0000_0100_0000_01b3 }
        let safe = String(name.map { $0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" ? $0 : "_" })
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let path = (dir as NSString).appendingPathComponent("\(safe)-\(String(format: "%08llx", h >> 32)).khr.spv")
        let data = words.withUnsafeBytes { Data($0) }
        return FileManager.default.createFile(atPath: path, contents: data) ? path : nil
    }

    /// Checks what the rewrite promises, since the SPIRV-Tools of Debian 12 (2023.1) cannot
    /// validate `SPV_KHR_cooperative_matrix`: no NV matrix instruction is left; each KHR matrix
    /// type is declared once; every product takes an A, a B and an accumulator of matching
    /// dimensions; loads and stores name a constant layout; conversions, loads, stores and
    /// inserts keep one use on both sides. Throws ``Unsupported`` naming the first problem.
    ///
    /// - Throws: ``FlexError/unsupported(_:)`` naming what the module holds that the rewrite cannot take (or, from `verify`, what is wrong).
    public static func verify(_ words: [UInt32]) throws {
        let list = try parse(words)
        struct KHRType: Hashable { var component: UInt32, scope: UInt32, rows: UInt32, columns: UInt32, use: UInt32 }
        var types: [UInt32: KHRType] = [:], pointee: [UInt32: UInt32] = [:], typeOf: [UInt32: UInt32] = [:]
        var constants: [UInt32: UInt32] = [:], defined = Set<UInt32>()
        func fail(_ why: String) -> FlexError { Unsupported(description: "rewritten module: \(why)") }
        for ins in list {
            let layout = resultLayout(ins.op)
            if layout.result {
                let id = layout.type ? ins.w[1] : ins.w[0]
                guard defined.insert(id).inserted, id < words[3] else { throw fail("id %\(id) defined twice or past the bound") }
                if layout.type { typeOf[id] = ins.w[0] }
            }
            switch ins.op {
            case Op.typeNV, Op.loadNV, Op.storeNV, Op.mulAddNV, Op.lengthNV:
                throw fail("NV instruction \(ins.op) left")
            case Op.capability where ins.w[0] == Op.capabilityNV:
                throw fail("the NV capability left")
            case Op.constant where ins.w.count == 3:
                constants[ins.w[1]] = ins.w[2]
            case Op.typeKHR:
                let t = KHRType(component: ins.w[1], scope: ins.w[2], rows: ins.w[3], columns: ins.w[4], use: constants[ins.w[5]] ?? 99)
                guard t.use <= 2 else { throw fail("matrix type %\(ins.w[0]) has no constant use") }
                guard !types.values.contains(t) else { throw fail("matrix type %\(ins.w[0]) declared twice") }
                types[ins.w[0]] = t
            case Op.typePointer:
                pointee[ins.w[0]] = ins.w[2]
            default: break
            }
        }
        func matrix(_ id: UInt32) -> KHRType? { typeOf[id].flatMap { types[$0] } }
        func dims(_ t: KHRType) -> (UInt32, UInt32) { (constants[t.rows] ?? 0, constants[t.columns] ?? 0) }
        for ins in list {
            let w = ins.w
            switch ins.op {
            case Op.mulAddKHR:
                guard let r = types[w[0]], let a = matrix(w[2]), let b = matrix(w[3]), let c = matrix(w[4]) else {
                    throw fail("product %\(w[1]) on operands that are not matrices")
                }
                guard a.use == 0, b.use == 1, c.use == 2, r.use == 2, r == c else {
                    throw fail("product %\(w[1]) takes uses \(a.use), \(b.use), \(c.use) -> \(r.use)")
                }
                let (m, k) = dims(a), (k2, n) = dims(b), (m2, n2) = dims(c)
                guard m == m2, k == k2, n == n2, m > 0, n > 0, k > 0 else { throw fail("product %\(w[1]) of \(m)x\(k) by \(k2)x\(n) into \(m2)x\(n2)") }
            case Op.loadKHR, Op.storeKHR:
                let layoutID = ins.op == Op.loadKHR ? w[3] : w[2]
                guard let v = constants[layoutID], v <= 1 else { throw fail("a load or store without a constant row- or column-major layout") }
            case Op.fConvert:
                if let r = types[w[0]] {
                    guard let s = matrix(w[2]), s.use == r.use else { throw fail("conversion %\(w[1]) between uses") }
                }
            case Op.load:
                if types[w[0]] != nil, let p = typeOf[w[2]], pointee[p] != w[0] { throw fail("load %\(w[1]) through a pointer to another type") }
            case Op.store:
                if let v = typeOf[w[1]], types[v] != nil, let p = typeOf[w[0]], pointee[p] != v { throw fail("store of %\(w[1]) through a pointer to another type") }
            case Op.compositeInsert:
                if types[w[0]] != nil, typeOf[w[3]] != w[0] { throw fail("insert %\(w[1]) into a matrix of another type") }
            default: break
            }
        }
    }
}
