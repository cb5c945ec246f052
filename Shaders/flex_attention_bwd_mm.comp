#version 450
// Block-sparse flash attention, backward, passes 1 (dQ) and 2 (dK, dV) through cooperative
// matrices, assuming neither an element order nor a subgroup size (as flex_attention_fwd_generic.comp):
// the products go from accumulators to shared memory (coopMatStore), P and dS are made there per
// element by lanes of the kernel's own choosing, and come back as A operands (coopMatLoad).
// The backward needs no rescaling, so dQ, dK and dV stay in accumulators until the end.
//
// A workgroup of NSG subgroups owns T = MM * NSG rows of its output — query rows (pass 1) or keys
// (pass 2) — each subgroup MM of them, whose Q and dO (pass 1) or K and V (pass 2) it keeps as A
// operands in registers; it walks the other side T at a time (keys along the forward walk in pass
// 1; query rows along the transposed walk of every query head of its group in pass 2), staged in
// shared memory as fp16. Per step, with S = q.k and dP = dO.v for its MM x T pairs:
//   pass 1:  dS -> shared (fp16);           dQ += dS K
//   pass 2:  Pᵀ, dSᵀ -> shared (fp16);      dV += Pᵀ dO,  dK += dSᵀ Q
// with P = exp(s' - LSE) and dS = P (dP - delta) d score_mod / d score (flex_bwd_common.glsl's
// pair_grads), 0 where masked or the row has no key. dS is rounded to fp16 for its product (as
// FlashAttention rounds it to the inputs' dtype); everything is summed in fp32. Key splits (pass 1)
// and query splits (pass 2) write float32 partials that pass 4 of flex_attention_bwd.comp sums.
//
// VKF_MM_EMULATE: the products as scalar loops over the same shared tiles, the gradients in shared
// memory (lavapipe, which has no cooperative matrices, runs the rest of this kernel in CI).
//
// Defines: BWD_PASS (1, 2), D, DV (multiples of MK and MN, and of 8), MM, MN, MK, SG, NSG, BQ = BKV = T
// (= MM * NSG, a multiple of MN and MK), VKF_MM_EMULATE, IN_F16 = OUT_F16 = 1 or IN_BF16 = OUT_BF16 = 1
// (bfloat16: flex_mm.glsl; the host retypes the 16-bit operands, dS and P rounded to bfloat16).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#ifndef VKF_MM_EMULATE
#define VKF_MM_EMULATE 0
#endif

#define WG (SG * NSG)
#define T (MM * NSG)
layout(local_size_x = WG) in;

#include "flex_bwd_common.glsl"
#include "flex_mm.glsl"

// 16-byte units of 8 halves: the staged side's two operands (X: D wide, Y: DV wide), rows padded
// by one unit; the owned side's in emulation. Float tiles per subgroup's rows: S (then the final
// gradients, so at least D and DV wide) and dP; fp16 tiles: dS (and in pass 2 P).
#define XS4 (D / 8 + 1)
#define YS4 (DV / 8 + 1)
#define FW (T > D ? (T > DV ? T : DV) : (D > DV ? D : DV))
#define SST (FW + 4)
#define PST (T + 4)
#define HST (T + 8)
shared uvec4 Xs4[T * XS4];
shared uvec4 Ys4[T * YS4];
shared float Ss[T * SST];
shared float DPs[T * PST];
shared HALF_T dSh[T * HST];
#if BWD_PASS == 2
shared HALF_T Ph[T * HST];
#endif
// The LSE and delta of the query rows of the pair tile: pass 1's owned rows, pass 2's staged ones.
shared float t_lse[T], t_delta[T];
#if VKF_MM_EMULATE
shared uvec4 Xo4[T * XS4];
shared uvec4 Yo4[T * YS4];
// The gradients of the owned rows (emulation keeps them here: per-lane arrays of them, indexed in
// loops, sent lavapipe's compiler into minutes).
shared float Gx[T * D];
#if BWD_PASS == 2
shared float Gy[T * DV];
#endif
#endif
#include "flex_bwd_operands.glsl"

