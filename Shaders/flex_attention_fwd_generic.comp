#version 450
// Block-sparse flash attention, forward, through cooperative matrices that assume nothing the
// KHR specification does not guarantee: not a subgroup size, not which invocation holds which
// element of a matrix. For AMD, Intel and any other device with VK_KHR_cooperative_matrix (the
// host rewrites this NV-extension GLSL's SPIR-V to the KHR extension, CooperativeMatrixKHRRewriter;
// no conversion between matrix uses happens here, so no layout enters).
//
// One workgroup of NSG subgroups per (query tile of MM * GEN_RPW * NSG rows inside one BlockMask query
// block, head, batch); subgroup g owns rows g * MM * GEN_RPW.. (GEN_RPW blocks of MM) and keeps their
// Q as A operands in registers. Per step
// of BKV keys the workgroup stages K and V (fp16) in shared memory; each subgroup computes
// S = Q Kᵀ (MM x MN x MK products, fp32 accumulators) and stores it to its rows of a shared score
// tile; the online softmax (flex_softmax.glsl) reads the scores there, applies scale, score-mod and
// mask, and writes P (fp16) to shared memory; P comes back as A operands, and O (fp32 accumulators)
// accumulates P V. Element order is never assumed: where a row's running maximum moves (rarely:
// it is raised lazily, by more than SM_TAU at a time), the subgroup stores O to its shared tile,
// each lane rescales the rows it owns in the softmax, and O is loaded back; at the end O goes
// through the same tile to the lanes that write it.
//
// GEN_REGSM: the register softmax (flex_mm_step.glsl's MM_STEP_REG): the scores stay in their
// accumulators, read element by element through an index matrix, and only a step where a row's
// maximum moves goes through the score tile; the row sums are products with a matrix of ones.
//
// GEN_PREFETCH: software pipeline — the next step's K and V go from global memory to registers
// while this step computes, then into the other of two shared buffers, one barrier a step (as
// coopmat-nv's); with GEN_NBUF 1 into the one buffer after a second barrier (the loads still in
// flight during the step, no second buffer's shared memory); else each step loads, then
// computes, between two barriers.
//
// VKF_MM_EMULATE: the two products as scalar loops over the same shared tiles (no cooperative
// matrices), O in registers in the softmax's row/column assignment (no round trip):
// everything else — staging, walk, mods, softmax, output — is this kernel's own code, and runs on
// lavapipe in CI at its subgroup size.
//
// Defines: D, DV (multiples of MK and MN, and of 8), MM, MN, MK (the matrix shape), SG (subgroup size), NSG
// (subgroups), BKV (keys per step, a multiple of MN, MK and of MM), GEN_PREFETCH, GEN_REGSM and VKF_MM_EMULATE (0/1), GEN_NBUF (1/2), IN_F16 and OUT_F16 (or
// IN_BF16 and OUT_BF16: bfloat16 operands, flex_mm.glsl), and what flex_attention_common.glsl takes (VKF_KV_SPLIT,
// VKF_SINKS, ...). fp16 or bf16 in; out in the same dtype (partials fp32). Bindings as flex_attention_fwd.comp.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#ifndef VKF_MM_EMULATE
#define VKF_MM_EMULATE 0
#endif
#if !VKF_MM_EMULATE
#extension GL_KHR_shader_subgroup_vote : require
#endif

layout(local_size_x = SG * NSG) in;

// IN_F16 (or IN_BF16) 1; OUT_F16 (OUT_BF16) 1, or 0 for a key split's float32 partials (VKF_KV_SPLIT).
#include "flex_dtype.glsl"
#include "flex_attention_common.glsl"
#include "flex_mm.glsl"

