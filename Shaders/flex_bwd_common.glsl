// What the backward kernels share (flex_attention_bwd.comp's passes, flex_attention_bwd_mm.comp):
// dtypes, bindings and parameters (flex_bwd_params.glsl, generated from BackwardBinding and
// BackwardField), the spliced mods, addressing, the block walks and a pair's P and dS.
// Before including, define BWD_PASS and what flex_dtype.glsl takes.
#include "flex_dtype.glsl"
#include "flex_bwd_params.glsl"

layout(std430, set = 0, binding = BWD_BINDING_Q) readonly buffer QBuf { IN_T q_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_K) readonly buffer KBuf { IN_T k_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_V) readonly buffer VBuf { IN_T v_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_O) readonly buffer OBuf { IN_T o_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_DO) readonly buffer DOBuf { IN_T do_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_LSE) readonly buffer LseBuf { float lse_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_DLSE) readonly buffer DLseBuf { float dlse_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_DELTA) buffer DeltaBuf { float delta_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_DQ) writeonly buffer DQBuf { OUT_T dq_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_DK) writeonly buffer DKBuf { OUT_T dk_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_DV) writeonly buffer DVBuf { OUT_T dv_data[]; };
layout(std430, set = 0, binding = BWD_BINDING_KV_NUM) readonly buffer KvNum { int kv_num[]; };
layout(std430, set = 0, binding = BWD_BINDING_KV_IDX) readonly buffer KvIdx { int kv_idx[]; };
layout(std430, set = 0, binding = BWD_BINDING_FULL_KV_NUM) readonly buffer FullKvNum { int full_kv_num[]; };
layout(std430, set = 0, binding = BWD_BINDING_FULL_KV_IDX) readonly buffer FullKvIdx { int full_kv_idx[]; };
layout(std430, set = 0, binding = BWD_BINDING_Q_NUM) readonly buffer QNum { int q_num[]; };
layout(std430, set = 0, binding = BWD_BINDING_Q_IDX) readonly buffer QIdx { int q_idx_list[]; };
layout(std430, set = 0, binding = BWD_BINDING_FULL_Q_NUM) readonly buffer FullQNum { int full_q_num[]; };
layout(std430, set = 0, binding = BWD_BINDING_FULL_Q_IDX) readonly buffer FullQIdx { int full_q_idx_list[]; };
// Per-batch key lengths (p.has_kv_lens) and per-head sinks with their gradient (p.has_sinks).
layout(std430, set = 0, binding = BWD_BINDING_KV_LENS) readonly buffer KvLens { int kv_lens[]; };
layout(std430, set = 0, binding = BWD_BINDING_SINKS) readonly buffer Sinks { float sinks[]; };
layout(std430, set = 0, binding = BWD_BINDING_DSINKS) writeonly buffer DSinks { float dsinks[]; };
// Partial sums of key (pass 1) or query (pass 2) splits, where a driver caps a shader's loop
// iterations (lavapipe): [split, element], float32, summed by pass 4.
layout(std430, set = 0, binding = BWD_BINDING_PART_DQ) buffer PartDQ { float part_dq[]; };
layout(std430, set = 0, binding = BWD_BINDING_PART_DK) buffer PartDK { float part_dk[]; };
layout(std430, set = 0, binding = BWD_BINDING_PART_DV) buffer PartDV { float part_dv[]; };
// The captures' gradients laid end to end (pass 5 adds into them; float32), and the per-workgroup
// slices of the path without atomics: [workgroup, element].
layout(std430, set = 0, binding = BWD_BINDING_DCAPS) buffer DCaps { float dcaps[]; };
layout(std430, set = 0, binding = BWD_BINDING_PART_CAPS) buffer PartCaps { float part_caps[]; };
#if VKF_PARAMS_PUSH
layout(push_constant) uniform Params { BWD_PARAMS_MEMBERS } p;
#else
layout(std430, set = 0, binding = BWD_BINDING_PARAMS) readonly buffer Params { BWD_PARAMS_MEMBERS } p;
#endif

#if BWD_PASS == 5
// score_mod_cap_grads hands over, per term, the element of the gradients' buffer (-1: none) and
// the value to add; the pass then adds them with every invocation of the workgroup present.
void vkf_cg_add(int m, int e, float value);
#define VKF_CAP_GRAD_ADD(m, flat, offset, value) vkf_cg_add(m, (flat) < 0 ? -1 : (offset) + (flat), value)
#endif

// Splice point: score_mod, score_mod_grad, mask_mod (errors at BWD_BINDING_ERRORS, captures after),
// and in pass 5 score_mod_cap_grads.
#include "flex_mods.glsl"

#define NEG_INF (-uintBitsToFloat(0x7F800000u))

