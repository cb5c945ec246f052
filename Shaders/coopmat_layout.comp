#version 450
// Device check: which (row, column) of an NV cooperative matrix each invocation's element holds.
// One subgroup loads a 16x16 matrix whose element (r, c) is r * 16 + c, as fp32 and as fp16 (or,
// retyped, bfloat16), and
// (with NARROW, where the device has the 16x8x16 shape) its left 16x8 half as fp32, and writes
// every invocation's elements out: out[(lane * 5 + kind) * 16 + e], -1 past length(). Kind 3 is
// the fp16 matrix used as a B operand (its product, kind 4, only fixes that use: under
// VK_KHR_cooperative_matrix a B operand has a layout of its own; under the NV extension it is the
// same type as kind 1).
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_shader_subgroup_basic : require

layout(local_size_x_id = 0) in;
layout(std430, set = 0, binding = 0) writeonly buffer Out { int result[]; };

shared float m32[256];
shared float16_t m16[256];

void main() {
    const uint lane = gl_LocalInvocationIndex;
    // Through float32 only (float16_t(float), float(float16_t)): the 16-bit matrix may be retyped
    // to bfloat16 (BFloat16Retyper), which allows conversions between floats and nothing else;
    // 0..255 are exact in both.
    for (uint e = lane; e < 256; e += gl_WorkGroupSize.x) { m32[e] = float(e); m16[e] = float16_t(float(e)); }
    barrier();
    fcoopmatNV<32, gl_ScopeSubgroup, 16, 16> a;
    fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> b;
    fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> bb;
    coopMatLoadNV(a, m32, 0, 16, false);
    coopMatLoadNV(b, m16, 0, 16, false);
    coopMatLoadNV(bb, m16, 0, 16, false);
    fcoopmatNV<32, gl_ScopeSubgroup, 16, 16> prod = coopMatMulAddNV(b, bb, a);
    for (int e = 0; e < 16; ++e) {
        result[(lane * 5) * 16 + e] = e < a.length() ? int(a[e]) : -1;
        result[(lane * 5 + 1) * 16 + e] = e < b.length() ? int(float(b[e])) : -1;
        result[(lane * 5 + 2) * 16 + e] = -1;
        result[(lane * 5 + 3) * 16 + e] = e < bb.length() ? int(float(bb[e])) : -1;
        result[(lane * 5 + 4) * 16 + e] = e < prod.length() ? int(prod[e]) : -1;
    }
#if NARROW
    fcoopmatNV<32, gl_ScopeSubgroup, 16, 8> n;
    coopMatLoadNV(n, m32, 0, 16, false);
    for (int e = 0; e < n.length(); ++e) result[(lane * 5 + 2) * 16 + e] = int(n[e]);
#endif
}
