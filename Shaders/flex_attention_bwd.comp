#version 450
// Block-sparse flash attention, backward, portable path (scalar math, any subgroup size), in
// passes chosen by BWD_PASS, with P recomputed from the saved LSE (PyTorch's semantics):
//   0  delta_i = rowsum(dO_i * O_i) - dLSE_i                       16 invocations per query row
//   1  dQ_i = scale * sum_j dS_ij K_j                              a workgroup per tile of BQ rows
//   2  dK_j = scale * sum_i dS_ij Q_i,  dV_j = sum_i P_ij dO_i      a workgroup per tile of BKV keys
//      (and key/value head: it sums over the query heads of its group, each walking its own blocks)
//   3  dsink_h = -sum_{b,i} exp(sink_h - LSE_bhi) delta_bhi   one workgroup per head (with sinks)
//   4  the sum of the partial gradients of key, query or workgroup splits (where needed)
//   5  the gradients of captured tensors: dS'_ij = P_ij (dP_ij - delta_i), the gradient of the
//      score-mod's output, times d score_mod / d load, added to the element each load read:
//      with float atomics (VKF_CAP_ATOMIC), else into a private slice per workgroup that pass
//      4 sums (deterministic). Workgroups walk tiles of query rows as pass 1 does, cg_units tiles each.
// where P_ij = exp(s'_ij - LSE_i) (0 where masked or the row has no key), s' = score_mod(scale q.k),
// dP_ij = dO_i . V_j and dS_ij = P_ij (dP_ij - delta_i) * d score_mod / d score. Passes 1 and 5
// walk the forward block lists (full then partial), pass 2 their transposes (flex_walk.glsl); the
// mask applies on partial blocks only. Passes 1 and 2 stage their tiles in shared memory (see
// below). dQ, dK and dV are deterministic: no atomics.
//
// Defines: BWD_PASS, D, DV, WG, DL (pass 0), BQ and BKV (passes 1, 2), IN_F16 / IN_BF16 and
// OUT_F16 / OUT_BF16 (the gradients take the inputs' dtype), VKF_CAP_ATOMIC (pass 5),
// VKF_UNROLL_ACC (below).
// Bindings and parameters: flex_bwd_params.glsl (BackwardBinding, BackwardField).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#ifndef VKF_UNROLL_ACC
#define VKF_UNROLL_ACC 0
#endif
#if BWD_PASS == 5
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_KHR_shader_subgroup_vote : require
#if VKF_CAP_ATOMIC
#extension GL_EXT_shader_atomic_float : require
#endif
#endif

layout(local_size_x = WG) in;

#include "flex_bwd_common.glsl"

#if BWD_PASS == 1 || BWD_PASS == 2 || BWD_PASS == 5
// Passes 1, 2 and 5, tiled: a workgroup stages BQ query rows (q, dO, LSE, delta) and BKV keys (k, v)
// in shared memory and computes the BQ x BKV pairs' P and dS there, so each row and key is read
// from memory once per tile instead of once per pair. A tile of rows lies in one query block of
// the BlockMask and a tile of keys in one KV block, so a pair's class (full, partial) is the
// tile's. Pass 1: a workgroup per query tile (and key split), dQ for its rows over the walked key
// blocks; pass 2: a workgroup per key tile (and query split), dK and dV for its keys over the
// transposed walk of every query head of its group.
#define SST (BKV | 1)
shared float Qs[BQ * D], DOs[BQ * DV], Ks[BKV * D], Vs[BKV * DV];
shared float dSs[BQ * SST], Ps[BQ * SST];
shared float t_lse[BQ], t_delta[BQ];

// Stages query rows q0.. (n of them; zeros after) of (b, h): q, dO, LSE and delta.

