import Foundation

/// Which (row, column) of a 16×16 cooperative-matrix fragment each invocation of a subgroup
/// holds, as measured on a device by loading a matrix of known values (through the extension the
/// device uses: on a `VK_KHR_cooperative_matrix` device the fp32 fragments are accumulators and
/// the fp16 ones A operands, the uses the attention kernel relies on).
///
/// The extension leaves this layout to the implementation. vkflex's cooperative-matrix kernel
/// keeps scores and probabilities in registers, so it needs each element's row and column; the
/// kernel checks the layout it was built for when it starts, and `vkflex selftest` shows it.
///
/// ```swift
/// if let layout = try CooperativeMatrixLayout.measure(on: device) {
///     print(layout.summary)            // lane 0: (0,0) (0,1) (8,0) (8,1) ...
///     print(layout.matches(CooperativeMatrixLayout.nvidiaMMA)) // true on NVIDIA GPUs
/// }
/// ```
public struct CooperativeMatrixLayout: Sendable, Hashable {
    /// `float32[lane][element]` = (row, column) of an fp32 (accumulator) fragment.
    public var float32: [[Coordinate]]
    /// The same for an fp16 fragment.
    public var float16: [[Coordinate]]
    /// The same for a 16×8 fp32 fragment (the accumulator of 16×8×16 products); nil where the
    /// device has no such shape.
    public var float32Narrow: [[Coordinate]]?
    /// The same for a bfloat16 fragment (an A operand); nil where the device has no bfloat16
    /// cooperative matrices enabled.
    public var bfloat16: [[Coordinate]]?
    /// The same for an fp16 fragment used as a B operand (row: its K index, column: its N index);
    /// nil where not measured. Under `VK_KHR_cooperative_matrix` a B operand has a layout of its
    /// own; under the NV extension it is the fp16 fragment's.
    public var float16B: [[Coordinate]]?
    /// The same for a bfloat16 B operand; nil where not measured.
    public var bfloat16B: [[Coordinate]]?

    public struct Coordinate: Sendable, Hashable, CustomStringConvertible {
        public var row: Int
        public var column: Int
        public init(row: Int, column: Int) { self.row = row; self.column = column }
        public var description: String { "(\(row),\(column))" }
    }

    public init(float32: [[Coordinate]], float16: [[Coordinate]], float32Narrow: [[Coordinate]]? = nil, bfloat16: [[Coordinate]]? = nil,
                float16B: [[Coordinate]]? = nil, bfloat16B: [[Coordinate]]? = nil) {
        self.float32 = float32
        self.float16 = float16
        self.float32Narrow = float32Narrow
        self.bfloat16 = bfloat16
        self.float16B = float16B
        self.bfloat16B = bfloat16B
    }

    /// The layout the cooperative-matrix kernel is written for, measured on an NVIDIA H200
    /// (driver 580): lane `l` holds rows `l/4` and `l/4 + 8`, columns `2·(l%4)`, `2·(l%4) + 1`,
    /// `2·(l%4) + 8` and `2·(l%4) + 9`; element `e` is in row `l/4 + 8·(e/4)`, column
    /// `2·(l%4) + e%2 + 8·((e/2)%2)`. The same for fp16 and fp32 fragments.
    public static let nvidiaMMA: [[Coordinate]] = (0..<32).map { lane in
        (0..<8).map { e in
            Coordinate(row: lane / 4 + 8 * (e / 4), column: 2 * (lane % 4) + e % 2 + 8 * ((e / 2) % 2))
        }
    }

    /// The B-operand layout the NVIDIA-layout split-KV kernel's word-by-word loads assume
    /// (`VKFLEX_DECODE_TILE=nvr`; the operand registers of NVIDIA's `mma` instructions, expected
    /// under `VK_KHR_cooperative_matrix`, to be confirmed by measuring): element `e` of lane `l` in
    /// row (K index) `2·(l%4) + e%2 + 8·((e/2)%2)`, column (N index) `l/4 + 8·(e/4)` — ``nvidiaMMA``
    /// transposed, so that elements `2i` and `2i + 1` are adjacent in a row of Kᵀ.
    public static let nvidiaMMAB: [[Coordinate]] = (0..<32).map { lane in
        (0..<8).map { e in
            Coordinate(row: 2 * (lane % 4) + e % 2 + 8 * ((e / 2) % 2), column: lane / 4 + 8 * (e / 4))
        }
    }

    /// The 16×8 layout the kernel's narrow products assume (measured on the H200): the left half
    /// of ``nvidiaMMA``'s — element `e` in row `l/4 + 8·(e/2)`, column `2·(l%4) + e%2`.
    public static let nvidiaMMANarrow: [[Coordinate]] = (0..<32).map { lane in
        (0..<4).map { e in Coordinate(row: lane / 4 + 8 * (e / 2), column: 2 * (lane % 4) + e % 2) }
    }

    /// Whether the 16×8 fp32 fragments were measured and follow ``nvidiaMMANarrow``.
    public var narrowMatchesNVIDIA: Bool { float32Narrow == CooperativeMatrixLayout.nvidiaMMANarrow }