// GEN_RPW (default 1): row blocks of MM rows each subgroup owns (flex_mm_step.glsl's MM_RB): each
// K and V fragment read from shared memory feeds GEN_RPW products (as coopmat-nv's RPW). With
// matrices, the register softmax only (the shared one's O round trip takes one block).
#ifndef GEN_RPW
#define GEN_RPW 1
#endif
#define MM_RB GEN_RPW
#define BQ (MM * GEN_RPW * NSG)
#ifndef GEN_PREFETCH
#define GEN_PREFETCH 0
#endif
#if !defined(GEN_REGSM) || VKF_MM_EMULATE
#undef GEN_REGSM
#define GEN_REGSM 0
#endif
#if GEN_RPW > 1 && !VKF_MM_EMULATE && !GEN_REGSM
#error GEN_RPW > 1 takes the register softmax (GEN_REGSM) where the products are matrices
#endif
#if GEN_PREFETCH
#ifndef GEN_NBUF
#define GEN_NBUF 2
#endif
#define KV_NBUF GEN_NBUF
#endif
// The shared tiles and the step (scores, softmax, P V) the layout-free matrix kernels share.
#include "flex_mm_step.glsl"

#define SM_ROWS (MM * GEN_RPW)
#define SM_COLS BKV
// The running maximum moves lazily (flex_softmax.glsl): O, which stays in accumulators, makes a
// round trip through shared memory (a fragment at a time: MM_O_CHUNK) to be rescaled only on the
// tiles where it moved. (Emulated, O is in registers and rescaled by the same factors.)
#define SM_TAU 8.0
// The softmax's view of the tile (set per step): this subgroup's first row, the step's keys, the
// walk pass (1: partial block, the mask applies), and the workgroup's tile.
int g_r0, g_k0, g_kn, g_pass, g_lane;
WorkgroupTile g_t;
float sm_score(int k, int t);
void sm_put(int k, int t, float pv);
#include "flex_softmax.glsl"

// The score of raw product RAW at the workgroup tile's row R, step column J: scale, mods and mask
// (log2 units); -inf outside the tile, where the mods are never evaluated.
float mm_score(float raw, int r, int j) {
    if (r >= g_t.rows || j >= g_kn) return NEG_INF;
    const int qi = g_t.p0 + r, ki = g_k0 + j;
    float s = modded_l2(raw, g_t.b, g_t.h, qi, ki);
#if VKF_HAS_MASK_MOD
    if (g_pass == 1 && !mask_mod(g_t.b, g_t.h, qi, ki)) s = NEG_INF;
#endif
    return s;
}
float sm_score(int k, int t) {
    const int r = g_r0 + sm_row(g_lane, k), j = sm_col0(g_lane) + t * SM_TPR;
#if GEN_REGSM
    return Ss[r * SST + j];   // stored already modded (mm_score)
#else
    return mm_score(Ss[r * SST + j], r, j);
#endif
}
void sm_put(int k, int t, float pv) {
    Ps[(g_r0 + sm_row(g_lane, k)) * PST + sm_col0(g_lane) + t * SM_TPR] = TO_HALF(pv);
}

#if GEN_PREFETCH
// The walk's cursor over the mask row's full blocks, then its partial ones (t counts both): moves
// to the first step at or after key k0 of block t that has keys of this split; false past the row.
bool gen_seek(inout int t, inout int k0, inout int k_stop, inout bool partial, int mrow, int n_full, int n_all, int lkv) {
    while (k0 >= k_stop) {
        if (++t >= n_all) return false;
        partial = t >= n_full;
        const int kb = partial ? walk_block(1, mrow, t - n_full) : walk_block(0, mrow, t);
        if (kb < KV_LO || kb >= KV_HI) continue;   // another split's keys
        k0 = kb * p.kv_bs;
        k_stop = min(k0 + p.kv_bs, lkv);
    }
    return true;
}
// A step's K and V units, PF_K and PF_V per invocation, held in registers between the global
// loads (fetch) and the shared buffer (stash). Rows past kn as zeros, as without the prefetch.
#define WGS (SG * NSG)
#define PF_K ((BKV * (D / 8) + WGS - 1) / WGS)
#define PF_V ((BKV * (DV / 8) + WGS - 1) / WGS)
uvec4 g_pk[PF_K], g_pv[PF_V];
int g_koff, g_voff;
void fetch(int k0, int kn, int lid) {
#define PF_K_UNIT(j, u) unit_k_data(g_koff + kv_row(g_t.b, k0 + (j)) * p.k_sl, p.k_sd, u)
#define PF_V_UNIT(j, u) unit_v_data(g_voff + kv_row(g_t.b, k0 + (j)) * p.v_sl, p.v_sd, u)
    MM_FETCH(g_pk, 0, PF_K, D / 8, kn, lid, WGS, PF_K_UNIT)
    MM_FETCH(g_pv, 0, PF_V, DV / 8, kn, lid, WGS, PF_V_UNIT)
}
void stash(int buf, int lid) {
    MM_STASH(g_pk, 0, PF_K, Ks4, buf * BKV * KS4, KS4, D / 8, lid, WGS)
    MM_STASH(g_pv, 0, PF_V, Vs4, buf * BKV * VS4, VS4, DV / 8, lid, WGS)
}
#endif

