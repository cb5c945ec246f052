// What the cooperative-matrix kernels that assume no element order share
// (flex_attention_fwd_generic.comp, flex_attention_bwd_mm.comp): the fragment types, 16-byte units
// of 8 halves in shared memory and their loads, and a subgroup's memory sync. Include after the
// parameter block `p` (it reads p.vec_ok); define MM, MN, MK and VKF_MM_EMULATE (0/1: the
// products as scalar loops, no cooperative matrices) before.
#extension GL_KHR_shader_subgroup_basic : require
#if !VKF_MM_EMULATE
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#define FRAG_A fcoopmatNV<16, gl_ScopeSubgroup, MM, MK>
#define FRAG_B fcoopmatNV<16, gl_ScopeSubgroup, MK, MN>
#define FRAG_C fcoopmatNV<32, gl_ScopeSubgroup, MM, MN>
#endif

// Element i (in halves) of an array of 16-byte units.
#define HALF_AT(A, i) float(unpackFloat2x16(A[(i) >> 3][((i) >> 1) & 3])[(i) & 1])

// unit_DATA(at, sd, u): unit u of the row at element `at` (element stride `sd`) of the fp16 buffer
// DATA, read as one 16-byte load from UNITS (the same buffer seen as uvec4) where the host found
// every row contiguous and 8-aligned (p.vec_ok), else as eight 2-byte loads.
#define GATHER(DATA, UNITS) \
    uvec4 unit_##DATA(int at, int sd, int u) { \
        if (p.vec_ok != 0) return UNITS[at / 8 + u]; \
        uvec4 w; \
        [[unroll]] for (int i = 0; i < 4; ++i) \
            w[i] = packFloat2x16(f16vec2(DATA[at + (8 * u + 2 * i) * sd], DATA[at + (8 * u + 2 * i + 1) * sd])); \
        return w; \
    }

// Shared memory written by a subgroup's lanes (or its matrix stores) visible to the others.
void subgroup_sync() { subgroupMemoryBarrierShared(); subgroupBarrier(); }
