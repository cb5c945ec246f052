// Bindings and parameters shared by the forward attention kernels (flex_attention_fwd*.comp).
// Before including, define IN_T and OUT_T (the element types of Q/K/V and of O).
layout(std430, set = 0, binding = 0) readonly buffer QBuf { IN_T q_data[]; };
layout(std430, set = 0, binding = 1) readonly buffer KBuf { IN_T k_data[]; };
layout(std430, set = 0, binding = 2) readonly buffer VBuf { IN_T v_data[]; };
layout(std430, set = 0, binding = 3) writeonly buffer OBuf { OUT_T o_data[]; };
layout(std430, set = 0, binding = 4) writeonly buffer LBuf { float lse_data[]; };
layout(std430, set = 0, binding = 5) readonly buffer KvNum { int kv_num[]; };
layout(std430, set = 0, binding = 6) readonly buffer KvIdx { int kv_idx[]; };
layout(std430, set = 0, binding = 7) readonly buffer FullKvNum { int full_kv_num[]; };
layout(std430, set = 0, binding = 8) readonly buffer FullKvIdx { int full_kv_idx[]; };
// Each row's maximum score (natural log units, after scale, score-mod and mask), where the call
// asks for it (VKF_MAX_SCORES); addressed like the LSE (same shape and strides).
layout(std430, set = 0, binding = 11) writeonly buffer MaxBuf { float max_data[]; };
// Sizes, element offsets (into this dispatch's bindings) and strides (elements) of every tensor, the BlockMask's geometry, the
// scale; filled by ForwardKernel.run in this order (184 bytes). Push constants where the device
// takes that many (VKF_PARAMS_PUSH): the compiler then reads them as constants — from a storage
// buffer NVIDIA's compiler reloads them, bounds-checked, on every tile. Else binding 9.
#define VKF_PARAMS_MEMBERS \
    int B, Hq, Hkv, Lq, Lkv, b_start; \
    int q_base, q_sb, q_sh, q_sl, q_sd; \
    int k_base, k_sb, k_sh, k_sl, k_sd; \
    int v_base, v_sb, v_sh, v_sl, v_sd; \
    int o_base, o_sb, o_sh, o_sl, o_sd; \
    int lse_base, lse_sb, lse_sh, lse_sl; \
    int mask_b, mask_h, q_bs, kv_bs, q_blocks, kv_blocks, dense, tiles_per_block, write_lse; \
    float scale; \
    int vec_ok;   /* 1: Q, K, V, O rows are contiguous and every row offset is a multiple of 8 elements */ \
    int h_start;  /* first query head of this dispatch (workgroup y counts from it) */ \
    int hk_start; /* first key/value head bound by this dispatch */ \
    int kv_block_lo, kv_block_hi; /* the KV blocks this dispatch walks (all: 0, kv_blocks); the host splits long key ranges where a driver caps a shader's loop iterations */ \
    int write_max; /* write each row's maximum score to binding 11 (VKF_MAX_SCORES) */
#if VKF_PARAMS_PUSH
layout(push_constant) uniform Params { VKF_PARAMS_MEMBERS } p;
#else
layout(std430, set = 0, binding = 9) readonly buffer Params { VKF_PARAMS_MEMBERS } p;
#endif

// Splice point: score_mod, mask_mod (error buffer at binding 10, captures from binding 12). These
// kernels run one (b, h) per workgroup, so the mods' work that depends only on b and h goes into
// vkf_prologue(b, h), which workgroup_tile below calls once (when VKF_HAS_PROLOGUE is defined).
#define VKF_HOIST_BH 1
#include "flex_mods.glsl"

#ifndef VKF_MAX_SCORES
#define VKF_MAX_SCORES 0
#endif
#ifndef VKF_REVERSE_TILES
#define VKF_REVERSE_TILES 0
#endif
#define NEG_INF (-uintBitsToFloat(0x7F800000u))
const float LOG2E = 1.4426950408889634;
const float LN2 = 0.6931471805599453;

// This workgroup's query tile: rows [q0, q0 + rows) inside query block qb, query head h (hl
// within this dispatch's bindings), its key/value head hk, batch b (bl within the bindings).
// False when the tile starts past the end of its block or of the queries. Runs the mods' (b, h)
// prologue.
struct WorkgroupTile { int b, bl, h, hl, hk, qb, q0, rows; };
bool workgroup_tile(int bq, out WorkgroupTile t) {
#if VKF_REVERSE_TILES
    // Last query tiles first: under causal-like masks they have the most keys, so the light ones
    // fill the end of the dispatch.
    const int tile = int(gl_NumWorkGroups.x - 1u - gl_WorkGroupID.x);
#else
    const int tile = int(gl_WorkGroupID.x);
#endif
    t.hl = int(gl_WorkGroupID.y);
    t.bl = int(gl_WorkGroupID.z);
    t.h = p.h_start + t.hl;
    t.b = p.b_start + t.bl;
    t.hk = t.h / (p.Hq / p.Hkv);
    t.qb = tile / p.tiles_per_block;
    t.q0 = t.qb * p.q_bs + (tile - t.qb * p.tiles_per_block) * bq;
    t.rows = min(min(t.q0 + bq, (t.qb + 1) * p.q_bs), p.Lq) - t.q0;
    if (t.rows <= 0) return false;
#ifdef VKF_HAS_PROLOGUE
    vkf_prologue(t.b, t.h);
#endif
    return true;
}
