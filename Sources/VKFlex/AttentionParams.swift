import Foundation
import VKFlexVulkan

/// The attention kernels' bindings, declared once: these numbers are the host's descriptor
/// slots and, through the generated `flex_params.glsl`, the shaders' `VKF_BINDING_*` macros.
enum AttentionBinding: Int, CaseIterable {
    case q = 0, k, v, output, lse, kvNum, kvIndices, fullKVNum, fullKVIndices
    /// The parameter block where the device cannot take it as push constants.
    case params
    /// The mods' error flag (`vkf_err[4]`).
    case errors
    /// Each row's maximum score (`returnMaxScores`), addressed like the LSE.
    case maxScores
    /// Per-batch key lengths (`kvLengths:`, int32 [B]).
    case kvLengths
    /// Per-head sink logits (`sinks:`, float32 [Hq]).
    case sinks
    /// Per-batch query offsets (`qOffset:`, int32 [B]).
    case qOffsets
    /// The page table of paged K/V (`pageTable:`, int32 [B, maxPages]).
    case pageTable

    /// Captured tensors take the bindings from here on, in the order of the mods' captures.
    static let firstCapture = AttentionBinding.allCases.count

    var macro: String {
        let name: String
        switch self {
        case .q: name = "Q"
        case .k: name = "K"
        case .v: name = "V"
        case .output: name = "O"
        case .lse: name = "LSE"
        case .kvNum: name = "KV_NUM"
        case .kvIndices: name = "KV_IDX"
        case .fullKVNum: name = "FULL_KV_NUM"
        case .fullKVIndices: name = "FULL_KV_IDX"
        case .params: name = "PARAMS"
        case .errors: name = "ERRORS"
        case .maxScores: name = "MAX"
        case .kvLengths: name = "KV_LENS"
        case .sinks: name = "SINKS"
        case .qOffsets: name = "Q_OFFSETS"
        case .pageTable: name = "PAGE_TABLE"
        }
        return "VKF_BINDING_" + name
    }
}

/// A parameter field of a kernel: its name (also its GLSL name) and whether it is a float.
protocol KernelParamField: CaseIterable, Hashable, Sendable, RawRepresentable where RawValue == String, AllCases == [Self] {
    var isFloat: Bool { get }
    /// Each field's slot and each tensor prefix's layout fields, made once per field type
    /// (`static let slots = ParamSlots<Self>()`): a block is filled on every call.
    static var slots: ParamSlots<Self> { get }
}

/// A field type's slot of each field (its place in declaration order) and, per tensor prefix
/// (`q`, `k`, ...), the fields `<prefix>_base`, `_sb`, `_sh`, `_sl`, `_sd` that it has.
struct ParamSlots<Field: KernelParamField>: Sendable {
    let index: [Field: Int]
    let layouts: [String: [Field]]
    init() {
        index = Dictionary(uniqueKeysWithValues: Field.allCases.enumerated().map { ($1, $0) })
        var layouts: [String: [Field]] = [:]
        for field in Field.allCases where field.rawValue.hasSuffix("_base") {
            let prefix = String(field.rawValue.dropLast(5))
            layouts[prefix] = ["_base", "_sb", "_sh", "_sl", "_sd"].compactMap { Field(rawValue: prefix + $0) }
        }
        self.layouts = layouts
    }
}

/// A kernel's parameter block, declared once: the order of the `Field` enum is both the GLSL
/// declaration (generated `..._MEMBERS` macros) and the layout of the bytes the host passes, as
/// push constants where the device takes them (else a buffer).
///
/// ```swift
/// // snippet: skip (an internal type)
/// var p = AttentionParams()
/// p.set([.B: 2, .Hq: 8])              // ... every int field
/// p.set(.scale, float: 0.125)
/// let bytes = p.bytes()               // traps if a field was not set
/// ```
struct ParamBlock<Field: KernelParamField> {
    /// Bytes of the block.
    static var byteCount: Int { Field.allCases.count * 4 }

    private let index: [Field: Int] = Field.slots.index
    private var slots = [UInt32](repeating: 0, count: Field.allCases.count)
    private var set = [Bool](repeating: false, count: Field.allCases.count)

    init() {}

    /// Sets int fields.
    mutating func set(_ values: KeyValuePairs<Field, Int>) {
        for (field, value) in values { set(field, int: value) }
    }

    /// Sets an int field.
    mutating func set(_ field: Field, int value: Int) {
        precondition(!field.isFloat && Int32(exactly: value) != nil, "\(field.rawValue) = \(value) is not an int32 field value")
        slots[index[field]!] = UInt32(bitPattern: Int32(value))
        set[index[field]!] = true
    }

