#version 450
// Split-KV decoding through cooperative matrices, for calls with many query rows per KV head
// (speculative decoding: 4 query heads × 4 rows = 16). The scalar kernel (flex_attention_decode.comp)
// sums each (row, key) dot product over invocations with subgroup shuffles, which binds it by
// arithmetic once a workgroup holds more than a few rows; here a product of 16-row tiles does it.
//
// Like flex_attention_decode.comp: a workgroup takes one (batch, KV head, split), its rows are MM
// of the (query head, query row) pairs that share the KV head (GQA packing, flex_decode.glsl), its
// keys one split's share of their BlockMask row's walked blocks; it writes per row its output
// normalized over those keys (float32) and their LSE, which flex_attention_merge.comp combines
// (and adds a sink to). A split with no key writes 0 / -inf; a NaN score makes the row's partial
// NaN.
//
// Like flex_attention_fwd_generic.comp, nothing here depends on which invocation holds which
// element of a matrix, nor on a subgroup size: the workgroup is one subgroup of SG lanes. Per step
// of BKV keys it stages K and V in shared memory (any strides, paged or not), computes
// S = Q Kᵀ (Q's fragments kept from the start), stores S to shared memory, where the online
// softmax (flex_softmax.glsl) applies scale, score-mod and mask by rows the lanes choose, and
// writes P (16-bit); P comes back as A operands and O (fp32 accumulators) adds P V. O is rescaled
// through shared memory, a fragment at a time (the score tile is only BKV wide), on the rare
// steps where a row's maximum moves by more than SM_TAU, and leaves the same way. With
// one subgroup a workgroup, a step needs no workgroup barrier; the splits fill the device.
//
// VKF_MM_EMULATE: the two products as scalar loops over the same shared tiles, O in registers
// (flex_attention_fwd_generic.comp's emulation): the rest runs on lavapipe in CI.
//
// NSG (default 1) subgroups a workgroup each walk a split of their own with tiles of their own —
// one-subgroup workgroups side by side, which a driver then keeps on one compute unit together.
//
// DEC_PREFETCH (0/1): each lane holds its units of a step's K and V in registers (PK + PV of them)
// and loads the next step's while this one computes: one memory latency a step overlapped with the
// products and the softmax, instead of two exposed (K's round, then V's). An H100 ran only two to
// four of these one-subgroup workgroups an SM (their shared memory), so a subgroup's own
// latency hiding is what the kernel gets.
//
// Defines: D, DV (multiples of MK, MN and 8), MM (rows a workgroup, at most 16 per call: what a
// split-KV call takes), MN, MK, SG, NSG, BKV (keys a step: a multiple of MM, MN and MK), DEC_PREFETCH, VKF_MM_EMULATE,
// IN_F16 or IN_BF16, and what flex_attention_common.glsl takes (VKF_KV_LENGTHS, VKF_PAGED,
// VKF_Q_OFFSETS). Bindings as flex_attention_fwd.comp; O and LSE bind the partials.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#ifndef VKF_MM_EMULATE
#define VKF_MM_EMULATE 0
#endif
#if !VKF_MM_EMULATE
#extension GL_KHR_shader_subgroup_vote : require
#endif

#ifndef NSG
#define NSG 1
#endif
#ifndef DEC_PREFETCH
#define DEC_PREFETCH 0
#endif
layout(local_size_x = SG * NSG) in;
#define DEC_NSG NSG

#define OUT_F16 0
#define OUT_BF16 0
// Several heads per workgroup: the mods are spliced without their per-(b, h) hoisting.
#define VKF_NO_HOIST 1
#include "flex_dtype.glsl"
#include "flex_attention_common.glsl"
#include "flex_mm.glsl"
#define RMAX MM
#include "flex_decode.glsl"

// The shared tiles and the step (scores, softmax, P V), as flex_attention_fwd_generic.comp's for
// one subgroup (BQ = MM rows). Q passes through the K tile on its way to registers (BKV >= MM).
#define BQ (MM * NSG)
// Each subgroup's own K and V tiles: buffer g of KV_NBUF, starting at unit g · BKV · KS4 (VS4).
#define KV_NBUF NSG
// A subgroup's units of a step's K in one round, at most 16 (32 keys at D = 128).
#define STAGE_CH (BKV * (D / 8) / SG < 16 ? (BKV * (D / 8) + SG - 1) / SG : 16)
#include "flex_mm_step.glsl"


#define SM_ROWS MM
#define SM_COLS BKV
#define SM_TAU 8.0
float sm_score(int k, int t);
void sm_put(int k, int t, float pv);
#include "flex_softmax.glsl"

// The softmax's view of the step: batch, the step's first key and key count, whether its block is
// partial (the mask applies), this lane; per row of the lane: its query head (-1: none), its
// position (q_idx), whether one of its scores was NaN and (VKF_MAX_SCORES) the largest of the
// lane's scores in it (the softmax's running maximum is raised lazily: not the exact one).
int g_b, g_k0, g_kn, g_lane, g_r0;
bool g_part;
int g_h[SM_RPL], g_pos[SM_RPL];
bool g_bad[SM_RPL];
#if VKF_MAX_SCORES
float g_max[SM_RPL];
#endif

