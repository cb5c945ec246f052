#version 450
// Block-sparse flash attention, backward, passes 1 (dQ) and 2 (dK, dV) on NVIDIA's tensor cores
// (the plan's kernel coopmat-nv): flex_attention_bwd_mm.comp's passes with P and dS made in
// registers. It relies on the accumulator layout the forward's coopmat-nv kernel relies on (the
// host measures it: CooperativeMatrixLayout.nvidiaMMA): lane l holds rows l/4 and l/4 + 8 of each
// 16x16 fragment, element e in row l/4 + 8 * (e >> 2), column 2 * (l % 4) + (e & 1) + 8 * ((e >> 1) & 1).
// So each score's row and key are known where it is computed, P and dS are made in the
// accumulator that held S and dP, and become fp16 A operands by conversion: no shared-memory
// round trip per step (the generic passes' cost: 9-12 TFLOP/s on an H100, 2026-12-05).
//
// A workgroup of NSG subgroups owns T = 16 * RPW * NSG rows of its output — query rows (pass 1) or
// keys (pass 2) —, RPW blocks of 16 per subgroup, whose Q and dO (pass 1) or K and V (pass 2) it
// keeps as A operands in registers (with RPW = 2 each staged operand loaded from shared memory
// feeds two products: half the shared-memory reads per product, for twice the registers). It walks the other side STEP rows at a time (keys along the forward walk in pass
// 1; query rows along the transposed walk of each query head of its group in pass 2), staged in
// shared memory as 16-bit values. Per step and 16 staged rows c, with S = x·x_cᵀ and dP = y·y_cᵀ:
//   pass 1 (owned query rows, staged keys):  dQ += dS_c · K_c
//   pass 2 (owned keys, staged query rows):  S and dP are transposed (keys x queries), so
//                                            dV += Pᵀ_c · dO_c,  dK += dSᵀ_c · Q_c
// with P = exp(s' - LSE), dS = P (dP - delta) d score_mod / d score (pair_grads), 0 where masked,
// out of range or the row has no key (LSE -inf). dS and P are rounded to the operands' dtype for
// their products (as FlashAttention does); everything is summed in fp32. Key splits (pass 1) and
// query splits (pass 2) write float32 partials that pass 4 of flex_attention_bwd.comp sums.
//
// Steps that need no check (a full block, every staged and owned row in range) make P and dS with
// no branch: P = exp2(s' log2(e) - LSE log2(e)), an LSE of -inf taken as +inf so that its row's P is 0.
//
// Defines: BWD_PASS (1, 2), D = DV (a multiple of 16), NSG, RPW (1, 2), STEP (a multiple of 16), BQ = T,
// OWN_SHARED (0/1: the owned rows' operands stay in shared memory, loaded at each use, which
// leaves their registers to the gradients at large D), PREFETCH (0/1: each step's rows are
// loaded into registers while the step before computes; costs 2 * PRE registers), IN_F16 = OUT_F16 = 1 or IN_BF16 = OUT_BF16 = 1
// (the host retypes the 16-bit operands), DKV (pass 2: 0 dK and dV; 1 dV alone, 2 dK alone — two
// dispatches whose accumulators each take half the registers, S computed in both). Subgroups of 32.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require

#define VKF_MM_EMULATE 0
#define MM 16
#define MN 16
#define MK 16
#ifndef RPW
#define RPW 1
#endif
#define WG (32 * NSG)
#define T (16 * NSG * RPW)
// Fragments per 16 owned rows along D, and staged 16-row blocks per step.
#define FD (D / 16)
#define FS (STEP / 16)
// The row blocks, unrolled by the preprocessor (a loop over arrays of matrices left the NVIDIA
// driver indexing them in local memory: 5-9x slower, H100, 2026-12-06).
#if RPW == 2
#define EACH_M(X) X(0) X(1)
#else
#define EACH_M(X) X(0)
#endif
#ifndef OWN_SHARED
#define OWN_SHARED 0
#endif
#ifndef PREFETCH
#define PREFETCH 0
#endif
#ifndef DKV
#define DKV 0
#endif
// What this dispatch makes: dS (for dQ or dK), and P as an operand (for dV).
#define NEED_DS (BWD_PASS == 1 || DKV != 1)
#define NEED_PV (BWD_PASS == 2 && DKV != 2)
const float LOG2E = 1.4426950408889634;
layout(local_size_x = WG) in;

