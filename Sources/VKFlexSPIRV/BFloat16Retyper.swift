import Foundation

/// Turns a module's 16-bit floats into bfloat16 (`SPV_KHR_bfloat16`), for kernels whose fp16
/// values only travel: staged, loaded into cooperative matrices, multiplied, converted.
///
/// Debian 12's glslang (12.0) has no `GL_EXT_bfloat16`, so the cooperative-matrix kernels cannot
/// be written with bfloat16 operands. The generic kernels (`flex_attention_fwd_generic.comp`,
/// `flex_attention_bwd_mm.comp`) keep their 16-bit operands as raw bits from memory to matrix and
/// do no arithmetic on them: built with `IN_BF16`, every 16-bit float in their SPIR-V is the high
/// half of a float32 — a bfloat16 in all but its declared type. This pass declares it:
///
/// - `OpTypeFloat 16` gets the `BFloat16KHR` encoding, so every vector, array, pointer and
///   cooperative-matrix type built on it holds bfloat16;
/// - 16-bit float constants are re-encoded (the nearest bfloat16, ties to even);
/// - the module declares `BFloat16TypeKHR`, `BFloat16CooperativeMatrixKHR` and the extension, and
///   drops `Float16`, which nothing needs any more.
///
/// bfloat16 has no arithmetic in SPIR-V: a value may be loaded, stored, moved, converted
/// (`OpFConvert`) and used in cooperative-matrix instructions only. Any other instruction that
/// produces or reads one throws, naming it, and the caller plans a kernel that computes in float32.
/// Run it after ``CooperativeMatrixKHRRewriter/rewrite(_:subgroupSize:)`` (NV matrices have no
/// bfloat16).
///
/// ```swift
/// let khr = try CooperativeMatrixKHRRewriter.rewrite(nvWords, subgroupSize: 32)
/// let bf16 = try BFloat16Retyper.retype(khr)
/// ```
public enum BFloat16Retyper {
    typealias Op = CooperativeMatrixKHRRewriter.Op
    static let typeFloat: UInt32 = 22, typeVector: UInt32 = 23, typeMatrix: UInt32 = 24
    static let specConstant: UInt32 = 50, extInst: UInt32 = 12, extInstImport: UInt32 = 11
    static let capabilityFloat16: UInt32 = 9
    static let capabilityBFloat16Type: UInt32 = 5116, capabilityBFloat16CooperativeMatrix: UInt32 = 5118
    /// `BFloat16KHR`, the FP encoding operand of `OpTypeFloat`.
    static let encodingBFloat16: UInt32 = 0

    /// What a bfloat16 value may go through (SPV_KHR_bfloat16 with SPV_KHR_cooperative_matrix).
    static let allowed: Set<UInt32> = [
        Op.undef, Op.constant, Op.constantComposite, Op.constantNull, specConstant, Op.variable, Op.load, Op.store,
        Op.accessChain, Op.inBoundsAccessChain, Op.compositeConstruct, Op.compositeExtract, Op.compositeInsert,
        Op.copyObject, Op.fConvert, Op.phi, Op.select, Op.loadKHR, Op.storeKHR, Op.mulAddKHR, Op.lengthKHR,
    ]

    /// The module with its 16-bit floats as bfloat16.
    ///
    /// - Throws: ``FlexError/unsupported(_:)`` when the module has no 16-bit float, still has NV
    ///   cooperative matrices, or computes with a 16-bit float (the opcode and result named).
    public static func retype(_ words: [UInt32]) throws -> [UInt32] {
        let list = try CooperativeMatrixKHRRewriter.parse(words)
        func fail(_ why: String) -> FlexError { .unsupported("bfloat16 operands: \(why)") }

        // Types built on the 16-bit float, in declaration order (a type follows what it is built on).
        var tainted = Set<UInt32>()
        var half: UInt32?
        var typeOf: [UInt32: UInt32] = [:]
        for ins in list {
            let w = ins.w
            switch ins.op {
            case typeFloat where w.count == 2 && w[1] == 16:
                half = w[0]; tainted.insert(w[0])
            case typeFloat where w.count == 3 && w[1] == 16:
                throw fail("the module already declares a 16-bit float with an encoding")
            case Op.typeNV:
                throw fail("NV cooperative matrices have no bfloat16 (rewrite to KHR first)")
            case typeVector, typeMatrix, Op.typeArray, Op.typeRuntimeArray, Op.typeKHR:
                if tainted.contains(w[1]) { tainted.insert(w[0]) }
            case Op.typePointer:
                if tainted.contains(w[2]) { tainted.insert(w[0]) }
            case Op.typeStruct:
                if w.dropFirst().contains(where: tainted.contains) { tainted.insert(w[0]) }
            default: break
            }
            let layout = CooperativeMatrixKHRRewriter.resultLayout(ins.op)
            if layout.type, w.count >= 2 { typeOf[w[1]] = w[0] }
        }
        guard let half else { throw fail("the module has no 16-bit float to retype") }
        func holds(_ id: UInt32) -> Bool { typeOf[id].map(tainted.contains) ?? false }

        // Nothing may compute with a bfloat16: check results and, for the instructions that are not
        // moves, their operands (OpExtInst's set and instruction number are literals, not ids).
        for ins in list where !allowed.contains(ins.op) {
            let layout = CooperativeMatrixKHRRewriter.resultLayout(ins.op)
            guard layout.type, ins.w.count >= 2 else { continue }
            if tainted.contains(ins.w[0]) { throw fail("opcode \(ins.op) (%\(ins.w[1])) computes a 16-bit float") }
            let operands = ins.op == extInst ? ins.w.dropFirst(4) : ins.w.dropFirst(2)
            if let id = operands.first(where: holds) { throw fail("opcode \(ins.op) (%\(ins.w[1])) reads the 16-bit float %\(id)") }
        }

        var out = Array(words[0..<5])
        func emit(_ op: UInt32, _ operands: [UInt32]) {
            out.append(UInt32(operands.count + 1) << 16 | op)
            out += operands
        }
        var declared = false
        for (index, ins) in list.enumerated() {
            let w = ins.w
            switch ins.op {
            case Op.capability where w[0] == capabilityFloat16:
                continue
            case typeFloat where w[0] == half:
                emit(typeFloat, [w[0], 16, encodingBFloat16])
                continue
            case Op.constant where w[0] == half, specConstant where w[0] == half:
                emit(ins.op, [w[0], w[1], UInt32(Float(Float16(bitPattern: UInt16(truncatingIfNeeded: w[2]))).bfloat16Bits)])
                continue
            default:
                emit(ins.op, w)
            }
            // The new capabilities and extension go at the end of their sections.
            if !declared, ins.op == Op.capability, index + 1 < list.count, list[index + 1].op != Op.capability {
                emit(Op.capability, [capabilityBFloat16Type])
                emit(Op.capability, [capabilityBFloat16CooperativeMatrix])
                emit(Op.extension, CooperativeMatrixKHRRewriter.stringWords("SPV_KHR_bfloat16"))
                declared = true
            }
        }
        guard declared else { throw fail("the module declares no capability") }
        return out
    }
}