void stage_rows(int b, int h, int q0, int n) {
    const int lid = int(gl_LocalInvocationIndex);
    for (int e = lid; e < BQ * D; e += WG) { const int r = e / D, d = e - r * D; Qs[e] = r < n ? IN_FLOAT(q_data[q_at(b, h, q0 + r) + d * p.q_sd]) : 0.0; }
    for (int e = lid; e < BQ * DV; e += WG) { const int r = e / DV, d = e - r * DV; DOs[e] = r < n ? IN_FLOAT(do_data[do_at(b, h, q0 + r) + d * p.do_sd]) : 0.0; }
    if (lid < BQ) {
        t_lse[lid] = lid < n ? lse_data[lse_at(b, h, q0 + lid)] : NEG_INF;
        t_delta[lid] = lid < n ? delta_data[row_id(b, h, q0 + lid)] : 0.0;
    }
}

// Stages keys k0.. (n of them; zeros after) of (b, hk): k and v.
void stage_keys(int b, int hk, int k0, int n) {
    const int lid = int(gl_LocalInvocationIndex);
    for (int e = lid; e < BKV * D; e += WG) { const int j = e / D, d = e - j * D; Ks[e] = j < n ? IN_FLOAT(k_data[k_at(b, hk, k0 + j) + d * p.k_sd]) : 0.0; }
    for (int e = lid; e < BKV * DV; e += WG) { const int j = e / DV, d = e - j * DV; Vs[e] = j < n ? IN_FLOAT(v_data[v_at(b, hk, k0 + j) + d * p.v_sd]) : 0.0; }
}

#endif