    /// Whether every fragment measured covers each of its elements exactly once (16×16, and 16×8
    /// for the narrow one): a measurement that fails this is broken, whatever the order.
    public var isConsistent: Bool {
        func covers(_ m: [[Coordinate]], columns: Int) -> Bool {
            let all = m.flatMap { $0 }
            return all.count == 16 * columns && Set(all).count == all.count
                && all.allSatisfy { (0..<16).contains($0.row) && (0..<columns).contains($0.column) }
        }
        return covers(float32, columns: 16) && covers(float16, columns: 16) && (float32Narrow.map { covers($0, columns: 8) } ?? true)
            && (bfloat16.map { covers($0, columns: 16) } ?? true) && (float16B.map { covers($0, columns: 16) } ?? true)
            && (bfloat16B.map { covers($0, columns: 16) } ?? true)
    }

    /// Whether both the fp32 and fp16 fragments follow `expected`.
    public func matches(_ expected: [[Coordinate]]) -> Bool {
        float32 == expected && float16 == expected
    }

    /// The first lanes' coordinates, for a report.
    public var summary: String {
        func lanes(_ m: [[Coordinate]]) -> String {
            (0..<min(5, m.count)).map { "lane \($0): " + m[$0].map(\.description).joined(separator: " ") }.joined(separator: "; ")
        }
        var text = "fp32 \(float32.first?.count ?? 0)/lane [\(lanes(float32))]; fp16 \(float16.first?.count ?? 0)/lane [\(lanes(float16))]"
        if let n = float32Narrow { text += "; fp32 16x8 \(n.first?.count ?? 0)/lane [\(lanes(n))]" }
        if let h = bfloat16 { text += "; bf16 \(h.first?.count ?? 0)/lane [\(lanes(h))]" }
        if let b = float16B { text += "; fp16 B \(b.first?.count ?? 0)/lane [\(lanes(b))]" }
        if let b = bfloat16B { text += "; bf16 B \(b.first?.count ?? 0)/lane [\(lanes(b))]" }
        return text
    }

    /// The layout of `device`, measured on first use and remembered; nil when it has no
    /// cooperative-matrix extension (or the measurement failed).
    public static func of(_ device: Device) -> CooperativeMatrixLayout? {
        if let known = device.lock.withLock({ device.measuredLayout }) { return known }
        let layout = try? measure(on: device)
        device.lock.withLock { device.measuredLayout = .some(layout) }
        return layout
    }

    /// Measures the layout on `device`; nil when it has no cooperative-matrix extension or a
    /// subgroup size other than 32.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public static func measure(on device: Device) throws -> CooperativeMatrixLayout? {
        guard device.cooperativeMatrixAPI != nil, device.capabilities.subgroupSize == 32 else { return nil }
        let narrow = device.cooperativeMatrixShapes.contains {
            $0.m == 16 && $0.n == 8 && $0.k == 16 && $0.a == "float16" && $0.result == "float32"
        }
        let pipeline = try device.pipeline(for: "vkflex.coopmat_layout.\(narrow)") {
            PipelineDescription(source: ShaderSource(name: "coopmat_layout", text: try ShaderLibrary.standard.text("coopmat_layout.comp"),
                                                     defines: [.init("NARROW", narrow ? "1" : "0")]),
                                bindingCount: 1, specialization: [32], cooperativeMatrixKHR: device.cooperativeMatrixAPI == .khr)
        }
        // The same probe with bfloat16 operands (its 16-bit matrix retyped), where they are enabled;
        // if that pipeline cannot be built, only bfloat16 goes without (its layout stays unknown).
        let bf16 = device.enabledFeatures.bfloat16CooperativeMatrix ? try? device.pipeline(for: "vkflex.coopmat_layout.bf16") {
            PipelineDescription(source: ShaderSource(name: "coopmat_layout", text: try ShaderLibrary.standard.text("coopmat_layout.comp"),
                                                     defines: [.init("NARROW", "0")]),
                                bindingCount: 1, specialization: [32], cooperativeMatrixKHR: true, bfloat16Operands: true)
        } : nil
        let kinds = 5, words = 32 * kinds * 16   // per probe: fp32, fp16, fp32 16x8, fp16 B, the product
        let out = try device.makeBuffer(bytes: 2 * words * 4)
        try device.record { rec in
            try rec.dispatch(pipeline, bindings: [BufferBinding(out, writes: true)], groups: (1, 1, 1))
            if let bf16 { try rec.dispatch(bf16, bindings: [BufferBinding(out, offset: words * 4, writes: true)], groups: (1, 1, 1)) }
        }
        let raw = try out.download(count: 2 * words, as: Int32.self)
        func decode(_ kind: Int, base: Int = 0) -> [[Coordinate]] {
            (0..<32).map { lane in
                (0..<16).compactMap { e -> Coordinate? in
                    let v = Int(raw[base + (lane * kinds + kind) * 16 + e])
                    return v < 0 ? nil : Coordinate(row: v / 16, column: v % 16)
                }
            }
        }
        return CooperativeMatrixLayout(float32: decode(0), float16: decode(1), float32Narrow: narrow ? decode(2) : nil,
                                       bfloat16: bf16 != nil ? decode(1, base: words) : nil,
                                       float16B: decode(3), bfloat16B: bf16 != nil ? decode(3, base: words) : nil)
    }
}
