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

#define KVW (D > DV ? D : DV)
#define KVS (KVW | 1)          // odd row stride: keys read at one dim hit different banks
#define SST (BKV | 1)
#define ACC ((RMAX * DV + WG - 1) / WG)
shared float Qs[RMAX * D];
shared float KVs[BKV * KVS];   // the K tile, then the V tile
shared float S[RMAX * SST];    // scores, then P
shared float row_m[RMAX], row_l[RMAX], row_alpha[RMAX];
shared int row_nan[RMAX];
shared int row_h[RMAX], row_i[RMAX], row_pos[RMAX];   // head, query row, position (-1: no row)

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
        row_m[lid] = -1e30; row_l[lid] = 0.0; row_alpha[lid] = 1.0; row_nan[lid] = 0;
    }
    barrier();
    bool any = false;
    for (int r = 0; r < RMAX; ++r) any = any || row_h[r] >= 0;
    if (!any) return;   // uniform: no row of this batch lies in this segment
    for (int e = lid; e < RMAX * D; e += WG) {
        const int r = e / D, d = e - r * D, h = row_h[r];
        Qs[e] = h >= 0 ? IN_FLOAT(q_data[p.q_base + bl * p.q_sb + h * p.q_sh + row_i[r] * p.q_sl + d * p.q_sd]) : 0.0;
    }
    float acc[ACC];
    for (int a = 0; a < ACC; ++a) acc[a] = 0.0;
    // The mask row (shared by every row here) and this split's share of its walked blocks.
    const int mrow = walk_row(b, h0, qb);   // a per-head mask packs one head (h0) per workgroup
    const int n_full = walk_count(0, mrow), n_part = walk_count(1, mrow);
    const int n_all = n_full + n_part, per = (n_all + p.splits - 1) / p.splits;
    const int lkv = KV_LEN(b);
    const int koff = p.k_base + bl * p.k_sb + (hk - p.hk_start) * p.k_sh;
    const int voff = p.v_base + bl * p.v_sb + (hk - p.hk_start) * p.v_sh;
    barrier();
    bool cut = false;   // a driver stopped a loop early (lavapipe's cap): reported, never a silent truncation
    int t = split * per;
    for (; t < min(n_all, (split + 1) * per); ++t) {
        const bool partial = t >= n_full;
        const int kb = partial ? walk_block(1, mrow, t - n_full) : walk_block(0, mrow, t);
        const int k_stop = min(kb * p.kv_bs + p.kv_bs, lkv);
        int k0 = kb * p.kv_bs;
        for (; k0 < k_stop; k0 += BKV) {
            const int kn = min(BKV, k_stop - k0);
            for (int e = lid; e < BKV * D; e += WG) {
                const int j = e / D, d = e - j * D;
                KVs[j * KVS + d] = j < kn ? IN_FLOAT(k_data[koff + kv_row(b, k0 + j) * p.k_sl + d * p.k_sd]) : 0.0;
            }
            barrier();
            for (int e = lid; e < RMAX * BKV; e += WG) {
                const int r = e / BKV, j = e - r * BKV, h = row_h[r];
                float s = NEG_INF;
                if (h >= 0 && j < kn) {
                    float dot = 0.0;
                    for (int d = 0; d < D; ++d) dot += Qs[r * D + d] * KVs[j * KVS + d];
                    const int pos = row_pos[r], ki = k0 + j;
                    s = modded_l2(dot, b, h, pos, ki);
#if VKF_HAS_MASK_MOD
                    if (partial && !mask_mod(b, h, pos, ki)) s = NEG_INF;
#endif
                }
                S[r * SST + j] = s;
            }
            barrier();
            // Online softmax, a row per invocation (RMAX rows of BKV scores).
            if (lid < RMAX && row_h[lid] >= 0) {
                const int r = lid;
                float mx = row_m[r];
                for (int j = 0; j < kn; ++j) {
                    const float s = S[r * SST + j];
                    if (isnan(s)) row_nan[r] = 1; else mx = max(mx, s);
                }
                const float alpha = exp2(row_m[r] - mx);
                float sum = 0.0;
                for (int j = 0; j < BKV; ++j) {
                    const float pj = j < kn ? exp2(S[r * SST + j] - mx) : 0.0;
                    S[r * SST + j] = pj;
                    sum += pj;
                }
                row_l[r] = row_l[r] * alpha + sum;
                row_alpha[r] = alpha;
                row_m[r] = mx;
            }
            for (int e = lid; e < BKV * DV; e += WG) {
                const int j = e / DV, d = e - j * DV;
                KVs[j * KVS + d] = j < kn ? IN_FLOAT(v_data[voff + kv_row(b, k0 + j) * p.v_sl + d * p.v_sd]) : 0.0;
            }
            barrier();
            for (int a = 0; a < ACC; ++a) {
                const int e = lid + a * WG;
                if (e < RMAX * DV && row_h[e / DV] >= 0) {
                    const int r = e / DV, d = e - r * DV;
                    float o = acc[a] * row_alpha[r];
                    for (int j = 0; j < kn; ++j) o += S[r * SST + j] * KVs[j * KVS + d];
                    acc[a] = o;
                }
            }
            barrier();
        }
        if (k0 < k_stop) cut = true;
    }
    if (cut || t < min(n_all, (split + 1) * per)) vkf_report(4, 0, 0, 0);
    // This split's partial per row: O over its keys, normalized, and their LSE (natural log).
    const float nan = uintBitsToFloat(0x7FC00000u);
    for (int a = 0; a < ACC; ++a) {
        const int e = lid + a * WG;
        if (e < RMAX * DV) {
            const int r = e / DV, d = e - r * DV, h = row_h[r];
            if (h >= 0) {
                // Partials [split, b, h, i(, d)], contiguous over this dispatch's batches and every head.
                const int prow = (bl * p.Hq + h) * p.Lq + row_i[r];
                const float l = row_l[r];
                o_data[p.o_base + split * p.o_split_stride + prow * DV + d] = row_nan[r] != 0 ? nan : l != 0.0 ? acc[a] / l : 0.0;
                if (d == 0) {
                    lse_data[p.lse_base + split * p.lse_split_stride + prow] = row_nan[r] != 0 ? nan : l != 0.0 ? (row_m[r] + log2(l)) * LN2 : NEG_INF;
#if VKF_MAX_SCORES
                    // The split's largest score (natural units): the running maximum, where it saw a key.
                    max_data[p.lse_base + split * p.lse_split_stride + prow] = row_nan[r] != 0 ? nan : l != 0.0 ? row_m[r] * LN2 : NEG_INF;
#endif
                }
            }
        }
    }
}