#if BWD_PASS == 4
// The splits' partial gradients summed into dq (sum_target 0), dk (1) or dv (2).
void main() {
    const int e = int(gl_GlobalInvocationID.x) + int(gl_GlobalInvocationID.y) * int(gl_NumWorkGroups.x * gl_WorkGroupSize.x);
    if (e >= p.sum_n) return;
    float s = 0.0;
    for (int t = 0; t < p.sum_splits; ++t)
        s += p.sum_target == 0 ? part_dq[t * p.sum_n + e] : p.sum_target == 1 ? part_dk[t * p.sum_n + e]
           : p.sum_target == 2 ? part_dv[t * p.sum_n + e] : part_caps[t * p.sum_n + e];
    if (p.sum_target == 0) dq_data[e] = OUT_VALUE(s); else if (p.sum_target == 1) dk_data[e] = OUT_VALUE(s);
    else if (p.sum_target == 2) dv_data[e] = OUT_VALUE(s); else dcaps[e] = s;
}
#elif BWD_PASS == 5
#if VKF_CAP_GRAD_TERMS > 0
#define VKF_CG_TERMS VKF_CAP_GRAD_TERMS
#else
#define VKF_CG_TERMS 1
#endif
int cg_idx[VKF_CG_TERMS];
float cg_val[VKF_CG_TERMS];
void vkf_cg_add(int m, int e, float value) { cg_idx[m] = e; cg_val[m] = value; }
#if !VKF_CAP_ATOMIC
shared int st_idx[VKF_CG_TERMS * WG];
shared float st_val[VKF_CG_TERMS * WG];
#endif
void main() {
    const int lid = int(gl_LocalInvocationIndex);
    const int wg = int(gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x);
    const int q_tiles = p.q_blocks * ((p.q_bs + BQ - 1) / BQ);
    const int units = p.B * p.Hq * q_tiles * p.cg_splits;
    bool walked = true;
    // Unit u: a tile of BQ query rows of (b, h) and its key split, as in pass 1; workgroup wg walks
    // units [wg * cg_units, +cg_units).
    for (int u = wg * p.cg_units; u < min(units, (wg + 1) * p.cg_units); ++u) {
        const int split = u % p.cg_splits, r = u / p.cg_splits;
        const int tile = r % q_tiles, h = (r / q_tiles) % p.Hq, b = r / (q_tiles * p.Hq);
        int qb, q0;
        const int nq = query_tile(tile, qb, q0);
        if (nq <= 0) continue;   // uniform: the workgroup skips a tile past its block's rows
        const int kb_lo = split * p.cg_split_blocks, kb_hi = p.cg_splits > 1 ? kb_lo + p.cg_split_blocks : 2147483647;
        const int hk = h / (p.Hq / p.Hkv);
        barrier();   // the previous unit's rows are read
        stage_rows(b, h, q0, nq);
        const int mrow = walk_row(b, h, qb);
        int pass = 0;
        for (; pass < 2; ++pass) {
            const int n = walk_count(pass, mrow);
            int blk = 0;
            for (; blk < n; ++blk) {
                const int kb = walk_block(pass, mrow, blk);
                if (kb < kb_lo || kb >= kb_hi) continue;   // another split's keys
                const int k_stop = min(kb * p.kv_bs + p.kv_bs, kv_len(b));
                int k0 = kb * p.kv_bs;
                for (; k0 < k_stop; k0 += BKV) {
                    const int nk = min(BKV, k_stop - k0);
                    barrier();   // the previous tile's keys are read
                    stage_keys(b, hk, k0, nk);
                    barrier();
                    // The tile's pairs, every invocation present at each step (the adds below need the whole workgroup).
                    for (int it = 0; it < (BQ * BKV + WG - 1) / WG; ++it) {
                        const int e = lid + it * WG, rr = e / BKV, j = e - rr * BKV;
                        for (int m = 0; m < VKF_CG_TERMS; ++m) cg_idx[m] = -1;
                        if (e < BQ * BKV && rr < nq && j < nk && t_lse[rr] != NEG_INF && (pass == 0 || mask_mod(b, h, q0 + rr, k0 + j))) {
                            float qk = 0.0, dov = 0.0;
                            for (int d = 0; d < D; ++d) qk += Qs[rr * D + d] * Ks[j * D + d];
                            for (int d = 0; d < DV; ++d) dov += DOs[rr * DV + d] * Vs[j * DV + d];
                            const float sc = qk * p.scale;
                            const float P = exp(score_mod(sc, b, h, q0 + rr, k0 + j) - t_lse[rr]);
                            score_mod_cap_grads(sc, b, h, q0 + rr, k0 + j, P * (dov - t_delta[rr]));
                        }
#if VKF_CAP_ATOMIC
                        // One atomic per subgroup where its invocations add to one element (a bias by head).
                        for (int m = 0; m < VKF_CG_TERMS; ++m) {
                            const int ce = cg_idx[m];
                            if (subgroupAllEqual(ce)) {
                                const float sum = subgroupAdd(cg_val[m]);
                                if (subgroupElect() && ce >= 0) atomicAdd(dcaps[ce], sum);
                            } else if (ce >= 0) {
                                atomicAdd(dcaps[ce], cg_val[m]);
                            }
                        }
#else
                        // Without atomics: staged in shared memory, then invocation t adds the elements
                        // ce with ce % WG == t to the workgroup's own slice, in a fixed order.
                        for (int m = 0; m < VKF_CG_TERMS; ++m) { st_idx[m * WG + lid] = cg_idx[m]; st_val[m * WG + lid] = cg_val[m]; }
                        barrier();
                        for (int t = 0; t < VKF_CG_TERMS * WG; ++t) {
                            const int ce = st_idx[t];
                            if (ce >= 0 && ce % WG == lid) part_caps[wg * p.cg_total + ce] += st_val[t];
                        }
                        barrier();
#endif
                    }
                }
                if (k0 < k_stop) walked = false;
            }
            if (blk < n) walked = false;
        }
        if (pass < 2) walked = false;
    }
    if (!walked) vkf_report(4, 0, 0, 0);
}
#elif BWD_PASS == 3
// dsink_h = -sum over rows of exp(sink_h - LSE) * delta (the sink's P times dP - delta, dP = 0:
// it has no value row). Rows with no key at all have LSE = sink and count too.
shared float part[WG];
void main() {
    const int lid = int(gl_LocalInvocationIndex), h = int(gl_WorkGroupID.x);
    const float sink = sinks[h];
    float acc = 0.0;
    for (int r = lid; r < p.B * p.Lq; r += WG) {
        const int b = r / p.Lq, i = r - b * p.Lq;
        const float lse = lse_data[lse_at(b, h, i)];
        if (lse != NEG_INF) acc -= exp(sink - lse) * delta_data[row_id(b, h, i)];
    }
    part[lid] = acc;
    barrier();
    if (lid == 0) {
        float s = 0.0;
        for (int t = 0; t < WG; ++t) s += part[t];
        dsinks[h] = s;
    }
}
#elif BWD_PASS == 0
// DL invocations a row (the host's BackwardKernel.deltaLanes), each summing every DL-th element
// (a subgroup's loads read a row's consecutive elements: one row an invocation read 2 bytes per
// row per load, about 0.5 TB/s on an H100), then the row's DL partial sums added in a fixed order
// (deterministic). Workgroups stride over the rows, so any row count fits the dispatch limit.
#define RPG (WG / DL)
shared float d_part[WG];
void main() {
    const int lid = int(gl_LocalInvocationIndex), t = lid % DL, rl = lid / DL;
    const int rows = p.B * p.Hq * p.Lq;
    for (int r0 = int(gl_WorkGroupID.x) * RPG; r0 < rows; r0 += int(gl_NumWorkGroups.x) * RPG) {
        const int r = r0 + rl, i = r % p.Lq, h = (r / p.Lq) % p.Hq, b = r / (p.Lq * p.Hq);
        float acc = 0.0;
        if (r < rows) {
            const int od = o_at(b, h, i), dd = do_at(b, h, i);
            for (int d = t; d < DV; d += DL) acc += IN_FLOAT(do_data[dd + d * p.do_sd]) * IN_FLOAT(o_data[od + d * p.o_sd]);
        }
        d_part[lid] = acc;
        barrier();
        if (t == 0 && r < rows) {
            float sum = 0.0;
            [[unroll]] for (int k = 0; k < DL; ++k) sum += d_part[lid + k];
            if (p.has_dlse != 0) sum -= dlse_data[p.dlse_base + b * p.dlse_sb + h * p.dlse_sh + i * p.dlse_sl];
            delta_data[r] = sum;
        }
        barrier();
    }
}
#else
// P and dS of every pair of the staged tiles (rows < nq, keys < nk; 0 elsewhere and where masked
// or the row has no key), into Ps and dSs.
void tile_pairs(int b, int h, int q0, int nq, int k0, int nk, bool partial) {
    for (int e = int(gl_LocalInvocationIndex); e < BQ * BKV; e += WG) {
        const int r = e / BKV, j = e - r * BKV;
        float P = 0.0, dS = 0.0;
        if (r < nq && j < nk && t_lse[r] != NEG_INF && (!partial || mask_mod(b, h, q0 + r, k0 + j))) {
            float qk = 0.0, dov = 0.0;
            for (int d = 0; d < D; ++d) qk += Qs[r * D + d] * Ks[j * D + d];
            for (int d = 0; d < DV; ++d) dov += DOs[r * DV + d] * Vs[j * DV + d];
            pair_grads(b, h, q0 + r, k0 + j, qk, dov, t_lse[r], t_delta[r], P, dS);
        }
        Ps[r * SST + j] = P;
        dSs[r * SST + j] = dS;
    }
}