float sm_score(int k, int t) {
    const int j = sm_col0(g_lane) + t * SM_TPR, h = g_h[k];
    if (h < 0 || j >= g_kn) return NEG_INF;
    const int key = g_k0 + j;
    float s = modded_l2(Ss[(g_r0 + sm_row(g_lane, k)) * SST + j], g_b, h, g_pos[k], key);
#if VKF_HAS_MASK_MOD
    if (g_part && !mask_mod(g_b, h, g_pos[k], key)) s = NEG_INF;
#endif
    if (isnan(s)) { g_bad[k] = true; s = NEG_INF; }
#if VKF_MAX_SCORES
    g_max[k] = max(g_max[k], s);
#endif
    return s;
}
void sm_put(int k, int t, float pv) {
    Ps[(g_r0 + sm_row(g_lane, k)) * PST + sm_col0(g_lane) + t * SM_TPR] = TO_HALF(pv);
}

void main() {
    const int lane = int(gl_SubgroupInvocationID);
    g_lane = lane;
    // Built for subgroups of SG lanes (the device's); a driver that differed would make every
    // partial NaN — a loud failure — never a silently wrong one.
    const bool sized = gl_SubgroupSize == uint(SG) && gl_NumSubgroups == uint(NSG);
    // This subgroup's rows of the score and P tiles, and its K and V tiles' first units.
    const int r0 = NSG > 1 ? int(gl_SubgroupID) * MM : 0, kb = NSG > 1 ? int(gl_SubgroupID) * BKV * KS4 : 0,
              vb = NSG > 1 ? int(gl_SubgroupID) * BKV * VS4 : 0;
    g_r0 = r0;
    const DecodeWG w = decode_wg();
    const int b = w.b, bl = w.bl, chunk = w.chunk, hk = w.hk, group = w.group, off = w.off, qb = w.qb;
    g_b = b;
    bool any = false;
    [[unroll]] for (int r = 0; r < MM; ++r) any = any || row_head(r, chunk, hk, group, off, qb) >= 0;
    if (!any) return;   // uniform: no row of this batch lies in this segment
    [[unroll]] for (int k = 0; k < SM_RPL; ++k) {
        const int r = sm_row(lane, k);
        g_h[k] = row_head(r, chunk, hk, group, off, qb);
        g_pos[k] = off + row_query(r, chunk);
        g_bad[k] = false;
#if VKF_MAX_SCORES
        g_max[k] = NEG_INF;
#endif
    }

    // Q: the rows' query vectors (zeros where a row is none), staged, then kept as fragments.
    const int qoff = p.q_base + bl * p.q_sb;
    for (int e = lane; e < MM * (D / 8); e += SG) {
        const int r = e / (D / 8), u = e - r * (D / 8), h = row_head(r, chunk, hk, group, off, qb);
        const uvec4 q = h >= 0 ? unit_q_data(qoff + h * p.q_sh + row_query(r, chunk) * p.q_sl, p.q_sd, u) : uvec4(0);
#if VKF_MM_EMULATE
        Qs4[(r0 + r) * KS4 + u] = q;
#else
        Ks4[kb + r * KS4 + u] = q;
#endif
    }
    subgroup_sync();
#if !VKF_MM_EMULATE
    FRAG_A qf[D / MK];
    [[unroll]] for (int kk = 0; kk < D / MK; ++kk) coopMatLoadNV(qf[kk], Ks4, uint(kb + kk * MK / 8), uint(KS4), false);
    subgroup_sync();   // Q read before K overwrites it
#endif

    float m[SM_RPL], l[SM_RPL];
    [[unroll]] for (int k = 0; k < SM_RPL; ++k) { m[k] = -1e30; l[k] = 0.0; }
#if VKF_MM_EMULATE
    float o[SM_RPL][DV / SM_TPR];
    [[unroll]] for (int k = 0; k < SM_RPL; ++k)
        [[unroll]] for (int t = 0; t < DV / SM_TPR; ++t) o[k][t] = 0.0;
#else
    FRAG_C o[DV / MN];
    [[unroll]] for (int nn = 0; nn < DV / MN; ++nn) o[nn] = FRAG_C(0.0);
#endif

    const int mrow = w.mrow, n_full = w.n_full, t_end = w.t_end, lkv = w.lkv, koff = w.koff, voff = w.voff;
    int t = w.t0 - 1, k0 = 0, k_stop = 0, kb0 = 0, row0 = -1;
    bool partial = false;
    bool more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
    // K and V rows past kn as zeros: their scores are finite (and dropped), their P 0.
#define K_UNIT(j, u) unit_k_data(koff + KEY_ROW(k0 + (j)) * p.k_sl, p.k_sd, u)
#define V_UNIT(j, u) unit_v_data(voff + KEY_ROW(k0 + (j)) * p.v_sl, p.v_sd, u)
#if DEC_PREFETCH
#define PK ((BKV * (D / 8) + SG - 1) / SG)
#define PV ((BKV * (DV / 8) + SG - 1) / SG)
    uvec4 rk[PK], rv[PV];   // the step's K and V units of this lane, loaded a step ahead
    if (more) {
        const int kn = min(BKV, k_stop - k0);
        MM_FETCH(rk, 0, PK, D / 8, kn, lane, SG, K_UNIT)
        MM_FETCH(rv, 0, PV, DV / 8, kn, lane, SG, V_UNIT)
    }
    while (more) {
        const int kn = min(BKV, k_stop - k0);
        MM_STASH(rk, 0, PK, Ks4, kb, KS4, D / 8, lane, SG)
        MM_STASH(rv, 0, PV, Vs4, vb, VS4, DV / 8, lane, SG)
        subgroup_sync();
        g_k0 = k0; g_kn = kn; g_part = partial;
        // The cursor moves on, and the next step's loads are in flight while this one computes.
        k0 += BKV;
        more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
        if (more) {
            const int kn2 = min(BKV, k_stop - k0);
            MM_FETCH(rk, 0, PK, D / 8, kn2, lane, SG, K_UNIT)
            MM_FETCH(rv, 0, PV, DV / 8, kn2, lane, SG, V_UNIT)
        }
        MM_SCORES(qf, r0, lane, kb)
        subgroup_sync();
        MM_SOFTMAX_PV(o, r0, lane, m, l, vb)
        subgroup_sync();   // the K, V and P tiles read before the next step's stores
    }
#else
    while (more) {
        const int kn = min(BKV, k_stop - k0);
        MM_STAGE(Ks4, kb, KS4, D / 8, kn, lane, SG, K_UNIT)
        MM_STAGE(Vs4, vb, VS4, DV / 8, kn, lane, SG, V_UNIT)
        subgroup_sync();
        // S = Q Kᵀ into the score tile, the softmax, O += P V.
        MM_SCORES(qf, r0, lane, kb)
        subgroup_sync();
        g_k0 = k0; g_kn = kn; g_part = partial;
        MM_SOFTMAX_PV(o, r0, lane, m, l, vb)
        subgroup_sync();   // the K, V and P tiles read before the next step's staging
        k0 += BKV;
        more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
    }
#endif
    // A walk that ends on its own leaves the cursor past the share; one a driver stopped (lavapipe's
    // loop cap) leaves it inside: reported, never a silent truncation.
    if (more && lane == 0) vkf_report(4, 0, 0, 0);

    // This split's partial per row: O over its keys, normalized, and their LSE (natural log);
    // partials [split, b, h, i(, d)], contiguous over this dispatch's batches and every head.
    // O reaches the lanes that own its rows one fragment at a time (MM_O_CHUNK).
    const float nan = uintBitsToFloat(0x7FC00000u);
    float lk[SM_RPL];
    bool bad[SM_RPL];
    int prow[SM_RPL];
    [[unroll]] for (int k = 0; k < SM_RPL; ++k) {
        const int r = sm_row(lane, k);
        lk[k] = sm_row_sum(l[k]);
        bad[k] = SM_ROW_MAX(g_bad[k] ? 1.0 : 0.0) != 0.0 || !sized;
        prow[k] = (bl * p.Hq + g_h[k]) * p.Lq + row_query(r, chunk);
#if VKF_MAX_SCORES
        const float mx = SM_ROW_MAX(g_max[k]);
        // The split's largest score (natural units), where it saw a key.
        if (g_h[k] >= 0 && sm_col0(lane) == 0)
            max_data[p.lse_base + w.split * p.lse_split_stride + prow[k]] = bad[k] ? nan : lk[k] != 0.0 ? vkf_from_l2(mx) : NEG_INF;
#endif
        if (g_h[k] >= 0 && sm_col0(lane) == 0)
            lse_data[p.lse_base + w.split * p.lse_split_stride + prow[k]] = bad[k] ? nan : lk[k] != 0.0 ? vkf_lse(m[k], lk[k]) : NEG_INF;
    }
    [[unroll]] for (int nn = 0; nn < DV / MN; ++nn) {
#if !VKF_MM_EMULATE
        MM_O_CHUNK(o, nn, r0)
#endif
        [[unroll]] for (int k = 0; k < SM_RPL; ++k) {
            if (g_h[k] < 0) continue;
            const int r = sm_row(lane, k);
            [[unroll]] for (int u = 0; u < MM_OCPL; ++u) {
                const int c = sm_col0(lane) + u * SM_TPR;
#if VKF_MM_EMULATE
                const float ov = o[k][nn * MM_OCPL + u];
#else
                const float ov = Ss[(r0 + r) * SST + c];
#endif
                o_data[p.o_base + w.split * p.o_split_stride + prow[k] * DV + nn * MN + c] = bad[k] ? nan : lk[k] != 0.0 ? ov / lk[k] : 0.0;
            }
        }
    }
}