// The mods' work that depends only on the batch and head (an ALiBi slope read from a captured
// tensor) goes into vkf_prologue(b, h), called when the head changes, instead of every pair.
#define VKF_HOIST_BH 1
#include "flex_bwd_common.glsl"
#include "flex_mm.glsl"

// Element e of a fragment: in the upper 8 rows when EL_HI(e), column lane_c + EL_COL(e).
#define EL_HI(e) ((e) >> 2)
#define EL_COL(e) (((e) & 1) + 8 * (((e) >> 1) & 1))
// Which of a 16-column block's four columns of this lane element e is in (0..3).
#define EL_CI(e) (((e) & 1) + 2 * (((e) >> 1) & 1))
// The mask's per-row and per-key values (VKF_HAS_MASK_RC: a captured tensor read at q_idx or at
// kv_idx, like the document ids): loaded once per owned row and per staged column, not twice a
// pair (a pair's two loads with their bounds checks in every unrolled element: document_causal's
// backward ran at 36.6 TFLOP/s where causal's ran at 132.9, H200, 2026-12-07). The owned rows are
// queries in pass 1 (dQ) and keys in pass 2 (dK/dV); the staged ones the other side.
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
#define MASK_RC 1
#if BWD_PASS == 1
#define OWN_RC_T vkf_mrow_t
#define OWN_RC(i) vkf_mrow(b, h, i)
#define ST_RC_T vkf_mcol_t
#define ST_RC(i) vkf_mcol(b, h, i)
#define MASK_PAIR(M, e) mask_mod_rc(b, h, qi, ki, o_rc[2 * (M) + EL_HI(e)], s_rc[EL_CI(e)])
#else
#define OWN_RC_T vkf_mcol_t
#define OWN_RC(i) vkf_mcol(b, h, i)
#define ST_RC_T vkf_mrow_t
#define ST_RC(i) vkf_mrow(b, h, i)
#define MASK_PAIR(M, e) mask_mod_rc(b, h, qi, ki, s_rc[EL_CI(e)], o_rc[2 * (M) + EL_HI(e)])
#endif
#else
#define MASK_RC 0
#define MASK_PAIR(M, e) mask_mod(b, h, qi, ki)
#endif

// 16-byte units of 8 halves; rows padded by one unit (the eight rows of a fragment load on
// distinct banks). The owned rows pass through the staging area at the start, STEP rows at a
// time (so the area stays STEP rows: on NVIDIA the resident workgroups of an SM share about 48 KiB
// of shared memory, docs/performance.md), or stay in their own (OWN_SHARED).
#define XS4 (D / 8 + 1)
#if OWN_SHARED
shared uvec4 Xo4[T * XS4];
shared uvec4 Yo4[T * XS4];
#endif
shared uvec4 Xs4[STEP * XS4];
shared uvec4 Ys4[STEP * XS4];
#if BWD_PASS == 2
// The staged query rows' LSE and delta, and the LSE in log2 units (-inf as +inf) for the
// steps that need no check (made once per row here, not once per element).
shared float t_lse[STEP], t_delta[STEP], t_lse2[STEP];
#endif
#include "flex_bwd_operands.glsl"