void main() {
    const int lid = int(gl_LocalInvocationIndex);
    if (!workgroup_tile(BQ, g_t)) return;
    const int b = g_t.b, bl = g_t.bl, h = g_t.h, hl = g_t.hl, hk = g_t.hk, q0 = g_t.q0, rows = g_t.rows;
    const int sg = int(gl_SubgroupID), lane = int(gl_SubgroupInvocationID);
    g_lane = lane;
    g_r0 = sg * MM * GEN_RPW;
    // The host sized the workgroup for subgroups of SG lanes (the device's, fixed for SPIR-V 1.5
    // without VK_EXT_subgroup_size_control's varying flag); if a driver differed, every output is
    // NaN — a loud failure the first-call check catches — never a silently wrong one.
    const bool sized = gl_SubgroupSize == uint(SG) && gl_NumSubgroups == uint(NSG);

    // Q: rows of this tile, staged in shared memory BKV rows at a time (in the K tile's room), then
    // each subgroup keeps its rows' fragments.
    const int qoff = p.q_base + bl * p.q_sb + hl * p.q_sh;
#if VKF_MM_EMULATE
    for (int e = lid; e < BQ * (D / 8); e += SG * NSG) {
        const int r = e / (D / 8), u = e - r * (D / 8);
        Qs4[r * KS4 + u] = r < rows ? unit_q_data(qoff + (q0 + r) * p.q_sl, p.q_sd, u) : uvec4(0);
    }
#else
    FRAG_A qf[GEN_RPW * (D / MK)];
    for (int c = 0; c < BQ; c += BKV) {
        for (int e = lid; e < BKV * (D / 8); e += SG * NSG) {
            const int j = e / (D / 8), u = e - j * (D / 8), r = c + j;
            Ks4[j * KS4 + u] = r < rows ? unit_q_data(qoff + (q0 + r) * p.q_sl, p.q_sd, u) : uvec4(0);
        }
        barrier();
        // A block of MM rows lies in one chunk of BKV (a multiple of MM).
        MM_UNROLL for (int rb = 0; rb < GEN_RPW; ++rb) {
            const int r0 = g_r0 + rb * MM;
            if (r0 >= c && r0 < c + BKV)
                MM_UNROLL for (int kk = 0; kk < D / MK; ++kk) coopMatLoadNV(qf[rb * (D / MK) + kk], Ks4, uint((r0 - c) * KS4 + kk * MK / 8), uint(KS4), false);
        }
        barrier();
    }
#endif

    float m[SM_RPL], l[SM_RPL];
    MM_UNROLL for (int k = 0; k < SM_RPL; ++k) { m[k] = -1e30; l[k] = 0.0; }
#if VKF_MM_EMULATE
    float o[SM_RPL][DV / SM_TPR];
    MM_UNROLL for (int k = 0; k < SM_RPL; ++k)
        MM_UNROLL for (int t = 0; t < DV / SM_TPR; ++t) o[k][t] = 0.0;
#else
    FRAG_C o[GEN_RPW * (DV / MN)];
    MM_UNROLL for (int nn = 0; nn < GEN_RPW * (DV / MN); ++nn) o[nn] = C_FILL(0.0);
#endif
#if GEN_REGSM
    FRAG_C ix, mb[GEN_RPW], ls[GEN_RPW * MM_LS_N];
    MM_REG_INIT(g_r0, lane, ix, mb, ls, -1e30)
#endif

    const int mrow = walk_row(b, h, g_t.qb);
    const int n_full = walk_count(0, mrow), n_part = walk_count(1, mrow);
    const int lkv = KV_LEN(b);
    const int koff = p.k_base + bl * p.k_sb + (hk - p.hk_start) * p.k_sh;
    const int voff = p.v_base + bl * p.v_sb + (hk - p.hk_start) * p.v_sh;
    bool walked = true;   // every loop reached its bound (lavapipe's loop cap: flex_attention_fwd.comp)
#if GEN_PREFETCH
    g_koff = koff; g_voff = voff;
    const int n_all = n_full + n_part;
    int t = -1, k0 = 0, k_stop = 0, step = 0;
    bool partial = false;
    bool more = gen_seek(t, k0, k_stop, partial, mrow, n_full, n_all, lkv);
    if (more) fetch(k0, min(BKV, k_stop - k0), lid);
    while (more) {
        // Buffer step & 1 was last read two steps ago, before every subgroup passed the last barrier
        // (one buffer: read last step, before the barrier that ends it).
        const int buf = KV_NBUF == 2 ? step & 1 : 0, c0 = k0, kn = min(BKV, k_stop - k0), cpass = partial ? 1 : 0;
        stash(buf, lid);
        barrier();
        k0 += BKV;
        more = gen_seek(t, k0, k_stop, partial, mrow, n_full, n_all, lkv);
        if (more) fetch(k0, min(BKV, k_stop - k0), lid);   // in flight while this step computes
#if GEN_REGSM
        g_k0 = c0; g_kn = kn; g_pass = cpass;
        MM_STEP_REG(qf, o, g_r0, lane, m, l, ix, mb, ls, buf * BKV * KS4, buf * BKV * VS4)
#else
        MM_SCORES(qf, g_r0, lane, buf * BKV * KS4)
        subgroup_sync();
        g_k0 = c0; g_kn = kn; g_pass = cpass;
        MM_SOFTMAX_PV(o, g_r0, lane, m, l, buf * BKV * VS4)
#endif
#if KV_NBUF == 1
        barrier();   // every subgroup is done with the one K/V tile before the next stash
#endif
        ++step;
    }
    // A walk that ends on its own leaves the cursor past the row; one a driver stopped leaves it inside.
    if (more) walked = false;
#else
    int pass = 0;
    for (; pass < 2; ++pass) {
        const int n = pass == 0 ? n_full : n_part;
        int i = 0;
        for (; i < n; ++i) {
            const int kb = walk_block(pass, mrow, i);
            if (kb < KV_LO || kb >= KV_HI) continue;   // another split's keys
            const int k_stop = min(kb * p.kv_bs + p.kv_bs, lkv);
            int k0 = kb * p.kv_bs;
            for (; k0 < k_stop; k0 += BKV) {
                const int kn = min(BKV, k_stop - k0);
                // K and V rows past kn as zeros: their scores are finite (and masked), their P 0.
#define K_UNIT(j, u) unit_k_data(koff + kv_row(b, k0 + (j)) * p.k_sl, p.k_sd, u)
#define V_UNIT(j, u) unit_v_data(voff + kv_row(b, k0 + (j)) * p.v_sl, p.v_sd, u)
                MM_STAGE(Ks4, 0, KS4, D / 8, kn, lid, SG * NSG, K_UNIT)
                MM_STAGE(Vs4, 0, VS4, DV / 8, kn, lid, SG * NSG, V_UNIT)
                barrier();
                // S = Q Kᵀ into this subgroup's rows of the score tile, the softmax, O += P V.
#if GEN_REGSM
                g_k0 = k0; g_kn = kn; g_pass = pass;
                MM_STEP_REG(qf, o, g_r0, lane, m, l, ix, mb, ls, 0, 0)
#else
                MM_SCORES(qf, g_r0, lane, 0)
                subgroup_sync();
                g_k0 = k0; g_kn = kn; g_pass = pass;
                MM_SOFTMAX_PV(o, g_r0, lane, m, l, 0)
#endif
                barrier();   // every subgroup is done with this K/V tile (and with its score tile)
            }
            if (k0 < k_stop) walked = false;
        }
        if (i < n) walked = false;
    }
    if (pass < 2) walked = false;
#endif
    if (!walked && lid == 0) vkf_report(4, 0, 0, 0);

    // Each lane's rows: their sums, the sink, the LSE; then the outputs, O reaching the lanes that
    // own its rows one fragment at a time (MM_O_CHUNK).
    const float nan = uintBitsToFloat(0x7FC00000u);
    const int ooff = p.o_base + bl * p.o_sb + hl * p.o_sh SPLIT_O;
    // lk: O's normalization; le: the LSE's (float32 sums beside products with ones, MM_EXACT_SUMS 2).
    float lk[SM_RPL], fk[SM_RPL], le[SM_RPL];
#if GEN_REGSM
    MM_REG_SUMS(g_r0, lane, ls, l, lk)
#if MM_EXACT_SUMS == 2
    MM_REG_LSE_SUMS(g_r0, lane, ls, l, le)
#endif
#endif
    MM_UNROLL for (int k = 0; k < SM_RPL; ++k) {
        const int r = g_r0 + sm_row(lane, k);
#if !GEN_REGSM
        lk[k] = sm_row_sum(l[k]);
#endif
        if (!sized) lk[k] = nan;
#if GEN_REGSM && MM_EXACT_SUMS == 2
        if (!sized) le[k] = nan;
#else
        le[k] = lk[k];
#endif
        float mk = m[k];
        fk[k] = 1.0;
#if VKF_MAX_SCORES
        // Before the sink joins: the maximum is over the scores (exact, never raised lazily).
        if (p.write_max != 0 && r < rows && sm_col0(lane) == 0)
            max_data[p.lse_base SPLIT_LSE + bl * p.lse_sb + hl * p.lse_sh + (q0 + r) * p.lse_sl] = isnan(lk[k]) ? nan : lk[k] != 0.0 ? vkf_from_l2(mk) : NEG_INF;
#endif
#if VKF_SINKS
        // The head's sink joins the denominator: M = max(m, sink), l' = l 2^(m - M) + 2^(sink - M).
        const float s2 = sinks[h] * LOG2E, M = max(mk, s2);
        fk[k] = exp2(mk - M);
        lk[k] = lk[k] * fk[k] + exp2(s2 - M);
        le[k] = le[k] * fk[k] + exp2(s2 - M);
        mk = M;
#endif
        if (r < rows && p.write_lse != 0 && sm_col0(lane) == 0)
            lse_data[p.lse_base SPLIT_LSE + bl * p.lse_sb + hl * p.lse_sh + (q0 + r) * p.lse_sl] = le[k] != 0.0 ? vkf_lse(mk, le[k]) : NEG_INF;
    }
    MM_UNROLL for (int nn = 0; nn < DV / MN; ++nn) {
#if !VKF_MM_EMULATE
        MM_O_CHUNK(o, nn, g_r0)
#endif
        MM_UNROLL for (int k = 0; k < SM_RPL; ++k) {
            const int r = g_r0 + sm_row(lane, k);
            if (r >= rows) continue;
            MM_UNROLL for (int u = 0; u < MM_OCPL; ++u) {
                const int c = sm_col0(lane) + u * SM_TPR;
#if VKF_MM_EMULATE
                const float ov = o[k][nn * MM_OCPL + u];
#else
                const float ov = Ss[r * SST + c];
#endif
                o_data[ooff + (q0 + r) * p.o_sl + (nn * MN + c) * p.o_sd] = OUT_VALUE(lk[k] != 0.0 ? ov * fk[k] / lk[k] : 0.0);
            }
        }
    }
}