    /// Sets where a tensor's elements lie: `<prefix>_base` and the strides `<prefix>_sb`, `_sh`,
    /// `_sl`, `_sd` (as many as `strides` has), in elements.
    mutating func setLayout(_ prefix: String, base: Int, strides: [Int]) {
        precondition(strides.count <= 4, "\(prefix): at most 4 strides")
        guard let fields = Field.slots.layouts[prefix], fields.count >= strides.count + 1 else {
            preconditionFailure("no kernel parameters \(prefix)_base and \(strides.count) strides")
        }
        set(fields[0], int: base)
        for (field, value) in zip(fields.dropFirst(), strides) { set(field, int: value) }
    }

    /// Sets a float field.
    mutating func set(_ field: Field, float value: Float) {
        precondition(field.isFloat, "\(field.rawValue) is an int field")
        slots[index[field]!] = value.bitPattern
        set[index[field]!] = true
    }

    /// An int field's value.
    func int(_ field: Field) -> Int { Int(Int32(bitPattern: slots[index[field]!])) }

    /// The block as bytes, in declaration order; every field must have been set.
    func bytes() -> [UInt8] {
        if let missing = Field.allCases.first(where: { !set[index[$0]!] }) {
            preconditionFailure("the kernel parameter \(missing.rawValue) was not set")
        }
        return slots.withUnsafeBytes { Array($0) }
    }

    /// `#define NAME int a; float b; ...`: the members, for a GLSL block.
    static func membersMacro(_ name: String) -> String {
        "#define \(name) " + Field.allCases.map { "\($0.isFloat ? "float" : "int") \($0.rawValue);" }.joined(separator: " ")
    }
}

/// The forward kernels' parameter block (``AttentionField``).
typealias AttentionParams = ParamBlock<AttentionField>

/// Sizes, element offsets (into this dispatch's bindings) and strides (elements) of every tensor,
/// the BlockMask's geometry, the scale, and what this dispatch covers.
enum AttentionField: String, KernelParamField {
    static let slots = ParamSlots<AttentionField>()
    case B, Hq, Hkv, Lq, Lkv
    /// First batch of this dispatch (workgroup z counts from it).
    case b_start
    case q_base, q_sb, q_sh, q_sl, q_sd
    case k_base, k_sb, k_sh, k_sl, k_sd
    case v_base, v_sb, v_sh, v_sl, v_sd
    case o_base, o_sb, o_sh, o_sl, o_sd
    /// The LSE's (and the maximum scores', which share its addressing).
    case lse_base, lse_sb, lse_sh, lse_sl
    case mask_b, mask_h, q_bs, kv_bs, q_blocks, kv_blocks
    /// 1: no BlockMask, every key block is walked as full.
    case dense
    case tiles_per_block, write_lse
    case scale
    /// 1: Q, K, V, O rows are contiguous and every row offset is a multiple of 8 elements.
    case vec_ok
    /// First query head of this dispatch (workgroup y counts from it).
    case h_start
    /// First key/value head bound by this dispatch.
    case hk_start
    /// The KV blocks this dispatch walks (all: 0, kv_blocks): the host splits long key ranges
    /// where a driver caps a shader's loop iterations.
    case kv_block_lo, kv_block_hi
    /// Write each row's maximum score (with `VKF_MAX_SCORES`).
    case write_max
    /// Key splits in this dispatch (with `VKF_KV_SPLIT`: workgroup z = batch × splits + split),
    /// the KV blocks each walks, and how far apart the splits' partial O and LSE rows are.
    case splits, kv_split_blocks, o_split_stride, lse_split_stride
    /// Paged K/V (with `VKF_PAGED`): keys per page and the page table's row length.
    case page_size, max_pages
    /// Split-KV decoding: query heads per workgroup, head chunks per KV head, query-block segments.
    case dec_cph, dec_chunks, dec_segs

    var isFloat: Bool { self == .scale }
}

extension ParamBlock where Field == AttentionField {
    /// The generated include both attention kernels read (`#include "flex_params.glsl"`).
    static var includeName: String { "flex_params.glsl" }
    static var glsl: String {
        var lines = ["// Generated from AttentionBinding and AttentionField (Sources/VKFlex/AttentionParams.swift)."]
        for b in AttentionBinding.allCases { lines.append("#define \(b.macro) \(b.rawValue)") }
        lines.append("#define VKF_BINDING_FIRST_CAPTURE \(AttentionBinding.firstCapture)")
        lines.append(membersMacro("VKF_PARAMS_MEMBERS"))
        return lines.joined(separator: "\n") + "\n"
    }
}