void main() {
    const int lid = int(gl_LocalInvocationIndex);
    const int sg = int(gl_SubgroupID), lane = int(gl_SubgroupInvocationID), r0 = sg * MM;
    // Sized for subgroups of SG lanes (see flex_attention_fwd_generic.comp): otherwise NaN gradients.
    const bool sized = gl_SubgroupSize == uint(SG) && gl_NumSubgroups == uint(NSG);
#if BWD_PASS == 1
    // x = query tile, y = head, z = batch * splits + split.
    const int h = int(gl_WorkGroupID.y), b = int(gl_WorkGroupID.z) / p.dq_splits, split = int(gl_WorkGroupID.z) % p.dq_splits;
    int qb, q0;
    const int n_own = query_tile(int(gl_WorkGroupID.x), qb, q0);
    if (n_own <= 0) return;
    const int o0 = q0, hk = h / (p.Hq / p.Hkv);
    const int kb_lo = split * p.dq_split_blocks, kb_hi = p.dq_splits > 1 ? kb_lo + p.dq_split_blocks : 2147483647;
    const int own_h = h;
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

    // The owned rows' operands: staged (in the step area), then kept as A operands.
#if VKF_MM_EMULATE
    for (int e = lid; e < T * (D / 8); e += WG) {
        const int r = e / (D / 8), u = e - r * (D / 8);
        Xo4[r * XS4 + u] = r < n_own ? OWN_X(b, own_h, o0 + r, u) : uvec4(0);
    }
    for (int e = lid; e < T * (DV / 8); e += WG) {
        const int r = e / (DV / 8), u = e - r * (DV / 8);
        Yo4[r * YS4 + u] = r < n_own ? OWN_Y(b, own_h, o0 + r, u) : uvec4(0);
    }
    for (int e = lid; e < T * D; e += WG) Gx[e] = 0.0;
#if BWD_PASS == 2
    for (int e = lid; e < T * DV; e += WG) Gy[e] = 0.0;
#endif
#else
    for (int e = lid; e < T * (D / 8); e += WG) {
        const int r = e / (D / 8), u = e - r * (D / 8);
        Xs4[r * XS4 + u] = r < n_own ? OWN_X(b, own_h, o0 + r, u) : uvec4(0);
    }
    for (int e = lid; e < T * (DV / 8); e += WG) {
        const int r = e / (DV / 8), u = e - r * (DV / 8);
        Ys4[r * YS4 + u] = r < n_own ? OWN_Y(b, own_h, o0 + r, u) : uvec4(0);
    }
    barrier();
    FRAG_A xf[D / MK], yf[DV / MK];
    MM_UNROLL for (int kk = 0; kk < D / MK; ++kk) coopMatLoadNV(xf[kk], Xs4, uint(r0 * XS4 + kk * MK / 8), uint(XS4), false);
    MM_UNROLL for (int kk = 0; kk < DV / MK; ++kk) coopMatLoadNV(yf[kk], Ys4, uint(r0 * YS4 + kk * MK / 8), uint(YS4), false);
    // Pass 1: gX = dQ. Pass 2: gX = dK, gY = dV.
    FRAG_C gX[D / MN];
    MM_UNROLL for (int nn = 0; nn < D / MN; ++nn) gX[nn] = C_FILL(0.0);
#if BWD_PASS == 2
    FRAG_C gY[DV / MN];
    MM_UNROLL for (int nn = 0; nn < DV / MN; ++nn) gY[nn] = C_FILL(0.0);
#endif
#endif
#if BWD_PASS == 1
    for (int r = lid; r < T; r += WG) {   // WG < T where subgroups are narrower than MM
        t_lse[r] = r < n_own ? lse_data[lse_at(b, h, q0 + r)] : NEG_INF;
        t_delta[r] = r < n_own ? delta_data[row_id(b, h, q0 + r)] : 0.0;
    }
#endif

    // The walk, a step of T staged rows at a time (walk_next, flex_bwd_common.glsl).
#if BWD_PASS == 1
    const int w_h0 = h, w_h1 = h + 1, w_lo = kb_lo, w_hi = kb_hi, w_own = qb;
#else
    const int w_h0 = hk * (p.Hq / p.Hkv), w_h1 = n_own > 0 ? w_h0 + p.Hq / p.Hkv : w_h0, w_lo = qb_lo, w_hi = qb_hi, w_own = kb;
#endif
    int c_h = w_h0, c_pass = w_h0 < w_h1 ? -1 : 2, c_blk = 0, c_n = 0, c_m = 0, c_t0 = 0, c_stop = 0;
    if (c_pass < 2) walk_next(T, b, w_own, w_h0, w_h1, w_lo, w_hi, c_h, c_pass, c_blk, c_n, c_m, c_t0, c_stop);
    while (c_pass < 2) {
        const int pass = c_pass, t0 = c_t0, nt = min(T, c_stop - c_t0);
#if BWD_PASS == 2
        const int h = c_h;
#endif
        barrier();   // the previous step's tiles are read
        for (int e = lid; e < T * (D / 8); e += WG) {
            const int j = e / (D / 8), u = e - j * (D / 8);
            Xs4[j * XS4 + u] = j < nt ? STEP_X(b, BWD_PASS == 1 ? hk : h, t0 + j, u) : uvec4(0);
        }
        for (int e = lid; e < T * (DV / 8); e += WG) {
            const int j = e / (DV / 8), u = e - j * (DV / 8);
            Ys4[j * YS4 + u] = j < nt ? STEP_Y(b, BWD_PASS == 1 ? hk : h, t0 + j, u) : uvec4(0);
        }
#if BWD_PASS == 2
        for (int r = lid; r < T; r += WG) {
            t_lse[r] = r < nt ? lse_data[lse_at(b, h, t0 + r)] : NEG_INF;
            t_delta[r] = r < nt ? delta_data[row_id(b, h, t0 + r)] : 0.0;
        }
#endif
        barrier();
        // S and dP of this subgroup's MM owned rows against the T staged ones.
#if VKF_MM_EMULATE
        for (int e = lane; e < MM * T; e += SG) {
            const int r = r0 + e / T, j = e - (e / T) * T;
            float s = 0.0, dp = 0.0;
            for (int d = 0; d < D; ++d) s += HALF_AT(Xo4, r * XS4 * 8 + d) * HALF_AT(Xs4, j * XS4 * 8 + d);
            for (int d = 0; d < DV; ++d) dp += HALF_AT(Yo4, r * YS4 * 8 + d) * HALF_AT(Ys4, j * YS4 * 8 + d);
            Ss[r * SST + j] = s;
            DPs[r * PST + j] = dp;
        }
#else
        MM_UNROLL for (int nn = 0; nn < T / MN; ++nn) {
            FRAG_C s = C_FILL(0.0), dp = C_FILL(0.0);
            MM_UNROLL for (int kk = 0; kk < D / MK; ++kk) {
                FRAG_B xt;   // the staged rows transposed: element (d, row), read column-major
                coopMatLoadNV(xt, Xs4, uint(nn * MN * XS4 + kk * MK / 8), uint(XS4), true);
                s = coopMatMulAddNV(xf[kk], xt, s);
            }
            MM_UNROLL for (int kk = 0; kk < DV / MK; ++kk) {
                FRAG_B yt;
                coopMatLoadNV(yt, Ys4, uint(nn * MN * YS4 + kk * MK / 8), uint(YS4), true);
                dp = coopMatMulAddNV(yf[kk], yt, dp);
            }
            coopMatStoreNV(s, Ss, uint(r0 * SST + nn * MN), uint(SST), false);
            coopMatStoreNV(dp, DPs, uint(r0 * PST + nn * MN), uint(PST), false);
        }
#endif
        subgroup_sync();
        // P and dS per pair, lane by lane (element e = lane + i SG of the MM x T tile). Not
        // unrolled: the mods and their derivative are inlined in the body.
        for (int i = 0; i < MM * T / SG; ++i) {
            const int e = lane + i * SG, r = r0 + e / T, j = e - (e / T) * T;
#if BWD_PASS == 1
            const int qi = q0 + r, ki = t0 + j;
            const float lse_i = t_lse[r], delta_i = t_delta[r];
            const bool ok = r < n_own && j < nt;
#else
            const int qi = t0 + j, ki = o0 + r;
            const float lse_i = t_lse[j], delta_i = t_delta[j];
            const bool ok = r < n_own && j < nt;
#endif
            float P = 0.0, dS = 0.0;
            if (ok && lse_i != NEG_INF && (pass == 0 || mask_mod(b, h, qi, ki)))
                pair_grads(b, h, qi, ki, Ss[r * SST + j], DPs[r * PST + j], lse_i, delta_i, P, dS);
            dSh[r * HST + j] = TO_HALF(dS);
#if BWD_PASS == 2
            Ph[r * HST + j] = TO_HALF(P);
#endif
        }
        subgroup_sync();
        // The gradients: pass 1 dQ += dS K; pass 2 dK += dSᵀ Q, dV += Pᵀ dO (the staged
        // side's X and Y, read row-major as B operands).
#if VKF_MM_EMULATE
        for (int i = 0; i < MM * D / SG; ++i) {
            const int e = lane + i * SG, r = r0 + e / D, d = e - (e / D) * D;
            float s = 0.0;
            for (int j = 0; j < T; ++j) s += HALF_FLOAT(dSh[r * HST + j]) * HALF_AT(Xs4, j * XS4 * 8 + d);
            Gx[r * D + d] += s;
        }
#if BWD_PASS == 2
        for (int i = 0; i < MM * DV / SG; ++i) {
            const int e = lane + i * SG, r = r0 + e / DV, d = e - (e / DV) * DV;
            float s = 0.0;
            for (int j = 0; j < T; ++j) s += HALF_FLOAT(Ph[r * HST + j]) * HALF_AT(Ys4, j * YS4 * 8 + d);
            Gy[r * DV + d] += s;
        }
#endif
#else
        {
            FRAG_A af[T / MK];
            MM_UNROLL for (int kk = 0; kk < T / MK; ++kk) coopMatLoadNV(af[kk], dSh, uint(r0 * HST + kk * MK), uint(HST), false);
            MM_UNROLL for (int nn = 0; nn < D / MN; ++nn)
                MM_UNROLL for (int kk = 0; kk < T / MK; ++kk) {
                    FRAG_B xb;
                    coopMatLoadNV(xb, Xs4, uint(kk * MK * XS4 + nn * MN / 8), uint(XS4), false);
                    gX[nn] = coopMatMulAddNV(af[kk], xb, gX[nn]);
                }
#if BWD_PASS == 2
            MM_UNROLL for (int kk = 0; kk < T / MK; ++kk) coopMatLoadNV(af[kk], Ph, uint(r0 * HST + kk * MK), uint(HST), false);
            MM_UNROLL for (int nn = 0; nn < DV / MN; ++nn)
                MM_UNROLL for (int kk = 0; kk < T / MK; ++kk) {
                    FRAG_B yb;
                    coopMatLoadNV(yb, Ys4, uint(kk * MK * YS4 + nn * MN / 8), uint(YS4), false);
                    gY[nn] = coopMatMulAddNV(af[kk], yb, gY[nn]);
                }
#endif
        }
#endif
        walk_next(T, b, w_own, w_h0, w_h1, w_lo, w_hi, c_h, c_pass, c_blk, c_n, c_m, c_t0, c_stop);
    }
    // A walk that a driver's loop cap stopped early (lavapipe) is reported, as in the forward.
    if (c_pass < 2 && lid == 0) vkf_report(4, 0, 0, 0);

    // Out: each lane its elements e = lane + i SG of its subgroup's rows (through shared memory
    // from the accumulators).
    const float nan = uintBitsToFloat(0x7FC00000u);
#if !VKF_MM_EMULATE
    subgroup_sync();
    MM_UNROLL for (int nn = 0; nn < D / MN; ++nn) coopMatStoreNV(gX[nn], Ss, uint(r0 * SST + nn * MN), uint(SST), false);
    subgroup_sync();
#endif
#if BWD_PASS == 1
    for (int i = 0; i < MM * D / SG; ++i) {
        const int e = lane + i * SG, r = r0 + e / D, d = e - (e / D) * D;
#if VKF_MM_EMULATE
        float g = Gx[r * D + d];
#else
        float g = Ss[r * SST + d];
#endif
        g = sized ? g * p.scale : nan;
        if (r < n_own) {
            const int row = row_id(b, h, q0 + r);
            if (p.dq_splits > 1) part_dq[(split * p.B * p.Hq * p.Lq + row) * D + d] = g;
            else dq_data[row * D + d] = OUT_VALUE(g);
        }
    }
#else
    const int rows_k = p.B * p.Hkv * p.Lkv;
    for (int i = 0; i < MM * D / SG; ++i) {
        const int e = lane + i * SG, r = r0 + e / D, d = e - (e / D) * D;
#if VKF_MM_EMULATE
        float g = Gx[r * D + d];
#else
        float g = Ss[r * SST + d];
#endif
        g = sized ? g * p.scale : nan;
        if (o0 + r < k_end) {
            const int rowk = (b * p.Hkv + hk) * p.Lkv + o0 + r;   // dK and dV: contiguous [B, Hkv, Lkv, D]
            if (p.dk_splits > 1) part_dk[(split * rows_k + rowk) * D + d] = g;
            else dk_data[rowk * D + d] = OUT_VALUE(g);
        }
    }
#if !VKF_MM_EMULATE
    subgroup_sync();
    MM_UNROLL for (int nn = 0; nn < DV / MN; ++nn) coopMatStoreNV(gY[nn], Ss, uint(r0 * SST + nn * MN), uint(SST), false);
    subgroup_sync();
#endif
    for (int i = 0; i < MM * DV / SG; ++i) {
        const int e = lane + i * SG, r = r0 + e / DV, d = e - (e / DV) * DV;
#if VKF_MM_EMULATE
        float g = Gy[r * DV + d];
#else
        float g = Ss[r * SST + d];
#endif
        g = sized ? g : nan;
        if (o0 + r < k_end) {
            const int rowk = (b * p.Hkv + hk) * p.Lkv + o0 + r;
            if (p.dk_splits > 1) part_dv[(split * rows_k + rowk) * DV + d] = g;
            else dv_data[rowk * DV + d] = OUT_VALUE(g);
        }
    }
#endif
}