// A step's share per invocation: PRE 16-byte units of each staged operand, PRL rows' LSE and delta.
#define PRE ((STEP * (D / 8) + WG - 1) / WG)
#define PRL ((STEP + WG - 1) / WG)
// Loads the nt staged rows from row t0 of head hh (zeros past them): this invocation's units of
// X and Y, and in pass 2 its rows' LSE and delta.
void fetch(int b, int hh, int t0, int nt, int lid, out uvec4 fx[PRE], out uvec4 fy[PRE], out float fl[PRL], out float fd[PRL]) {
    [[unroll]] for (int a = 0; a < PRE; ++a) {
        const int e = lid + a * WG, j = e / (D / 8), u = e - j * (D / 8);
        const bool ok = e < STEP * (D / 8) && j < nt;
        fx[a] = ok ? STEP_X(b, hh, t0 + j, u) : uvec4(0);
        fy[a] = ok ? STEP_Y(b, hh, t0 + j, u) : uvec4(0);
    }
    [[unroll]] for (int a = 0; a < PRL; ++a) {
        const int r = lid + a * WG;
#if BWD_PASS == 2
        fl[a] = r < nt ? lse_data[lse_at(b, hh, t0 + r)] : NEG_INF;
        fd[a] = r < nt ? delta_data[row_id(b, hh, t0 + r)] : 0.0;
#else
        fl[a] = 0.0; fd[a] = 0.0;
#endif
    }
}

void main() {
    const int lid = int(gl_LocalInvocationIndex);
    const int sg = int(gl_SubgroupID), lane = int(gl_SubgroupInvocationID), r0 = sg * 16 * RPW;
    const int lane_r = lane >> 2, lane_c = 2 * (lane & 3);
    const float scale_l2 = p.scale * LOG2E;   // SCORE_L2's factor
    // Built for subgroups of 32 (the layout above): otherwise NaN gradients, never wrong numbers.
    const bool sized = gl_SubgroupSize == 32u && gl_NumSubgroups == uint(NSG);
#if BWD_PASS == 1
    // x = query tile, y = head, z = batch * splits + split.
    const int h = int(gl_WorkGroupID.y), b = int(gl_WorkGroupID.z) / p.dq_splits, split = int(gl_WorkGroupID.z) % p.dq_splits;
    int qb, q0;
    const int n_own = query_tile(int(gl_WorkGroupID.x), qb, q0);
    if (n_own <= 0) return;
    const int o0 = q0, hk = h / (p.Hq / p.Hkv);
    const int kb_lo = split * p.dq_split_blocks, kb_hi = p.dq_splits > 1 ? kb_lo + p.dq_split_blocks : 2147483647;
    const int own_h = h;
#ifdef VKF_HAS_PROLOGUE
    vkf_prologue(b, h);
#endif
#else
    // x = key tile (ceil(kv_bs / T) per KV block), y = KV head, z = batch * splits + split.
    const int tiles_k = (p.kv_bs + T - 1) / T;
    const int kb = int(gl_WorkGroupID.x) / tiles_k, hk = int(gl_WorkGroupID.y), b = int(gl_WorkGroupID.z) / p.dk_splits;
    const int split = int(gl_WorkGroupID.z) % p.dk_splits;
    const int o0 = kb * p.kv_bs + (int(gl_WorkGroupID.x) - kb * tiles_k) * T;
    const int k_end = min(min(o0 + T, (kb + 1) * p.kv_bs), p.Lkv);
    if (k_end <= o0) return;
    const int n_own = max(0, min(k_end, kv_len(b)) - o0);   // keys past the batch's length get zero gradients
    const int qb_lo = split * p.dk_split_blocks, qb_hi = p.dk_splits > 1 ? qb_lo + p.dk_split_blocks : 2147483647;
    const int own_h = hk;
#endif

    // The owned rows' operands: staged, then kept as A operands (or read from their own area).
#if OWN_SHARED
    for (int e = lid; e < T * (D / 8); e += WG) {
        const int r = e / (D / 8), u = e - r * (D / 8);
        Xo4[r * XS4 + u] = r < n_own ? OWN_X(b, own_h, o0 + r, u) : uvec4(0);
        Yo4[r * XS4 + u] = r < n_own ? OWN_Y(b, own_h, o0 + r, u) : uvec4(0);
    }
    barrier();
#else
    FRAG_A xf[RPW * FD];   // [m * FD + kk]: row block m, columns 16 kk
#if NEED_DS
    FRAG_A yf[RPW * FD];
#endif
    // STEP rows a round (each 16-row block lies in one round: STEP is a multiple of 16).
    [[unroll]] for (int c0 = 0; c0 < T; c0 += STEP) {
        if (c0 > 0) barrier();   // the round before is read
        for (int e = lid; e < STEP * (D / 8); e += WG) {
            const int j = e / (D / 8), u = e - j * (D / 8), r = c0 + j;
            Xs4[j * XS4 + u] = r < n_own ? OWN_X(b, own_h, o0 + r, u) : uvec4(0);
            Ys4[j * XS4 + u] = r < n_own ? OWN_Y(b, own_h, o0 + r, u) : uvec4(0);
        }
        barrier();
#if NEED_DS
#define OWN_LOAD_Y(M) [[unroll]] for (int kk = 0; kk < FD; ++kk) coopMatLoadNV(yf[M * FD + kk], Ys4, uint((r0 + 16 * M - c0) * XS4 + kk * 2), uint(XS4), false);
#else
#define OWN_LOAD_Y(M)
#endif
#define OWN_LOAD(M) if (r0 + 16 * M >= c0 && r0 + 16 * M < c0 + STEP) { /* uniform in the subgroup */ \
            [[unroll]] for (int kk = 0; kk < FD; ++kk) coopMatLoadNV(xf[M * FD + kk], Xs4, uint((r0 + 16 * M - c0) * XS4 + kk * 2), uint(XS4), false); \
            OWN_LOAD_Y(M) }
        EACH_M(OWN_LOAD)
    }