int q_at(int b, int h, int i) { return p.q_base + b * p.q_sb + h * p.q_sh + i * p.q_sl; }
int k_at(int b, int hk, int j) { return p.k_base + b * p.k_sb + hk * p.k_sh + j * p.k_sl; }
int v_at(int b, int hk, int j) { return p.v_base + b * p.v_sb + hk * p.v_sh + j * p.v_sl; }
int o_at(int b, int h, int i) { return p.o_base + b * p.o_sb + h * p.o_sh + i * p.o_sl; }
int do_at(int b, int h, int i) { return p.do_base + b * p.do_sb + h * p.do_sh + i * p.do_sl; }
int lse_at(int b, int h, int i) { return p.lse_base + b * p.lse_sb + h * p.lse_sh + i * p.lse_sl; }
int row_id(int b, int h, int i) { return (b * p.Hq + h) * p.Lq + i; }   // delta and dQ: contiguous [B, Hq, Lq(, D)]
// Batch b's keys: all of them, or its own length (kvLengths). With a sink the LSE includes it,
// so P = exp(s' - LSE) and every formula below hold as they are.
int kv_len(int b) { return p.has_kv_lens != 0 ? kv_lens[b] : p.Lkv; }

// The block walks (flex_walk.glsl): forward for dQ and the captures' gradients, transposed for dK/dV.
#define VKF_WALK_TRANSPOSED 1
#include "flex_walk.glsl"

// The matrix passes' walk as a cursor over its steps (flex_attention_bwd_mm.comp, _nv.comp).
#if BWD_PASS == 1 || BWD_PASS == 2
#if BWD_PASS == 1
// Pass 1 walks the forward lists of its query block (w_own) for one head: key blocks.
#define WALK_LINE(b, h, own) walk_row(b, h, own)
#define WALK_COUNT(pass, m) walk_count(pass, m)
#define WALK_BLOCK(pass, m, i) walk_block(pass, m, i)
#define WALK_BS p.kv_bs
#define WALK_END(b) kv_len(b)
#else
// Pass 2 walks the transposed lists of its key block (w_own) for each head of its group: query blocks.
#define WALK_LINE(b, h, own) walk_col(b, h, own)
#define WALK_COUNT(pass, m) walk_count_t(pass, m)
#define WALK_BLOCK(pass, m, i) walk_query_block(pass, m, i)
#define WALK_BS p.q_bs
#define WALK_END(b) p.Lq
#endif

// Moves the cursor (head c_h, list c_pass: 0 full, 1 partial; block c_blk of c_n in line c_m; rows
// c_t0 up to c_stop) to the walk's next step: the next `step` rows of its block, else the first of
// the next block with rows (in this split's range), list, head (from w_h0 up to w_h1). c_pass == 2:
// no step is left. Start from c_h = w_h0, c_pass = -1, c_blk = c_n = c_t0 = c_stop = 0 (c_pass = 2
// for an empty walk). A split's range [w_lo, w_hi) counts key blocks in pass 1, (head of the
// group, query block) units in pass 2 (a GQA group's heads multiply the work per block).
void walk_next(int step, int b, int w_own, int w_h0, int w_h1, int w_lo, int w_hi,
               inout int c_h, inout int c_pass, inout int c_blk, inout int c_n, inout int c_m, inout int c_t0, inout int c_stop) {
    c_t0 += step;
    if (c_t0 < c_stop) return;
    for (;;) {
        if (++c_blk >= c_n) {
            if (++c_pass == 2) {
                if (++c_h >= w_h1) return;   // the walk is over
                c_pass = 0;
            }
            if (c_pass == 0) c_m = WALK_LINE(b, c_h, w_own);
            c_n = WALK_COUNT(c_pass, c_m);
            c_blk = -1;
            continue;
        }
        const int blk = WALK_BLOCK(c_pass, c_m, c_blk);
#if BWD_PASS == 2
        const int unit = (c_h - w_h0) * p.q_blocks + blk;
#else
        const int unit = blk;
#endif
        if (unit < w_lo || unit >= w_hi) continue;   // another split's
        c_t0 = blk * WALK_BS;
        c_stop = min(c_t0 + WALK_BS, WALK_END(b));
        if (c_t0 < c_stop) return;
    }
}
#endif

// dS of one (row, key) pair whose score was not masked, and P: the shared core of passes 1 and 2.
// dot_qk = q.k, dot_dov = dO.v.
void pair_grads(int b, int h, int i, int j, float dot_qk, float dot_dov, float lse_i, float delta_i, out float P, out float dS) {
    const float sc = dot_qk * p.scale;
    const float s = score_mod(sc, b, h, i, j);
    P = exp(s - lse_i);
    dS = P * (dot_dov - delta_i) * score_mod_grad(sc, b, h, i, j);
}


#ifdef BQ
// Query tile `tile` (counted over the BlockMask's query blocks, ceil(q_bs / BQ) each): its block
// qb, first row q0, and its number of rows (none past its block's or the queries' end: 0 or less).
int query_tile(int tile, out int qb, out int q0) {
    const int tiles_q = (p.q_bs + BQ - 1) / BQ;
    qb = tile / tiles_q;
    q0 = qb * p.q_bs + (tile - qb * tiles_q) * BQ;
    return min(min(q0 + BQ, (qb + 1) * p.q_bs), p.Lq) - q0;
}
#endif
