// Bindings and parameters shared by the forward attention kernels (flex_attention_fwd*.comp).
// Before including, define IN_T and OUT_T (the element types of Q/K/V and of O).
// The binding numbers (VKF_BINDING_*) and the parameter block's members (VKF_PARAMS_MEMBERS) are
// generated from their one declaration on the host (AttentionParams.swift).
#include "flex_params.glsl"
layout(std430, set = 0, binding = VKF_BINDING_Q) readonly buffer QBuf { IN_T q_data[]; };
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBuf { IN_T k_data[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBuf { IN_T v_data[]; };
layout(std430, set = 0, binding = VKF_BINDING_O) writeonly buffer OBuf { OUT_T o_data[]; };
layout(std430, set = 0, binding = VKF_BINDING_LSE) writeonly buffer LBuf { float lse_data[]; };
layout(std430, set = 0, binding = VKF_BINDING_KV_NUM) readonly buffer KvNum { int kv_num[]; };
layout(std430, set = 0, binding = VKF_BINDING_KV_IDX) readonly buffer KvIdx { int kv_idx[]; };
layout(std430, set = 0, binding = VKF_BINDING_FULL_KV_NUM) readonly buffer FullKvNum { int full_kv_num[]; };
layout(std430, set = 0, binding = VKF_BINDING_FULL_KV_IDX) readonly buffer FullKvIdx { int full_kv_idx[]; };
// Each row's maximum score (natural log units, after scale, score-mod and mask), where the call
// asks for it (VKF_MAX_SCORES); addressed like the LSE (same shape and strides).
layout(std430, set = 0, binding = VKF_BINDING_MAX) writeonly buffer MaxBuf { float max_data[]; };
// Per-batch key lengths (VKF_KV_LENGTHS): keys at or past kv_lens[b] do not exist for batch b.
layout(std430, set = 0, binding = VKF_BINDING_KV_LENS) readonly buffer KvLens { int kv_lens[]; };
// Per-batch query offsets (VKF_Q_OFFSETS): query row i of batch b is position i + q_offsets[b],
// which the mods see as q_idx and the BlockMask is walked at (decoding against a mask built once).
layout(std430, set = 0, binding = VKF_BINDING_Q_OFFSETS) readonly buffer QOffsets { int q_offsets[]; };
// Paged K/V (VKF_PAGED): logical key j of batch b is row page_table[b, j / page_size] * page_size
// + j % page_size of the physical cache (whose batch stride the host sets to 0).
layout(std430, set = 0, binding = VKF_BINDING_PAGE_TABLE) readonly buffer PageTable { int page_table[]; };
// Per-head sink logits (VKF_SINKS): a logit with no value row in every softmax denominator.
layout(std430, set = 0, binding = VKF_BINDING_SINKS) readonly buffer Sinks { float sinks[]; };
// The parameter block: push constants where the device takes that many bytes (VKF_PARAMS_PUSH):
// the compiler then reads them as constants — from a storage buffer NVIDIA's compiler reloads
// them, bounds-checked, on every tile.
#if VKF_PARAMS_PUSH
layout(push_constant) uniform Params { VKF_PARAMS_MEMBERS } p;
#else
layout(std430, set = 0, binding = VKF_BINDING_PARAMS) readonly buffer Params { VKF_PARAMS_MEMBERS } p;
#endif

// Splice point: score_mod, mask_mod (error buffer at VKF_BINDING_ERRORS, captures from
// VKF_BINDING_FIRST_CAPTURE). These
// kernels run one (b, h) per workgroup, so the mods' work that depends only on b and h goes into
// vkf_prologue(b, h), which workgroup_tile below calls once (when VKF_HAS_PROLOGUE is defined).
#ifndef VKF_NO_HOIST
#define VKF_HOIST_BH 1
#endif
#include "flex_mods.glsl"
#include "flex_walk.glsl"

// VKF_KV_SPLIT: the keys are split across workgroups (workgroup z = batch * splits + split), each
// writing float32 partials that flex_attention_merge.comp combines.
#ifndef VKF_KV_SPLIT
#define VKF_KV_SPLIT 0
#endif
#if VKF_KV_SPLIT
int workgroup_split() { return int(gl_WorkGroupID.z) % p.splits; }
#endif
// The KV blocks this workgroup walks and where its split's partials go (VKF_KV_SPLIT: a share of
// [kv_block_lo, kv_block_hi) per split, partials kv_split stride apart).
#if VKF_KV_SPLIT
#define KV_LO (p.kv_block_lo + workgroup_split() * p.kv_split_blocks)
#define KV_HI min(p.kv_block_hi, KV_LO + p.kv_split_blocks)
#define SPLIT_O + workgroup_split() * p.o_split_stride
#define SPLIT_LSE + workgroup_split() * p.lse_split_stride
#else
#define KV_LO p.kv_block_lo
#define KV_HI p.kv_block_hi
#define SPLIT_O
#define SPLIT_LSE
#endif
#ifndef VKF_SINKS
#define VKF_SINKS 0
#endif
#ifndef VKF_KV_LENGTHS
#define VKF_KV_LENGTHS 0
#endif
// The keys of batch b: all of them, or its own length (checked by the host to lie in [0, Lkv]).
#if VKF_KV_LENGTHS
#define KV_LEN(b) kv_lens[b]
#else
#define KV_LEN(b) p.Lkv
#endif
#ifndef VKF_PAGED
#define VKF_PAGED 0
#endif
// The row of the K/V buffers that holds logical key j of batch b (the KV addressing function).
#if VKF_PAGED
int kv_row(int b, int j) { return page_table[b * p.max_pages + j / p.page_size] * p.page_size + j % p.page_size; }
#else
#define kv_row(b, j) (j)
#endif
#ifndef VKF_Q_OFFSETS
#define VKF_Q_OFFSETS 0
#endif
#ifndef VKF_MAX_SCORES
#define VKF_MAX_SCORES 0
#endif
#ifndef VKF_REVERSE_TILES
#define VKF_REVERSE_TILES 0
#endif
#define NEG_INF (-uintBitsToFloat(0x7F800000u))
const float LOG2E = 1.4426950408889634;
const float LN2 = 0.6931471805599453;
// 1 / LOG2E as a float pair: x · (HI + LO) undoes LOG2E's own rounding (1.3e-8), which x · LN2 keeps.
const float INV_LOG2E_HI = 0.6931471824645996;
const float INV_LOG2E_LO = 7.348693209507928e-09;
// A value in log2 units back in natural units.
float vkf_from_l2(float x) {
    precise float r = fma(x, INV_LOG2E_HI, x * INV_LOG2E_LO);
    return r;
}
// A row's LSE, natural units, from its maximum m (log2 units) and its sum l of 2^(s - m) (l > 0):
// m ln 2 + ln l with one rounding at the end, as PyTorch's float32 logsumexp has (its max plus
// the log of its sum); (m + log2 l) · ln 2 rounds twice more (lavapipe: 1.08-1.11x the error of
// PyTorch's eager LSE against float64, against 1.04-1.06x; docs/performance.md, twenty-first session).
float vkf_lse(float m, float l) {
    precise float r = fma(m, INV_LOG2E_HI, fma(m, INV_LOG2E_LO, log2(l) * LN2));   // precise: no reassociation
    return r;
}

// With score_mod_l2 in the splice the score-mod returns log2 units itself (log2(e) folded into
// its constants), and the score is not multiplied by log2(e) afterwards.
#if VKF_HAS_SCORE_MOD && defined(VKF_HAS_SCORE_MOD_L2)
#define SCORE_IN_L2 1
#else
#define SCORE_IN_L2 0
#endif
// A score in log2 units from its dot product: scale, then the score-mod.
float modded_l2(float dot, int b, int h, int qi, int ki) {
    float s = dot * p.scale;
#if VKF_HAS_SCORE_MOD && SCORE_IN_L2
    return score_mod_l2(s, s * LOG2E, b, h, qi, ki);
#elif VKF_HAS_SCORE_MOD
    return score_mod(s, b, h, qi, ki) * LOG2E;
#else
    return s * LOG2E;
#endif
}

// This workgroup's query tile: rows [q0, q0 + rows) inside query block qb, query head h (hl
// within this dispatch's bindings), its key/value head hk, batch b (bl within the bindings).
// False when the tile starts past the end of its block or of the queries. Runs the mods' (b, h)
// prologue.
// The workgroup's query tile: batch and head (and their place in the dispatch's chunk), the
// BlockMask's query block, the first row (q0) and its position (p0: q0 plus the query offset),
// and the number of rows. A tile never crosses a block of the BlockMask: with query offsets the
// tiles of a block start at its first row the call has.
struct WorkgroupTile { int b, bl, h, hl, hk, qb, q0, p0, rows; };
bool workgroup_tile(int bq, out WorkgroupTile t) {
#if VKF_REVERSE_TILES
    // Last query tiles first: under causal-like masks they have the most keys, so the light ones
    // fill the end of the dispatch.
    const int tile = int(gl_NumWorkGroups.x - 1u - gl_WorkGroupID.x);
#else
    const int tile = int(gl_WorkGroupID.x);
#endif
    t.hl = int(gl_WorkGroupID.y);
#if VKF_KV_SPLIT
    t.bl = int(gl_WorkGroupID.z) / p.splits;   // z = batch * splits + split
#else
    t.bl = int(gl_WorkGroupID.z);
#endif
    t.h = p.h_start + t.hl;
    t.b = p.b_start + t.bl;
    t.hk = t.h / (p.Hq / p.Hkv);
#if VKF_Q_OFFSETS
    // Tiles enumerate the blocks from the one holding the batch's first position; the grid is
    // sized for the batch that spans the most blocks, others' extra tiles have no rows.
    const int off = q_offsets[t.b];
    t.qb = off / p.q_bs + tile / p.tiles_per_block;
    t.p0 = max(t.qb * p.q_bs, off) + (tile - (tile / p.tiles_per_block) * p.tiles_per_block) * bq;
    t.rows = min(min(t.p0 + bq, (t.qb + 1) * p.q_bs), off + p.Lq) - t.p0;
    t.q0 = t.p0 - off;
#else
    t.qb = tile / p.tiles_per_block;
    t.q0 = t.qb * p.q_bs + (tile - t.qb * p.tiles_per_block) * bq;
    t.rows = min(min(t.q0 + bq, (t.qb + 1) * p.q_bs), p.Lq) - t.q0;
    t.p0 = t.q0;
#endif
    if (t.rows <= 0) return false;
#ifdef VKF_HAS_PROLOGUE
    vkf_prologue(t.b, t.h);
#endif
    return true;
}
