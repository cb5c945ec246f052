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
#ifndef VKF_MM_SOFT
#define VKF_MM_SOFT 0
#endif
#if !VKF_MM_EMULATE && !VKF_MM_SOFT
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#define FRAG_A fcoopmatNV<16, gl_ScopeSubgroup, MM, MK>
#define FRAG_B fcoopmatNV<16, gl_ScopeSubgroup, MK, MN>
#define FRAG_C fcoopmatNV<32, gl_ScopeSubgroup, MM, MN>
// A matrix with every element X (the constructor; VKF_MM_SOFT's is a function).
#define C_FILL(x) FRAG_C(x)
#define B_FILL(x) FRAG_B(x)
#endif
// MM_UNROLL: the loops over a subgroup's matrices and their elements, unrolled (arrays of
// cooperative matrices take constant indices). With software matrices they stay loops: lavapipe
// counts every iteration of every loop of an invocation against one cap of 65535 (its
// LP_MAX_TGSI_LOOP_ITERATIONS), and unrolled, the products made its compiler take minutes.
#if VKF_MM_SOFT && !VKF_MM_EMULATE
#define MM_UNROLL [[dont_unroll]]
#else
#define MM_UNROLL [[unroll]]
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

#if VKF_MM_SOFT && !VKF_MM_EMULATE
// Software cooperative matrices (VKF_MM_SOFT, for tests on a device without them: lavapipe): the
// kernels' matrix code as it is — loads, stores, products, element-wise access through the
// accumulators — run with each matrix held across the subgroup's lanes in a deliberately
// scrambled element order, a different one for A, B and C (an odd multiplier modulo the element
// count: a bijection). A kernel that assumed any element order (or that A and C share one) gives
// wrong answers here. Products go through a per-subgroup shared scratch (NSG subgroups). float16
// operands only (the bfloat16 retyping would change the emulation's own arithmetic). Each loop
// takes SOFT_CH elements an iteration (the host makes every lane's count a multiple of it) and
// a product's sums are unrolled: lavapipe's loop cap counts iterations, not instructions (and
// its compile time grows with what is unrolled: 2 elements an iteration compiled the default
// tiles in 17 s against 26 s with 4).
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#define SOFT_NA (MM * MK / SG)
#define SOFT_NB (MK * MN / SG)
#define SOFT_NC (MM * MN / SG)
#define SOFT_CH 2
struct SoftA { float16_t e[SOFT_NA]; };
struct SoftB { float16_t e[SOFT_NB]; };
#define FRAG_A SoftA
#define FRAG_B SoftB
#define FRAG_C float[SOFT_NC]
// Element I of this lane's share of a ROWS x COLS matrix of kind KIND (0 A, 1 B, 2 C): its
// (row, column). The lanes' elements are numbered e = I * SG + lane, then scattered.
ivec2 soft_rc(int kind, int i) {
    const int rows = kind == 1 ? MK : MM, cols = kind == 0 ? MK : MN;
    const int mult = kind == 0 ? 37 : kind == 1 ? 101 : 173, add = kind == 0 ? 5 : kind == 1 ? 11 : 3;
    const int e = i * SG + int(gl_SubgroupInvocationID), pos = (e * mult + add) & (rows * cols - 1);
    return ivec2(pos / cols, pos - (pos / cols) * cols);
}
int soft_kind(SoftA m) { return 0; }
int soft_kind(SoftB m) { return 1; }
int soft_kind(float m[SOFT_NC]) { return 2; }
void soft_put(inout SoftA m, int i, float v) { m.e[i] = float16_t(v); }
void soft_put(inout SoftB m, int i, float v) { m.e[i] = float16_t(v); }
void soft_put(inout float m[SOFT_NC], int i, float v) { m[i] = v; }
int soft_len(int kind) { return kind == 0 ? SOFT_NA : kind == 1 ? SOFT_NB : SOFT_NC; }
float[SOFT_NC] soft_fill_c(float x) { float m[SOFT_NC]; [[unroll]] for (int i = 0; i < SOFT_NC; ++i) m[i] = x; return m; }
SoftB soft_fill_b(float x) { SoftB m; [[unroll]] for (int i = 0; i < SOFT_NB; ++i) m.e[i] = float16_t(x); return m; }
#define C_FILL(x) soft_fill_c(float(x))
#define B_FILL(x) soft_fill_b(float(x))
// Loads and stores from the shared arrays the kernels name (SOFT_AT_<array>(i): element i, in
// the matrix's elements, of an array of 16-byte units, floats or HALF_T): offsets and strides in
// the array's own elements, as the extension takes them.
#define SOFT_AT_Ks4(i) HALF_AT(Ks4, i)
#define SOFT_AT_Vs4(i) HALF_AT(Vs4, i)
#define SOFT_AT_Ss(i) Ss[i]
#define SOFT_AT_Ps(i) HALF_FLOAT(Ps[i])
#define SOFT_UNIT_Ks4 8
#define SOFT_UNIT_Vs4 8
#define SOFT_UNIT_Ss 1
#define SOFT_UNIT_Ps 1
// The backward's (flex_attention_bwd_mm.comp).
#define SOFT_AT_Xs4(i) HALF_AT(Xs4, i)
#define SOFT_AT_Ys4(i) HALF_AT(Ys4, i)
#define SOFT_AT_dSh(i) HALF_FLOAT(dSh[i])
#define SOFT_AT_Ph(i) HALF_FLOAT(Ph[i])
#define SOFT_UNIT_Xs4 8
#define SOFT_UNIT_Ys4 8
#define SOFT_UNIT_dSh 1
#define SOFT_UNIT_Ph 1
#define coopMatLoadNV(M, ARR, OFF, STRIDE, COLMAJOR) { \
    const int k_ = soft_kind(M); \
    [[dont_unroll]] for (int c_ = 0; c_ < soft_len(k_); c_ += SOFT_CH) \
        [[unroll]] for (int j_ = 0; j_ < SOFT_CH; ++j_) { \
            const ivec2 rc_ = soft_rc(k_, c_ + j_); \
            const int at_ = (COLMAJOR) ? (int(OFF) + rc_.y * int(STRIDE)) * SOFT_UNIT_##ARR + rc_.x \
                                       : (int(OFF) + rc_.x * int(STRIDE)) * SOFT_UNIT_##ARR + rc_.y; \
            soft_put(M, c_ + j_, float(SOFT_AT_##ARR(at_))); \
        } }
// Stores of accumulators into float tiles (the only stores the kernels make).
#define coopMatStoreNV(M, ARR, OFF, STRIDE, COLMAJOR) \
    [[dont_unroll]] for (int c_ = 0; c_ < SOFT_NC; c_ += SOFT_CH) \
        [[unroll]] for (int j_ = 0; j_ < SOFT_CH; ++j_) { \
            const ivec2 rc_ = soft_rc(2, c_ + j_); \
            ARR[(COLMAJOR) ? int(OFF) + rc_.y * int(STRIDE) + rc_.x : int(OFF) + rc_.x * int(STRIDE) + rc_.y] = (M)[c_ + j_]; \
        }
// C + A B: the lanes put A and B in the subgroup's scratch, then each sums its own elements of C.
shared float soft_scratch[NSG * (MM * MK + MK * MN)];
float[SOFT_NC] soft_mad(SoftA a, SoftB b, float c[SOFT_NC]) {
    const int base = int(gl_SubgroupID) * (MM * MK + MK * MN);
    subgroupMemoryBarrierShared(); subgroupBarrier();   // the last product's reads are done
    [[dont_unroll]] for (int i = 0; i < SOFT_NA; i += SOFT_CH)
        [[unroll]] for (int j = 0; j < SOFT_CH; ++j) { const ivec2 rc = soft_rc(0, i + j); soft_scratch[base + rc.x * MK + rc.y] = float(a.e[i + j]); }
    [[dont_unroll]] for (int i = 0; i < SOFT_NB; i += SOFT_CH)
        [[unroll]] for (int j = 0; j < SOFT_CH; ++j) { const ivec2 rc = soft_rc(1, i + j); soft_scratch[base + MM * MK + rc.x * MN + rc.y] = float(b.e[i + j]); }
    subgroupMemoryBarrierShared(); subgroupBarrier();
    [[dont_unroll]] for (int i = 0; i < SOFT_NC; i += SOFT_CH)
        [[unroll]] for (int j = 0; j < SOFT_CH; ++j) {
            const ivec2 rc = soft_rc(2, i + j);
            float acc = c[i + j];
            [[unroll]] for (int k = 0; k < MK; ++k) acc += soft_scratch[base + rc.x * MK + k] * soft_scratch[base + MM * MK + k * MN + rc.y];
            c[i + j] = acc;
        }
    return c;
}
#define coopMatMulAddNV(A, B, C) soft_mad(A, B, C)
#endif
