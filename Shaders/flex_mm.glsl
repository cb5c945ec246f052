// What the cooperative-matrix kernels that assume no element order share
// (flex_attention_fwd_generic.comp, flex_attention_bwd_mm.comp): the fragment types, 16-byte units
// of 8 halves in shared memory and their loads, and a subgroup's memory sync. Include after the
// parameter block `p` (it reads p.vec_ok); define MM, MN, MK and VKF_MM_EMULATE (0/1: the
// products as scalar loops, no cooperative matrices) before.
//
// bfloat16 (IN_BF16): the 16-bit operands are bfloat16 bits, moved from memory to matrix
// unchanged and never computed with. The matrices and 16-bit tiles are still declared float16_t
// here (Debian 12's glslang has no bfloat16 type); the host retypes the SPIR-V's 16-bit floats to
// bfloat16 (BFloat16Retyper), so nothing may compute with a float16_t in that build: pairs are
// packed as integers, and P and dS are converted from float32 only. Emulated, the 16-bit tiles
// hold float32 values rounded to bfloat16 instead (the rounding the matrices see).
#extension GL_KHR_shader_subgroup_basic : require
#if !VKF_MM_EMULATE
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#define FRAG_A fcoopmatNV<16, gl_ScopeSubgroup, MM, MK>
#define FRAG_B fcoopmatNV<16, gl_ScopeSubgroup, MK, MN>
#define FRAG_C fcoopmatNV<32, gl_ScopeSubgroup, MM, MN>
#endif

// HALF_T: the shared tiles of 16-bit operands computed here (P, dS); TO_HALF(x) rounds a float
// into one, HALF_FLOAT(h) reads one back (emulation). HALF_AT(A, i): element i (in halves) of an
// array of 16-byte units (PAIR, flex_dtype.glsl: two 16-bit elements of an input buffer as one word).
#if IN_BF16 && VKF_MM_EMULATE
#define HALF_T float
#define TO_HALF(x) uintBitsToFloat(vkf_bf16_bits(x) << 16)
#define HALF_FLOAT(h) (h)
#else
#define HALF_T float16_t
#define TO_HALF(x) float16_t(x)
#define HALF_FLOAT(h) float(h)
#endif
#if IN_BF16
#define HALF_AT(A, i) uintBitsToFloat((A[(i) >> 3][((i) >> 1) & 3] >> (16 * ((i) & 1))) << 16)
#else
#define HALF_AT(A, i) float(unpackFloat2x16(A[(i) >> 3][((i) >> 1) & 3])[(i) & 1])
#endif

// unit_DATA(at, sd, u): unit u of the row at element `at` (element stride `sd`) of the 16-bit buffer
// DATA, read as one 16-byte load from UNITS (the same buffer seen as uvec4) where the host found
// every row contiguous and 8-aligned (p.vec_ok), else as eight 2-byte loads.
#define GATHER(DATA, UNITS) \
    uvec4 unit_##DATA(int at, int sd, int u) { \
        if (p.vec_ok != 0) return UNITS[at / 8 + u]; \
        uvec4 w; \
        [[unroll]] for (int i = 0; i < 4; ++i) \
            w[i] = PAIR(DATA[at + (8 * u + 2 * i) * sd], DATA[at + (8 * u + 2 * i + 1) * sd]); \
        return w; \
    }

// Shared memory written by a subgroup's lanes (or its matrix stores) visible to the others.
void subgroup_sync() { subgroupMemoryBarrierShared(); subgroupBarrier(); }
