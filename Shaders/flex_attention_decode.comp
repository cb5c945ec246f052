#version 450
// Split-KV decoding: few query rows against a long KV cache. A workgroup takes one (batch, KV
// head, split): its rows are the query rows of the query heads that share the KV head (GQA
// packing: K and V are read once per group, not once per query head), at most RMAX of them, and
// its keys one share of the BlockMask row's walked blocks (full, then partial), counted by list
// position so that skipped blocks cost nothing and every split gets the same number of kept
// blocks. Each split writes, per row, its output normalized over its keys (float32) and its LSE;
// flex_attention_merge.comp combines the splits (and adds a sink). A split with no key writes
// 0 / -inf; a NaN score makes the row's partial NaN (the merge keeps it NaN).
//
// Decoding reads each key once and does little arithmetic with it, so the kernel is built to keep
// memory busy: the next tile's K and V are loaded 16 bytes at a time into registers while the
// current tile is computed (one tile ahead), K and V of a tile are staged together (one wait per
// tile, not two), and every phase of a tile spreads over the whole workgroup — scores a (row,
// key) per invocation, the running maximum by shared atomics, P a (row, key) per invocation, P·V
// a (row, pair of dims) per invocation with the row sum beside it. Rows are kept in shared memory
// as 32-bit words of two elements (16-bit inputs stay packed), which halves the shared loads of
// the dot products.
//
// Rows of one workgroup share one BlockMask row: the heads packed are those of a broadcast mask
// (per-head masks pack one head per workgroup), and query rows at offsets (VKF_Q_OFFSETS) that
// fall in different query blocks go to different workgroups (dec_segs segments).
//
// Grid: x = split, y = (KV head × head chunks × segments), z = batch of this dispatch.
// Defines: D, DV, WG, RMAX (rows per workgroup), BKV (keys per staged tile), IN_F16/IN_BF16, and
// what flex_attention_common.glsl takes (VKF_KV_LENGTHS, VKF_PAGED, VKF_Q_OFFSETS, ...).
#extension GL_GOOGLE_include_directive : require

layout(local_size_x = WG) in;

#define OUT_F16 0
#define OUT_BF16 0
// Several heads per workgroup: the mods are spliced without their per-(b, h) hoisting.
#define VKF_NO_HOIST 1
#include "flex_dtype.glsl"
#include "flex_attention_common.glsl"