#endif
    // Pass 1: gX = dQ. Pass 2: gX = dK, gY = dV.
#if NEED_DS
    FRAG_C gX[RPW * FD];   // [m * FD + nn]
    [[unroll]] for (int nn = 0; nn < RPW * FD; ++nn) gX[nn] = FRAG_C(0.0);
#endif
#if NEED_PV
    FRAG_C gY[RPW * FD];
    [[unroll]] for (int nn = 0; nn < RPW * FD; ++nn) gY[nn] = FRAG_C(0.0);
#endif
#if BWD_PASS == 1
    // This lane's two query rows per row block ([m * 2 + i]): their LSE (and in log2 units, -inf
    // as +inf) and delta.
    float r_lse[2 * RPW], r_lse2[2 * RPW], r_delta[2 * RPW];
    [[unroll]] for (int i = 0; i < 2 * RPW; ++i) {
        const int r = r0 + 16 * (i >> 1) + lane_r + 8 * (i & 1);
        r_lse[i] = r < n_own ? lse_data[lse_at(b, h, q0 + r)] : NEG_INF;
        r_lse2[i] = r_lse[i] == NEG_INF ? -NEG_INF : r_lse[i] * LOG2E;
        r_delta[i] = r < n_own ? delta_data[row_id(b, h, q0 + r)] : 0.0;
    }
#endif
#if MASK_RC
    // The owned rows' mask values: once here in pass 1 (one head), at each partial step in pass 2
    // (the head changes along the walk).
    OWN_RC_T o_rc[2 * RPW];
#if BWD_PASS == 1
    [[unroll]] for (int i = 0; i < 2 * RPW; ++i) {
        const int r = r0 + 16 * (i >> 1) + lane_r + 8 * (i & 1);
        o_rc[i] = OWN_RC(q0 + min(r, n_own - 1));   // rows past the end: a row's values (never kept)
    }
#endif
#endif

    // The walk as a cursor over its steps (walk_next), so that with PREFETCH each step's rows are
    // loaded into registers while the step before computes. (No loop cap to report: this kernel
    // runs only on NVIDIA GPUs.)
#if BWD_PASS == 1
    const int w_h0 = h, w_h1 = h + 1, w_lo = kb_lo, w_hi = kb_hi, w_own = qb;
#else
    const int w_h0 = hk * (p.Hq / p.Hkv), w_h1 = n_own > 0 ? w_h0 + p.Hq / p.Hkv : w_h0, w_lo = qb_lo, w_hi = qb_hi, w_own = kb;