#define ACC_Q ((BQ * D + WG - 1) / WG)
#define ACC_K ((BKV * D + WG - 1) / WG)
#define ACC_V ((BKV * DV + WG - 1) / WG)
// VKF_UNROLL_ACC (the host sets it on GPUs): the loops over an invocation's accumulators unroll,
// so that their indices are constants and the accumulators stay in registers (NVIDIA kept them in
// local memory otherwise); on a CPU device the loops stay, which compiles faster.
#if VKF_UNROLL_ACC
#define ACC_UNROLL [[unroll]]
#else
#define ACC_UNROLL
#endif

#if BWD_PASS == 1
void main() {
    const int lid = int(gl_LocalInvocationIndex);
    // x = query tile, y = head, z = batch * splits + split.
    const int h = int(gl_WorkGroupID.y), b = int(gl_WorkGroupID.z) / p.dq_splits, split = int(gl_WorkGroupID.z) % p.dq_splits;
    int qb, q0;
    const int nq = query_tile(int(gl_WorkGroupID.x), qb, q0);
    if (nq <= 0) return;
    const int kb_lo = split * p.dq_split_blocks, kb_hi = p.dq_splits > 1 ? kb_lo + p.dq_split_blocks : 2147483647;
    const int hk = h / (p.Hq / p.Hkv);
    stage_rows(b, h, q0, nq);
    float acc[ACC_Q];
    ACC_UNROLL for (int a = 0; a < ACC_Q; ++a) acc[a] = 0.0;
    barrier();
    bool walked = true;
    const int mrow = walk_row(b, h, qb);
    int pass = 0;
    for (; pass < 2; ++pass) {
        const int n = walk_count(pass, mrow);
        int blk = 0;
        for (; blk < n; ++blk) {
            const int kb = walk_block(pass, mrow, blk);
            if (kb < kb_lo || kb >= kb_hi) continue;   // another split's keys
            const int k_stop = min(kb * p.kv_bs + p.kv_bs, kv_len(b));
            int k0 = kb * p.kv_bs;
            for (; k0 < k_stop; k0 += BKV) {
                const int nk = min(BKV, k_stop - k0);
                stage_keys(b, hk, k0, nk);
                barrier();
                tile_pairs(b, h, q0, nq, k0, nk, pass == 1);
                barrier();
                ACC_UNROLL for (int a = 0; a < ACC_Q; ++a) {
                    const int e = lid + a * WG;
                    if (e < BQ * D) {
                        const int r = e / D, d = e - r * D;
                        float s = acc[a];
                        for (int j = 0; j < nk; ++j) s += dSs[r * SST + j] * Ks[j * D + d];
                        acc[a] = s;
                    }
                }
                barrier();
            }
            if (k0 < k_stop) walked = false;
        }
        if (blk < n) walked = false;
    }
    if (pass < 2) walked = false;
    if (!walked) vkf_report(4, 0, 0, 0);
    ACC_UNROLL for (int a = 0; a < ACC_Q; ++a) {
        const int e = lid + a * WG;
        if (e < BQ * D) {
            const int r = e / D, d = e - r * D;
            if (r < nq) {
                const int row = row_id(b, h, q0 + r);
                if (p.dq_splits > 1) part_dq[(split * p.B * p.Hq * p.Lq + row) * D + d] = acc[a] * p.scale;
                else dq_data[row * D + d] = OUT_VALUE(acc[a] * p.scale);
            }
        }
    }
}
#else
void main() {
    const int lid = int(gl_LocalInvocationIndex);
    // x = key tile (tiles_k per KV block), y = KV head, z = batch * splits + split.
    const int tiles_k = (p.kv_bs + BKV - 1) / BKV;
    const int kb = int(gl_WorkGroupID.x) / tiles_k, hk = int(gl_WorkGroupID.y), b = int(gl_WorkGroupID.z) / p.dk_splits;
    const int split = int(gl_WorkGroupID.z) % p.dk_splits;
    const int k0 = kb * p.kv_bs + (int(gl_WorkGroupID.x) - kb * tiles_k) * BKV;
    const int k_end = min(min(k0 + BKV, (kb + 1) * p.kv_bs), p.Lkv);
    if (k_end <= k0) return;
    const int nk = max(0, min(k_end, kv_len(b)) - k0);   // keys past the batch's length get zero gradients
    const int qb_lo = split * p.dk_split_blocks, qb_hi = p.dk_splits > 1 ? qb_lo + p.dk_split_blocks : 2147483647;
    const int group = p.Hq / p.Hkv;
    stage_keys(b, hk, k0, nk);
    float dk[ACC_K], dv[ACC_V];
    ACC_UNROLL for (int a = 0; a < ACC_K; ++a) dk[a] = 0.0;
    ACC_UNROLL for (int a = 0; a < ACC_V; ++a) dv[a] = 0.0;
    bool walked = true;
    for (int h = hk * group; nk > 0 && h < (hk + 1) * group; ++h) {
        const int mcol = walk_col(b, h, kb);
        int pass = 0;
        for (; pass < 2; ++pass) {
            const int n = walk_count_t(pass, mcol);
            int blk = 0;
            for (; blk < n; ++blk) {
                const int qb = walk_query_block(pass, mcol, blk);
                // Splits share out (head of the group, query block) units: a GQA group's heads multiply the work per block.
                const int unit = (h - hk * (p.Hq / p.Hkv)) * p.q_blocks + qb;
                if (unit < qb_lo || unit >= qb_hi) continue;   // another split's rows
                const int q_stop = min(qb * p.q_bs + p.q_bs, p.Lq);
                int q0 = qb * p.q_bs;
                for (; q0 < q_stop; q0 += BQ) {
                    const int nq = min(BQ, q_stop - q0);
                    barrier();   // the previous tile's rows are read
                    stage_rows(b, h, q0, nq);
                    barrier();
                    tile_pairs(b, h, q0, nq, k0, nk, pass == 1);
                    barrier();
                    ACC_UNROLL for (int a = 0; a < ACC_K; ++a) {
                        const int e = lid + a * WG;
                        if (e < BKV * D) {
                            const int j = e / D, d = e - j * D;
                            float s = dk[a];
                            for (int r = 0; r < nq; ++r) s += dSs[r * SST + j] * Qs[r * D + d];
                            dk[a] = s;
                        }
                    }
                    ACC_UNROLL for (int a = 0; a < ACC_V; ++a) {
                        const int e = lid + a * WG;
                        if (e < BKV * DV) {
                            const int j = e / DV, d = e - j * DV;
                            float s = dv[a];
                            for (int r = 0; r < nq; ++r) s += Ps[r * SST + j] * DOs[r * DV + d];
                            dv[a] = s;
                        }
                    }
                }
                if (q0 < q_stop) walked = false;
            }
            if (blk < n) walked = false;
        }
        if (pass < 2) walked = false;
    }
    if (!walked) vkf_report(4, 0, 0, 0);
    const int rows_k = p.B * p.Hkv * p.Lkv;
    ACC_UNROLL for (int a = 0; a < ACC_K; ++a) {
        const int e = lid + a * WG;
        if (e < BKV * D) {
            const int j = e / D, d = e - j * D;
            if (k0 + j < k_end) {
                const int rowk = (b * p.Hkv + hk) * p.Lkv + k0 + j;   // dK and dV: contiguous [B, Hkv, Lkv, D]
                if (p.dk_splits > 1) part_dk[(split * rows_k + rowk) * D + d] = dk[a] * p.scale;
                else dk_data[rowk * D + d] = OUT_VALUE(dk[a] * p.scale);
            }
        }
    }
    ACC_UNROLL for (int a = 0; a < ACC_V; ++a) {
        const int e = lid + a * WG;
        if (e < BKV * DV) {
            const int j = e / DV, d = e - j * DV;
            if (k0 + j < k_end) {
                const int rowk = (b * p.Hkv + hk) * p.Lkv + k0 + j;
                if (p.dk_splits > 1) part_dv[(split * rows_k + rowk) * DV + d] = dv[a];
                else dv_data[rowk * DV + d] = OUT_VALUE(dv[a]);
            }
        }
    }
}
#endif
#endif