// K and V as 16-byte units (rows contiguous and 8-element aligned: p.vec_ok, D and DV multiples of 8).
#define VEC_PATH (D % 8 == 0 && DV % 8 == 0)
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBufU { UNIT_T k_units[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBufU { UNIT_T v_units[]; };

// A shared word holds two elements of a row: packed 16-bit pairs, or a vec2 for float32 inputs.
#if IN_F16 || IN_BF16
#define W_T uint
#define WPU 4   // words per 16-byte unit
#else
#define W_T vec2
#define WPU 2
#endif
vec2 wfloats(W_T w) {
#if IN_F16
    return vec2(unpackFloat2x16(w));
#elif IN_BF16
    return vec2(uintBitsToFloat(w << 16), uintBitsToFloat(w & 0xFFFF0000u));
#else
    return w;
#endif
}
W_T unit_word(UNIT_T u, int i) {
#if IN_F16 || IN_BF16
    return u[i];
#else
    return i == 0 ? u.xy : u.zw;
#endif
}
// Elements x (even dim) and y (the next, or 0 past an odd width) as one word; both are input
// values widened to float, so narrowing them again is exact.
W_T pair_word(float x, float y) {
#if IN_F16
    return packFloat2x16(f16vec2(x, y));
#elif IN_BF16
    return (floatBitsToUint(x) >> 16) | (floatBitsToUint(y) & 0xFFFF0000u);
#else
    return vec2(x, y);
#endif
}

#define DW ((D + 1) / 2)     // words per Q or K row
#define DVW ((DV + 1) / 2)   // words per V row (and per output row: a pair of dims per task)
#define KST (DW | 1)         // odd row strides: keys read at one word hit different banks
#define VST (DVW | 1)
#define SST (BKV | 1)
#define ACC ((RMAX * DVW + WG - 1) / WG)
#define TASKS ((RMAX * BKV + WG - 1) / WG)
shared vec2 Qs[RMAX * DW];
shared W_T Ks[BKV * KST];
shared W_T Vs[BKV * VST];
shared float S[RMAX * SST];   // scores, then P
shared int row_max[RMAX];     // running maximum of the row's scores (log2 units) as an ordered int
shared int row_nan[RMAX];
shared int row_h[RMAX], row_i[RMAX], row_pos[RMAX];   // head, query row, position (-1: no row)

// Floats ordered as ints (negative floats flipped), so that atomicMax on shared ints takes maxima.
int ordered(float x) { const int i = floatBitsToInt(x); return i >= 0 ? i : i ^ 0x7FFFFFFF; }
float unordered(int i) { return intBitsToFloat(i >= 0 ? i : i ^ 0x7FFFFFFF); }

// The walk's cursor: block t of this split's share (kb its key block, partial past the full ones)
// and the tile starting at key k0 (keys before k_stop). Moves to the first tile at or after the
// cursor that has keys; false past the share.
bool seek(inout int t, inout int k0, inout int k_stop, inout bool partial, int t_end, int n_full, int mrow, int lkv) {
    while (k0 >= k_stop) {
        if (++t >= t_end) return false;
        partial = t >= n_full;
        const int kb = partial ? walk_block(1, mrow, t - n_full) : walk_block(0, mrow, t);
        k0 = kb * p.kv_bs;
        k_stop = min(k0 + p.kv_bs, lkv);
    }
    return true;
}

void main() {
    const int lid = int(gl_LocalInvocationIndex);
    const int split = int(gl_WorkGroupID.x);
    const int bl = int(gl_WorkGroupID.z), b = p.b_start + bl;
    const int y = int(gl_WorkGroupID.y);
    const int seg = y % p.dec_segs, chunk = (y / p.dec_segs) % p.dec_chunks, hk = y / (p.dec_segs * p.dec_chunks);
    const int group = p.Hq / p.Hkv;
#if VKF_Q_OFFSETS
    const int off = q_offsets[b];
#else
    const int off = 0;
#endif
    const int qb = off / p.q_bs + seg;   // the query block all rows of this workgroup lie in
    // The rows: heads h0..h0 + dec_heads of the group, query rows i whose position lies in qb.
    const int h0 = hk * group + chunk * p.dec_heads;
    if (lid < RMAX) {
        const int hh = lid / p.Lq, i = lid - hh * p.Lq, h = h0 + hh, pos = off + i;
        const bool ok = hh < p.dec_heads && i < p.Lq && h < (hk + 1) * group && pos / p.q_bs == qb;
        row_h[lid] = ok ? h : -1; row_i[lid] = i; row_pos[lid] = pos;
        row_max[lid] = ordered(-1e30); row_nan[lid] = 0;
    }
    barrier();
    bool any = false;
    for (int r = 0; r < RMAX; ++r) any = any || row_h[r] >= 0;
    if (!any) return;   // uniform: no row of this batch lies in this segment
    for (int e = lid; e < RMAX * DW; e += WG) {
        const int r = e / DW, w = e - r * DW, h = row_h[r], d = 2 * w;
        const int qo = p.q_base + bl * p.q_sb + h * p.q_sh + row_i[r] * p.q_sl + d * p.q_sd;
        Qs[e] = h >= 0 ? vec2(IN_FLOAT(q_data[qo]), d + 1 < D ? IN_FLOAT(q_data[qo + p.q_sd]) : 0.0) : vec2(0.0);
    }
    // Per output task (row, pair of dims): the sum of P·V, the row sum of P, and the running
    // maximum they are scaled to; every task of a row computes the same row sum.
    vec2 acc[ACC];
    float lsum[ACC], mrun[ACC];
    for (int a = 0; a < ACC; ++a) { acc[a] = vec2(0.0); lsum[a] = 0.0; mrun[a] = -1e30; }
    // The mask row (shared by every row here) and this split's share of its walked blocks.
    const int mrow = walk_row(b, h0, qb);   // a per-head mask packs one head (h0) per workgroup
    const int n_full = walk_count(0, mrow), n_part = walk_count(1, mrow);
    const int n_all = n_full + n_part, per = (n_all + p.splits - 1) / p.splits;
    const int t_end = min(n_all, (split + 1) * per);
    const int lkv = KV_LEN(b);
    const int koff = p.k_base + bl * p.k_sb + (hk - p.hk_start) * p.k_sh;
    const int voff = p.v_base + bl * p.v_sb + (hk - p.hk_start) * p.v_sh;
    int t = split * per - 1, k0 = 0, k_stop = 0;
    bool partial = false;
    bool more = seek(t, k0, k_stop, partial, t_end, n_full, mrow, lkv);
#if VEC_PATH
    // The tile ahead, in registers: K and V units (row j = e / units per row).
#define KU (D / UNIT)
#define VU (DV / UNIT)
#define KR ((BKV * KU + WG - 1) / WG)
#define VR ((BKV * VU + WG - 1) / WG)
    UNIT_T kreg[KR], vreg[VR];
#define LOAD_TILE(K0, KN) \
    for (int i = 0; i < KR; ++i) { \
        const int e = lid + i * WG, j = e / KU; \
        if (e < BKV * KU && j < (KN)) kreg[i] = k_units[(koff + kv_row(b, (K0) + j) * p.k_sl) / UNIT + e - j * KU]; \
    } \
    for (int i = 0; i < VR; ++i) { \
        const int e = lid + i * WG, j = e / VU; \
        if (e < BKV * VU && j < (KN)) vreg[i] = v_units[(voff + kv_row(b, (K0) + j) * p.v_sl) / UNIT + e - j * VU]; \
    }
    if (more && p.vec_ok != 0) LOAD_TILE(k0, min(BKV, k_stop - k0))
#endif
    barrier();
    // Lavapipe stops a loop for good once it has run 65535 iterations, counted over all its runs:
    // each loop whose trip count is not a constant checks it finished.
    bool cut = false;
    while (more) {
        const int kn = min(BKV, k_stop - k0), kt = k0;
        const bool part = partial;
        // Stage this tile; then move the cursor and start loading the next one.
#if VEC_PATH
        if (p.vec_ok != 0) {
            for (int i = 0; i < KR; ++i) {
                const int e = lid + i * WG, j = e / KU, u = e - j * KU;
                if (e < BKV * KU && j < kn) for (int q = 0; q < WPU; ++q) Ks[j * KST + u * WPU + q] = unit_word(kreg[i], q);
            }
            for (int i = 0; i < VR; ++i) {
                const int e = lid + i * WG, j = e / VU, u = e - j * VU;
                if (e < BKV * VU && j < kn) for (int q = 0; q < WPU; ++q) Vs[j * VST + u * WPU + q] = unit_word(vreg[i], q);
            }
        } else
#endif
        {
            for (int e = lid; e < BKV * DW; e += WG) {
                const int j = e / DW, w = e - j * DW, d = 2 * w;
                if (j < kn) {
                    const int o = koff + kv_row(b, kt + j) * p.k_sl + d * p.k_sd;
                    Ks[j * KST + w] = pair_word(IN_FLOAT(k_data[o]), d + 1 < D ? IN_FLOAT(k_data[o + p.k_sd]) : 0.0);
                }
            }
            for (int e = lid; e < BKV * DVW; e += WG) {
                const int j = e / DVW, w = e - j * DVW, d = 2 * w;
                if (j < kn) {
                    const int o = voff + kv_row(b, kt + j) * p.v_sl + d * p.v_sd;
                    Vs[j * VST + w] = pair_word(IN_FLOAT(v_data[o]), d + 1 < DV ? IN_FLOAT(v_data[o + p.v_sd]) : 0.0);
                }
            }
        }
        k0 += BKV;
        more = seek(t, k0, k_stop, partial, t_end, n_full, mrow, lkv);
#if VEC_PATH
        if (more && p.vec_ok != 0) LOAD_TILE(k0, min(BKV, k_stop - k0))
#endif
        barrier();
        // Scores, a (row, key) per invocation; the rows' running maxima by atomics.
        for (int a = 0; a < TASKS; ++a) {
            const int e = lid + a * WG, r = e / BKV, j = e - r * BKV;
            if (e < RMAX * BKV && row_h[r] >= 0 && j < kn) {
                float dot = 0.0;
                int w = 0;
                for (; w < DW; ++w) {
                    const vec2 q = Qs[r * DW + w], k = wfloats(Ks[j * KST + w]);
                    dot += q.x * k.x + q.y * k.y;
                }
                cut = cut || w < DW;
                const int pos = row_pos[r], ki = kt + j;
                float s = modded_l2(dot, b, row_h[r], pos, ki);
#if VKF_HAS_MASK_MOD
                if (part && !mask_mod(b, row_h[r], pos, ki)) s = NEG_INF;
#endif
                S[r * SST + j] = s;
                if (isnan(s)) row_nan[r] = 1;
                else if (s > NEG_INF) atomicMax(row_max[r], ordered(s));
            }
        }
        barrier();
        // P against the running maximum, a (row, key) per invocation.
        for (int a = 0; a < TASKS; ++a) {
            const int e = lid + a * WG, r = e / BKV, j = e - r * BKV;
            if (e < RMAX * BKV && row_h[r] >= 0 && j < kn) S[r * SST + j] = exp2(S[r * SST + j] - unordered(row_max[r]));
        }
        barrier();
        // P·V, a (row, pair of dims) per invocation, rescaled where the row's maximum grew.
        for (int a = 0; a < ACC; ++a) {
            const int e = lid + a * WG, r = e / DVW, w = e - r * DVW;
            if (e < RMAX * DVW && row_h[r] >= 0) {
                const float m = unordered(row_max[r]), alpha = exp2(mrun[a] - m);
                vec2 o = acc[a] * alpha;
                float l = lsum[a] * alpha;
                int j = 0;
                for (; j < kn; ++j) {
                    const float pj = S[r * SST + j];
                    o += pj * wfloats(Vs[j * VST + w]);
                    l += pj;
                }
                cut = cut || j < kn;
                acc[a] = o; lsum[a] = l; mrun[a] = m;
            }
        }
        barrier();
    }
    // A walk that ends on its own leaves the cursor past the share; one a driver stopped (lavapipe's
    // loop cap) leaves it inside: reported, never a silent truncation.
    if (more || cut) vkf_report(4, 0, 0, 0);
    // This split's partial per row: O over its keys, normalized, and their LSE (natural log).
    const float nan = uintBitsToFloat(0x7FC00000u);
    for (int a = 0; a < ACC; ++a) {
        const int e = lid + a * WG;
        if (e < RMAX * DVW) {
            const int r = e / DVW, w = e - r * DVW, h = row_h[r], d = 2 * w;
            if (h >= 0) {
                // Partials [split, b, h, i(, d)], contiguous over this dispatch's batches and every head.
                const int prow = (bl * p.Hq + h) * p.Lq + row_i[r];
                const float l = lsum[a];
                const bool bad = row_nan[r] != 0;
                const vec2 o = bad ? vec2(nan) : l != 0.0 ? acc[a] / l : vec2(0.0);
                const int ob = p.o_base + split * p.o_split_stride + prow * DV + d;
                o_data[ob] = o.x;
                if (d + 1 < DV) o_data[ob + 1] = o.y;
                if (w == 0) {
                    lse_data[p.lse_base + split * p.lse_split_stride + prow] = bad ? nan : l != 0.0 ? (mrun[a] + log2(l)) * LN2 : NEG_INF;
#if VKF_MAX_SCORES
                    // The split's largest score (natural units): the running maximum, where it saw a key.
                    max_data[p.lse_base + split * p.lse_split_stride + prow] = bad ? nan : l != 0.0 ? mrun[a] * LN2 : NEG_INF;
#endif
                }
            }
        }
    }
}
