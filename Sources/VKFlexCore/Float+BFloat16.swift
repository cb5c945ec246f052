// bfloat16 bits, shared by the tensors (VKFlex) and the SPIR-V pass that re-encodes constants
// (VKFlexSPIRV's BFloat16Retyper).

extension Float {
    /// The bfloat16 nearest this value, as its 16 bits: round to nearest even, as PyTorch's
    /// `Tensor.to(torch.bfloat16)` does; a NaN stays NaN (quiet, sign kept), and values past the
    /// largest bfloat16 round to ±inf.
    ///
    /// ```swift
    /// Float(1.00390625).bfloat16Bits           // 0x3F80: a tie, to the even 1.0
    /// Float(bfloat16Bits: 0x4049)              // 3.140625
    /// ```
    public var bfloat16Bits: UInt16 {
        let u = bitPattern
        if isNaN { return UInt16(truncatingIfNeeded: (u >> 16) | 0x40) }
        return UInt16(truncatingIfNeeded: (u &+ 0x7FFF &+ ((u >> 16) & 1)) >> 16)
    }

    /// The float a bfloat16's 16 bits hold (exact: a bfloat16 is the high half of a float).
    public init(bfloat16Bits bits: UInt16) { self.init(bitPattern: UInt32(bits) << 16) }

    /// This value rounded to bfloat16 and back.
    public var roundedToBFloat16: Float { Float(bfloat16Bits: bfloat16Bits) }
}