#endif
    int c_h = w_h0, c_pass = w_h0 < w_h1 ? -1 : 2, c_blk = 0, c_n = 0, c_m = 0, c_t0 = 0, c_stop = 0;
    if (c_pass < 2) walk_next(STEP, b, w_own, w_h0, w_h1, w_lo, w_hi, c_h, c_pass, c_blk, c_n, c_m, c_t0, c_stop);
    uvec4 fx[PRE], fy[PRE];   // a step's rows on their way to shared memory
    float fl[PRL], fd[PRL];   // pass 2: its rows' LSE and delta
#if PREFETCH
    if (c_pass < 2) fetch(b, BWD_PASS == 1 ? hk : c_h, c_t0, min(STEP, c_stop - c_t0), lid, fx, fy, fl, fd);
#endif
    while (c_pass < 2) {
        const int pass = c_pass, t0 = c_t0, nt = min(STEP, c_stop - c_t0);
#if BWD_PASS == 2
        const int h = c_h;
#ifdef VKF_HAS_PROLOGUE
        vkf_prologue(b, h);   // each query head of the group in turn
#endif
#endif
        barrier();   // the previous step's tiles are read (and, first, the owned rows)
#if !PREFETCH
        fetch(b, BWD_PASS == 1 ? hk : h, t0, nt, lid, fx, fy, fl, fd);
#endif
        [[unroll]] for (int a = 0; a < PRE; ++a) {
            const int e = lid + a * WG, j = e / (D / 8), u = e - j * (D / 8);
            if (e < STEP * (D / 8)) { Xs4[j * XS4 + u] = fx[a]; Ys4[j * XS4 + u] = fy[a]; }
        }
#if BWD_PASS == 2
        [[unroll]] for (int a = 0; a < PRL; ++a) {
            const int r = lid + a * WG;
            if (r < STEP) { t_lse[r] = fl[a]; t_delta[r] = fd[a]; t_lse2[r] = fl[a] == NEG_INF ? -NEG_INF : fl[a] * LOG2E; }
        }
#endif
        barrier();
        walk_next(STEP, b, w_own, w_h0, w_h1, w_lo, w_hi, c_h, c_pass, c_blk, c_n, c_m, c_t0, c_stop);
#if PREFETCH
        // The next step's loads, in flight while this one computes.
        if (c_pass < 2) fetch(b, BWD_PASS == 1 ? hk : c_h, c_t0, min(STEP, c_stop - c_t0), lid, fx, fy, fl, fd);
#endif
        // Per 16 staged rows: S and dP (this subgroup's 16 * RPW owned rows against them), then
        // P and dS in place, element by element, as the fp16 operands of the gradients.
#if NEED_DS
        FRAG_A dsf[RPW * FS];   // [m * FS + c]
#endif
#if NEED_PV
        FRAG_A pf[RPW * FS];
#endif
        // No check needed in this subgroup's pairs: a full block, every row in range.
        const bool clean = pass == 0 && nt == STEP && r0 + 16 * RPW <= n_own;
#if MASK_RC && BWD_PASS == 2
        if (pass == 1) {
            [[unroll]] for (int i = 0; i < 2 * RPW; ++i) {
                const int r = r0 + 16 * (i >> 1) + lane_r + 8 * (i & 1);
                o_rc[i] = OWN_RC(o0 + min(r, n_own - 1));
            }
        }
#endif
        [[unroll]] for (int c = 0; c < FS; ++c) {
#if MASK_RC
            // This lane's four staged columns of block c (a partial block's only).
            ST_RC_T s_rc[4];
            if (pass == 1) {
                [[unroll]] for (int i = 0; i < 4; ++i) {
                    const int j = c * 16 + lane_c + (i & 1) + 8 * (i >> 1);
                    s_rc[i] = ST_RC(t0 + min(j, nt - 1));   // defined for CHECKED_PDS's select
                }
            }
#endif
            FRAG_C s0 = FRAG_C(0.0), dp0 = FRAG_C(0.0);
#if RPW == 2
            FRAG_C s1 = FRAG_C(0.0), dp1 = FRAG_C(0.0);
#endif
#if OWN_SHARED
#define S_MMA(M) { FRAG_A xf; coopMatLoadNV(xf, Xo4, uint((r0 + 16 * M) * XS4 + kk * 2), uint(XS4), false); s##M = coopMatMulAddNV(xf, xt, s##M); }
#define DP_MMA(M) { FRAG_A yf; coopMatLoadNV(yf, Yo4, uint((r0 + 16 * M) * XS4 + kk * 2), uint(XS4), false); dp##M = coopMatMulAddNV(yf, yt, dp##M); }
#else
#define S_MMA(M) s##M = coopMatMulAddNV(xf[M * FD + kk], xt, s##M);
#define DP_MMA(M) dp##M = coopMatMulAddNV(yf[M * FD + kk], yt, dp##M);
#endif
            [[unroll]] for (int kk = 0; kk < FD; ++kk) {
                FRAG_B xt;   // the staged rows transposed: element (d, row), read column-major
                coopMatLoadNV(xt, Xs4, uint(c * 16 * XS4 + kk * 2), uint(XS4), true);
                EACH_M(S_MMA)
            }
#if NEED_DS
            [[unroll]] for (int kk = 0; kk < FD; ++kk) {
                FRAG_B yt;
                coopMatLoadNV(yt, Ys4, uint(c * 16 * XS4 + kk * 2), uint(XS4), true);
                EACH_M(DP_MMA)
            }
#endif
            // P and dS of row block M in place of S and dP (sM, dpM).
#if BWD_PASS == 1
#define PAIR_ROWS(M) const int qi = q0 + r, ki = t0 + j; const float lse2 = r_lse2[2 * M + EL_HI(e)], lse_i = r_lse[2 * M + EL_HI(e)], delta_i = r_delta[2 * M + EL_HI(e)];
#else
#define PAIR_ROWS(M) const int qi = t0 + j, ki = o0 + r; const float lse_i = t_lse[j], delta_i = t_delta[j], lse2 = t_lse2[j];
#endif
// P = exp2 of the score-mod in log2 units: with no score-mod one multiply-add a score (log2(e)
// folded into the scale), else the mod times log2(e). Not the splice's score_mod_l2, which the
// forward takes: its tanh of the scaled score is not the one score_mod_grad computes, so the
// soft-cap took two (H100, 2026-12-07: soft-cap 111.9 -> 98.1 TFLOP/s, ALiBi 129.9 -> 130.2).
#if !VKF_HAS_SCORE_MOD
#define SCORE_L2(sc, s, qi, ki) ((s) * scale_l2)
#else
#define SCORE_L2(sc, s, qi, ki) (score_mod(sc, b, h, qi, ki) * LOG2E)
#endif
// P and dS of row block M's elements, each kept where KEEP holds (else 0): every pair computed,
// the checks selecting (with KEEP true, the steps that need no check: nothing to select).
#define SELECT_PDS(M, KEEP) \
                [[unroll]] for (int e = 0; e < 8; ++e) { \
                    const int r = r0 + 16 * M + lane_r + 8 * EL_HI(e), j = c * 16 + lane_c + EL_COL(e); \
                    PAIR_ROWS(M) \
                    const bool keep = KEEP; \
                    const float sc = s##M[e] * p.scale; \
                    const float P = exp2(SCORE_L2(sc, s##M[e], qi, ki) - lse2); \
                    const float dS = P * (dp##M[e] - delta_i) * score_mod_grad(sc, b, h, qi, ki); \
                    s##M[e] = keep ? dS : 0.0; \
                    dp##M[e] = keep ? P : 0.0; \
                }
#define PAIR_KEPT(M, e) (r < n_own && j < nt && lse_i != NEG_INF && (pass == 0 || MASK_PAIR(M, e)))
// Steps with checks: where the mods load nothing and report nothing (VKF_PURE_MODS) the select
// (a branch per pair cost the forward 12% on the sliding window, H200); else a pair is computed
// only where it is kept.
#if VKF_PURE_MODS
#define CHECKED_PDS(M) SELECT_PDS(M, PAIR_KEPT(M, e))
#else
#define CHECKED_PDS(M) \
                [[unroll]] for (int e = 0; e < 8; ++e) { \
                    const int r = r0 + 16 * M + lane_r + 8 * EL_HI(e), j = c * 16 + lane_c + EL_COL(e); \
                    PAIR_ROWS(M) \
                    float P = 0.0, dS = 0.0; \
                    if (PAIR_KEPT(M, e)) pair_grads(b, h, qi, ki, s##M[e], dp##M[e], lse_i, delta_i, P, dS); \
                    s##M[e] = dS; \
                    dp##M[e] = P; \
                }
#endif
#define MAKE_PDS(M) \
            if (clean) { \
                SELECT_PDS(M, true) \
            } else { \
                CHECKED_PDS(M) \
            } \
            KEEP_DS(M) KEEP_P(M)
#if NEED_DS
#define KEEP_DS(M) dsf[M * FS + c] = FRAG_A(s##M);
#else
#define KEEP_DS(M)
#endif
#if NEED_PV
#define KEEP_P(M) pf[M * FS + c] = FRAG_A(dp##M);
#else
#define KEEP_P(M)
#endif
            EACH_M(MAKE_PDS)
        }
        // The gradients: the staged rows read row-major as B operands, each feeding RPW products.
        [[unroll]] for (int nn = 0; nn < FD; ++nn) {
            [[unroll]] for (int c = 0; c < FS; ++c) {
#if NEED_DS
                FRAG_B xb;
                coopMatLoadNV(xb, Xs4, uint(c * 16 * XS4 + nn * 2), uint(XS4), false);
#define GX_MMA(M) gX[M * FD + nn] = coopMatMulAddNV(dsf[M * FS + c], xb, gX[M * FD + nn]);
                EACH_M(GX_MMA)
#endif
#if NEED_PV
                FRAG_B yb;
                coopMatLoadNV(yb, Ys4, uint(c * 16 * XS4 + nn * 2), uint(XS4), false);
#define GY_MMA(M) gY[M * FD + nn] = coopMatMulAddNV(pf[M * FS + c], yb, gY[M * FD + nn]);
                EACH_M(GY_MMA)
#endif
            }
        }
    }

    // Out: each lane its elements, straight from the accumulators.
    const float nan = uintBitsToFloat(0x7FC00000u);
#if BWD_PASS == 1
    [[unroll]] for (int mn = 0; mn < RPW * FD; ++mn) {
        [[unroll]] for (int e = 0; e < 8; ++e) {
            const int m = mn / FD, nn = mn - m * FD;
            const int r = r0 + 16 * m + lane_r + 8 * EL_HI(e), d = nn * 16 + lane_c + EL_COL(e);
            const float g = sized ? gX[mn][e] * p.scale : nan;
            if (r < n_own) {
                const int row = row_id(b, h, q0 + r);
                if (p.dq_splits > 1) part_dq[(split * p.B * p.Hq * p.Lq + row) * D + d] = g;
                else dq_data[row * D + d] = OUT_VALUE(g);
            }
        }
    }
#else
    const int rows_k = p.B * p.Hkv * p.Lkv;
    [[unroll]] for (int mn = 0; mn < RPW * FD; ++mn) {
        [[unroll]] for (int e = 0; e < 8; ++e) {
            const int m = mn / FD, nn = mn - m * FD;
            const int r = r0 + 16 * m + lane_r + 8 * EL_HI(e), d = nn * 16 + lane_c + EL_COL(e);
            if (o0 + r < k_end) {
                const int rowk = (b * p.Hkv + hk) * p.Lkv + o0 + r;   // dK and dV: contiguous [B, Hkv, Lkv, D]
#if NEED_DS
                const float gk = sized ? gX[mn][e] * p.scale : nan;
                if (p.dk_splits > 1) part_dk[(split * rows_k + rowk) * D + d] = gk;
                else dk_data[rowk * D + d] = OUT_VALUE(gk);
#endif
#if NEED_PV
                const float gv = sized ? gY[mn][e] : nan;
                if (p.dk_splits > 1) part_dv[(split * rows_k + rowk) * D + d] = gv;
                else dv_data[rowk * D + d] = OUT_VALUE(gv);
#endif
            }
        }
    }
#endif
}
