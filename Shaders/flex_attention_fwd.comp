#version 450
// Block-sparse flash attention, forward, portable path (scalar math, any subgroup size).
//
// One workgroup per (query tile, head, batch). A query tile is BQ rows inside one BlockMask query
// block. The workgroup walks the block's full kv blocks (no mask) and then its partial ones
// (mask_mod applied), BKV keys at a time: scores into shared memory, in PyTorch's order
// s = scale * q.k; s = score_mod(s); on partial blocks s = -inf where mask_mod is false; then an
// online softmax in base 2 with fp32 statistics (running max starts at -1e30, finite), and
// O += P V. A row with every score masked gives O = 0 and LSE = -inf. Only -inf masks: a NaN
// score (from the inputs or a score-mod) makes its row's sum NaN, so the guards below test the
// sum against 0 exactly (l > 0 would take a NaN row for an empty one).
//
// Defines (ShaderSource.defines): D, DV (head dims), BQ, BKV (tile sizes), WG (workgroup size),
// IN_F16 / IN_BF16, OUT_F16 / OUT_BF16 (0/1: flex_dtype.glsl), VKF_MAX_SCORES (0/1: write each row's maximum score). Splice point:
// flex_mods.glsl (error buffer and captures at the bindings AttentionParams.swift declares).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require

layout(local_size_x = WG) in;

#include "flex_dtype.glsl"
#include "flex_attention_common.glsl"

// K and V seen UNIT elements at a time (16 bytes), for rows that are contiguous and start at a
// multiple of 8 elements (p.vec_ok): one load per UNIT elements instead of one per element.
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBufU { UNIT_T k_units[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBufU { UNIT_T v_units[]; };

// Row stride of the K/V tile in shared memory (scalar layout): odd, so that threads reading
// different keys at the same dimension hit different banks.
#define KVD ((D > DV ? D : DV) | 1)
#define ACC ((BQ * DV + WG - 1) / WG)
// Row stride of the score tile: odd, so that rows read at the same key hit different banks.
#define SST (BKV | 1)
// Invocations per query row in the softmax (all of them when WG is a multiple of BQ): each
// exponentiates every TPR-th key of its row and keeps its own share of the row sum, added up once
// at the end, so no invocation sits idle while a few walk whole rows.
#if WG % BQ == 0
#define TPR (WG / BQ)
#else
#define TPR 1
#endif

// VKF_BLOCKED: register tiles of 4 rows. Q·Kᵀ: each invocation scores QK_CT keys against 4
// consecutive rows, read as one vec4 from Q stored dimension-major (one shared-memory read feeds 4
// or 8 products instead of one); P·V: the output is cut into PV_T tasks of 4 rows × 4 value dims,
// PV_NT per invocation, each fed per key by one vec4 of P (stored key-major) and one of V. Where
// the tile shapes do not divide (rows or value dims not multiples of 4, small workgroups) the
// scalar layout below is used.
#define QK_CT ((BQ * BKV) / (4 * WG))
#define VKF_BLOCKED 0
#if (BQ % 4 == 0) && (QK_CT > 0) && (DV % 4 == 0)
#if ((BQ * BKV) % (4 * WG) == 0) && (BKV % QK_CT == 0)
#undef VKF_BLOCKED
#define VKF_BLOCKED 1
#endif
#endif
#define PV_T ((BQ / 4) * (DV / 4))
#define PV_NT ((PV_T + WG - 1) / WG)
// Task t covers rows 4 (t / (DV / 4)).. and dims 4 (t % (DV / 4)).. Where DV / 4 divides WG, an
// invocation's tasks share their dims (one V read per key serves them all), and where WG divides
// PV_T every invocation has PV_NT tasks.
#if (4 * WG) % DV == 0
#define PV_SAME_DIMS 1
#else
#define PV_SAME_DIMS 0
#endif
// Where WG does not divide PV_T, the invocations past the last task repeat it (PV_TASK is clamped)
// and only the output store checks PV_HAS: no branch around the accumulators in the key loop
// (H200, against branches there: D=96 12.6 against 10.0 TFLOP/s, causal D=80 11.1 against 8.8,
// D=32 11.0 against 12.2).
#if PV_T % WG == 0
#define PV_TASK(n) (lid + (n) * WG)
#define PV_HAS(n) true
#else
#define PV_TASK(n) min(lid + (n) * WG, PV_T - 1)
#define PV_HAS(n) (lid + (n) * WG < PV_T)
#endif

// VKF_HALF (float16 inputs, register-tiled, D even): Q, K and V kept in shared memory as the fp16
// they are, packed two to a word (no precision lost): half the room, so more workgroups fit an SM.
#define VKF_HALF 0
#if VKF_BLOCKED && IN_F16 && (D % 2 == 0)
#undef VKF_HALF
#define VKF_HALF 1
#endif

#if VKF_BLOCKED
// Scores: (r, j) at j * SQ + r. K rows are stored dimension-major with an odd stride KST, so that
// the stores of a row hit distinct banks.
#define KST (BKV + 1)
#define SQ (BQ + 4)
shared vec4 S4[BKV * SQ / 4];
#define S_AT(r, j) S4[((j) * SQ + (r)) >> 2][(r) & 3]
// Each row's tile maximum in NKQ parts, one per invocation that scores the row (written in
// Q·Kᵀ), so the softmax reads NKQ values instead of BKV scores and needs no barrier between
// reading the scores and overwriting them with P.
#define NKQ (BKV / QK_CT)
shared float pmax[BQ * (NKQ + 1)];
#if VKF_HALF
// Q: rows 4 rq..4 rq + 3 of dim d at d * BQ / 4 + rq (two packed pairs). K: dims 2 dp, 2 dp + 1 of
// key j in word dp * KST + j. V: dims 4 q..4 q + 3 of key j at j * DV / 4 + q.
#define KVW ((D / 2) * KST > BKV * DV / 2 ? (D / 2) * KST : BKV * DV / 2)
shared uvec2 Qh[D * BQ / 4];
shared uvec2 KVh[(KVW + 1) / 2];
#define K_WORD_SET(i, w) { const int i_ = (i); KVh[i_ >> 1][i_ & 1] = (w); }
#define K_PAIR(j, dp) unpackHalf2x16(KVh[((dp) * KST + (j)) >> 1][((dp) * KST + (j)) & 1])
vec4 unpack4(uvec2 w) { return vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y)); }
#else
// Q: element (r, d) at d * BQ + r. K: (j, d) at d * KST + j. V: (j, d) at j * DV + d.
#define KVN ((D * KST > BKV * DV ? D * KST : BKV * DV) + 3) / 4
shared vec4 Qs4[D * BQ / 4];
shared vec4 KV4[KVN];
#define Q_SET(r, d, x) Qs4[((d) * BQ + (r)) >> 2][(r) & 3] = (x)
#define K_SET(j, d, x) { const int i_ = (d) * KST + (j); KV4[i_ >> 2][i_ & 3] = (x); }
#define K_AT(j, d) KV4[((d) * KST + (j)) >> 2][((d) * KST + (j)) & 3]
#define V_SET(j, d, x) { const int i_ = (j) * DV + (d); KV4[i_ >> 2][i_ & 3] = (x); }
#endif
#else
shared float Qs[BQ * D];
shared float KVs[BKV * KVD];
shared float Ss[BQ * SST];
#define Q_SET(r, d, x) Qs[(r) * D + (d)] = (x)
#define K_SET(j, d, x) KVs[(j) * KVD + (d)] = (x)
#define V_SET(j, d, x) KVs[(j) * KVD + (d)] = (x)
#define S_AT(r, j) Ss[(r) * SST + (j)]
#endif
shared float row_m[BQ], row_l[BQ], row_alpha[BQ];

#if !VKF_HALF
// Stages the rows k0.. of K or V (WIDTH elements each; the kn valid ones, zeros after) from UNITS
// (where p.vec_ok: whole units — WIDTH is then a multiple of 8, the host checks) or DATA, at
// element offset OFF with row stride SL and element stride SD, through SET(j, d, x).
#define STAGE_ROWS(SET, UNITS, DATA, OFF, SL, SD, WIDTH) \
    if (p.vec_ok != 0) { \
        for (int e = lid; e < BKV * ((WIDTH) / UNIT); e += WG) { \
            const int j = e / ((WIDTH) / UNIT), u = e - j * ((WIDTH) / UNIT); \
            float f[UNIT]; \
            if (j < kn) unit_floats(UNITS[((OFF) + kv_row(b, k0 + j) * (SL)) / UNIT + u], f); \
            else for (int i = 0; i < UNIT; ++i) f[i] = 0.0; \
            for (int i = 0; i < UNIT; ++i) SET(j, u * UNIT + i, f[i]); \
        } \
    } else { \
        for (int e = lid; e < BKV * (WIDTH); e += WG) { \
            const int j = e / (WIDTH), d = e - j * (WIDTH); \
            SET(j, d, j < kn ? IN_FLOAT(DATA[(OFF) + kv_row(b, k0 + j) * (SL) + d * (SD)]) : 0.0); \
        } \
    }
#endif
#if TPR > 1
shared float l_parts[WG];
#endif


void main() {
    const int lid = int(gl_LocalInvocationIndex);
    WorkgroupTile wt;
    if (!workgroup_tile(BQ, wt)) return;
    const int b = wt.b, bl = wt.bl, h = wt.h, hl = wt.hl, hk = wt.hk, qb = wt.qb, q0 = wt.q0, rows = wt.rows;
    const int p0 = wt.p0;   // the first row's position: what the mods see as q_idx (q0 + its query offset)

    const int qoff = p.q_base + bl * p.q_sb + hl * p.q_sh;
#if VKF_HALF
    for (int e = lid; e < (BQ / 4) * D; e += WG) {
        const int g = e / D, d = e - g * D;
        float x[4];
        for (int i = 0; i < 4; ++i) {
            const int r = 4 * g + i;
            x[i] = r < rows ? IN_FLOAT(q_data[qoff + (q0 + r) * p.q_sl + d * p.q_sd]) : 0.0;
        }
        Qh[d * (BQ / 4) + g] = uvec2(packHalf2x16(vec2(x[0], x[1])), packHalf2x16(vec2(x[2], x[3])));
    }
#else
    for (int e = lid; e < BQ * D; e += WG) {
        int r = e / D, d = e - (e / D) * D;
        Q_SET(r, d, r < rows ? IN_FLOAT(q_data[qoff + (q0 + r) * p.q_sl + d * p.q_sd]) : 0.0);
    }
#endif
    if (lid < BQ) { row_m[lid] = -1e30; row_l[lid] = 0.0; row_alpha[lid] = 1.0; }
#if VKF_BLOCKED
    const int kq = lid % (BKV / QK_CT), rq = lid / (BKV / QK_CT);   // Q·Kᵀ: keys kq + c * (BKV / QK_CT), rows 4 rq..4 rq + 3
    // P·V: row i of task n in acc4[4 n + i]. Every loop over it must unroll ([[unroll]], no
    // `continue`) so that its indices are constants: one access the driver cannot resolve sends the
    // whole array to local memory (H200, D = 32, 80 and 96, where the output loop skipped missing
    // tasks with `continue`: 64-128 bytes of local memory and 3.9-4.1 TFLOP/s, against 11.0-12.6
    // without).
    vec4 acc4[4 * PV_NT];
    [[unroll]] for (int a = 0; a < 4 * PV_NT; ++a) acc4[a] = vec4(0.0);
#else
    float acc[ACC];
    for (int a = 0; a < ACC; ++a) acc[a] = 0.0;
#endif
    const int sr = lid / TPR, part = lid - (lid / TPR) * TPR;   // softmax row and share
    float l_part = 0.0;
    float m_run = -1e30;   // VKF_BLOCKED: row sr's running max
    barrier();

    const int mrow = walk_row(b, h, qb);
    const int n_full = walk_count(0, mrow), n_part = walk_count(1, mrow);
    const int lkv = KV_LEN(b);   // keys past it are never loaded nor given to a mod
    const int koff = p.k_base + bl * p.k_sb + (hk - p.hk_start) * p.k_sh;
    const int voff = p.v_base + bl * p.v_sb + (hk - p.hk_start) * p.v_sh;
#if VKF_BLOCKED && VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
    // The mask's per-row values of the rows this invocation scores (the same in every tile).
    vkf_mrow_t mrv[4];
    if (n_part > 0) {
        for (int i = 0; i < 4; ++i)
            if (4 * rq + i < rows) mrv[i] = vkf_mrow(b, h, p0 + 4 * rq + i);
    }
#elif (WG % BKV == 0) && ((BQ * BKV) % WG == 0) && VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
    // The mask's per-row values of the rows this invocation scores (the same in every tile).
    vkf_mrow_t mrv[BQ * BKV / WG];
    if (n_part > 0) {
        for (int a = 0; a < BQ * BKV / WG; ++a) {
            const int r = lid / BKV + a * (WG / BKV);
            if (r < rows) mrv[a] = vkf_mrow(b, h, p0 + r);
        }
    }
#endif

    // walked: every loop of the walk reached its bound. Mesa's lavapipe ends all of a shader's
    // loops once their iterations add up to 65535; the host splits long key ranges across
    // dispatches to stay below that, and this reports (never silently truncates) if it did not.
    bool walked = true;
    int pass = 0;
    for (; pass < 2; ++pass) {
        const int n = pass == 0 ? n_full : n_part;
        int i = 0;
        for (; i < n; ++i) {
            int kb = walk_block(pass, mrow, i);
            if (kb < KV_LO || kb >= KV_HI) continue;   // another split's keys
            int k_start = kb * p.kv_bs, k_stop = min(k_start + p.kv_bs, lkv);
            int k0 = k_start;
            for (; k0 < k_stop; k0 += BKV) {
                int kn = min(BKV, k_stop - k0);
#if VKF_HALF
                if (p.vec_ok != 0) {
                    // The unit's words are the packed pairs K stores.
                    for (int e = lid; e < BKV * (D / 8); e += WG) {
                        const int j = e / (D / 8), u = e - j * (D / 8);
                        const uvec4 w = j < kn ? k_units[(koff + kv_row(b, k0 + j) * p.k_sl) / 8 + u] : uvec4(0);
                        for (int i = 0; i < 4; ++i) K_WORD_SET((4 * u + i) * KST + j, w[i]);
                    }
                } else {
                    for (int e = lid; e < BKV * (D / 2); e += WG) {
                        const int j = e / (D / 2), dp = e - j * (D / 2);
                        vec2 x = vec2(0.0);
                        if (j < kn) {
                            const int at = koff + kv_row(b, k0 + j) * p.k_sl + 2 * dp * p.k_sd;
                            x = vec2(float(k_data[at]), float(k_data[at + p.k_sd]));
                        }
                        K_WORD_SET(dp * KST + j, packHalf2x16(x));
                    }
                }
#else
                STAGE_ROWS(K_SET, k_units, k_data, koff, p.k_sl, p.k_sd, D)
#endif
                barrier();
#if VKF_BLOCKED
                {
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
                    vkf_mcol_t mc[QK_CT];
                    if (pass == 1)
                        for (int c = 0; c < QK_CT; ++c)
                            if (kq + c * (BKV / QK_CT) < kn) mc[c] = vkf_mcol(b, h, k0 + kq + c * (BKV / QK_CT));
#endif
                    // Keys past kn were staged as zeros: their products are finite and masked below.
                    vec4 dots[QK_CT];
                    for (int c = 0; c < QK_CT; ++c) dots[c] = vec4(0.0);
#if VKF_HALF
                    for (int dp = 0; dp < D / 2; ++dp) {
                        const vec4 qa = unpack4(Qh[(2 * dp) * (BQ / 4) + rq]), qb = unpack4(Qh[(2 * dp + 1) * (BQ / 4) + rq]);
                        for (int c = 0; c < QK_CT; ++c) {
                            const vec2 kf = K_PAIR(kq + c * (BKV / QK_CT), dp);
                            dots[c] += qa * kf.x + qb * kf.y;
                        }
                    }
#else
                    for (int d = 0; d < D; ++d) {
                        const vec4 qv = Qs4[(d * BQ) / 4 + rq];
                        for (int c = 0; c < QK_CT; ++c) dots[c] += qv * K_AT(kq + c * (BKV / QK_CT), d);
                    }
#endif
                    vec4 pm = vec4(NEG_INF);
                    for (int c = 0; c < QK_CT; ++c) {
                        const int j = kq + c * (BKV / QK_CT);
                        vec4 sv;
                        for (int i = 0; i < 4; ++i) {
                            const int r = 4 * rq + i;
                            float s = NEG_INF;
                            if (r < rows && j < kn) {
                                const int qi = p0 + r, ki = k0 + j;
                                s = modded_l2(dots[c][i], b, h, qi, ki);
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
                                if (pass == 1 && !mask_mod_rc(b, h, qi, ki, mrv[i], mc[c])) s = NEG_INF;
#elif VKF_HAS_MASK_MOD
                                if (pass == 1 && !mask_mod(b, h, qi, ki)) s = NEG_INF;
#endif
                            }
                            sv[i] = s;
                        }
                        S4[(j * SQ) / 4 + rq] = sv;
                        pm = max(pm, sv);
                    }
                    for (int i = 0; i < 4; ++i) pmax[(4 * rq + i) * (NKQ + 1) + kq] = pm[i];
                }
#elif (WG % BKV == 0) && ((BQ * BKV) % WG == 0)
                // Register blocking: each invocation scores one key against BQ*BKV/WG rows, so
                // every K element read from shared memory feeds several products.
                {
                    const int j = lid % BKV, r0 = lid / BKV;
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
                    // The mask's per-key values, once for this invocation's key.
                    vkf_mcol_t mc;
                    if (pass == 1 && j < kn) mc = vkf_mcol(b, h, k0 + j);
#endif
                    float dots[BQ * BKV / WG];
                    for (int a = 0; a < BQ * BKV / WG; ++a) dots[a] = 0.0;
                    if (j < kn) {
                        for (int d = 0; d < D; ++d) {
                            float kd = KVs[j * KVD + d];
                            for (int a = 0; a < BQ * BKV / WG; ++a) dots[a] += Qs[(r0 + a * (WG / BKV)) * D + d] * kd;
                        }
                    }
                    for (int a = 0; a < BQ * BKV / WG; ++a) {
                        int r = r0 + a * (WG / BKV);
                        float s = NEG_INF;
                        if (r < rows && j < kn) {
                            const int qi = p0 + r, ki = k0 + j;
                            s = modded_l2(dots[a], b, h, qi, ki);
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
                            if (pass == 1 && !mask_mod_rc(b, h, qi, ki, mrv[a], mc)) s = NEG_INF;
#elif VKF_HAS_MASK_MOD
                            if (pass == 1 && !mask_mod(b, h, qi, ki)) s = NEG_INF;
#endif
                        }
                        S_AT(r, j) = s;
                    }
                }
#else
                for (int e = lid; e < BQ * BKV; e += WG) {
                    int r = e / BKV, j = e - (e / BKV) * BKV;
                    float s = NEG_INF;
                    if (r < rows && j < kn) {
                        float dot = 0.0;
                        for (int d = 0; d < D; ++d) dot += Qs[r * D + d] * KVs[j * KVD + d];
                        const int qi = p0 + r, ki = k0 + j;
                        s = modded_l2(dot, b, h, qi, ki);
#if VKF_HAS_MASK_MOD
                        if (pass == 1 && !mask_mod(b, h, qi, ki)) s = NEG_INF;
#endif
                    }
                    S_AT(r, j) = s;
                }
#endif
                barrier();
                // K is dead: V goes into its place while the softmax runs (one barrier less).
#if VKF_HALF
                if (p.vec_ok != 0) {
                    for (int e = lid; e < BKV * (DV / 8); e += WG) {
                        const int j = e / (DV / 8), u = e - j * (DV / 8);
                        const uvec4 w = j < kn ? v_units[(voff + kv_row(b, k0 + j) * p.v_sl) / 8 + u] : uvec4(0);
                        KVh[(j * DV) / 4 + 2 * u] = w.xy;
                        KVh[(j * DV) / 4 + 2 * u + 1] = w.zw;
                    }
                } else {
                    for (int e = lid; e < BKV * (DV / 4); e += WG) {
                        const int j = e / (DV / 4), q = e - j * (DV / 4);
                        vec4 x = vec4(0.0);
                        if (j < kn) {
                            const int at = voff + kv_row(b, k0 + j) * p.v_sl + 4 * q * p.v_sd;
                            x = vec4(float(v_data[at]), float(v_data[at + p.v_sd]), float(v_data[at + 2 * p.v_sd]), float(v_data[at + 3 * p.v_sd]));
                        }
                        KVh[(j * DV) / 4 + q] = uvec2(packHalf2x16(x.xy), packHalf2x16(x.zw));
                    }
                }
#else
                STAGE_ROWS(V_SET, v_units, v_data, voff, p.v_sl, p.v_sd, DV)
#endif
#if TPR > 1
                {
                    // Every invocation of row sr finds the row max (the same value), then
                    // exponentiates its keys part, part + TPR, ...
#if VKF_BLOCKED
                    // The running max in a register of every invocation of the row (they all
                    // compute the same value), the tile's from the parts Q·Kᵀ left: no scores are
                    // read before they are overwritten, so no barrier here.
                    const float m_old = m_run;
                    float mx = m_old;
                    for (int t = 0; t < NKQ; ++t) mx = max(mx, pmax[sr * (NKQ + 1) + t]);
                    m_run = mx;
#else
                    const float m_old = row_m[sr];
                    float mx = m_old;
                    for (int j = 0; j < kn; ++j) mx = max(mx, S_AT(sr, j));
                    barrier();   // every invocation has read its row's scores and row_m
#endif
                    float sum = 0.0;
                    for (int j = part; j < BKV; j += TPR) {
                        const float pj = j < kn ? exp2(S_AT(sr, j) - mx) : 0.0;
                        S_AT(sr, j) = pj;
                        sum += pj;
                    }
                    const float alpha = exp2(m_old - mx);
                    l_part = l_part * alpha + sum;
#if VKF_BLOCKED
                    if (part == 0) row_alpha[sr] = alpha;
#else
                    if (part == 0) { row_m[sr] = mx; row_alpha[sr] = alpha; }
#endif
                }
#else
                if (lid < BQ) {
                    float m_old = row_m[lid], mx = m_old;
                    for (int j = 0; j < kn; ++j) mx = max(mx, S_AT(lid, j));
                    float sum = 0.0;
                    for (int j = 0; j < BKV; ++j) {
                        float pj = j < kn ? exp2(S_AT(lid, j) - mx) : 0.0;
                        S_AT(lid, j) = pj;
                        sum += pj;
                    }
                    float alpha = exp2(m_old - mx);
                    row_m[lid] = mx;
                    row_l[lid] = row_l[lid] * alpha + sum;
                    row_alpha[lid] = alpha;
                }
#endif
                barrier();
#if VKF_BLOCKED
                {
                    [[unroll]] for (int n = 0; n < PV_NT; ++n)
                        [[unroll]] for (int i = 0; i < 4; ++i) acc4[4 * n + i] *= row_alpha[4 * (PV_TASK(n) / (DV / 4)) + i];
                    for (int j = 0; j < kn; ++j) {
#if VKF_HALF
#define V_VEC4(q) unpack4(KVh[(j * DV) / 4 + (q)])
#else
#define V_VEC4(q) KV4[(j * DV) / 4 + (q)]
#endif
#if PV_SAME_DIMS
                        const vec4 vv = V_VEC4(lid % (DV / 4));
#endif
                        [[unroll]] for (int n = 0; n < PV_NT; ++n) {
#if !PV_SAME_DIMS
                            const vec4 vv = V_VEC4(PV_TASK(n) % (DV / 4));
#endif
                            const vec4 pv = S4[(j * SQ) / 4 + PV_TASK(n) / (DV / 4)];
                            [[unroll]] for (int i = 0; i < 4; ++i) acc4[4 * n + i] += pv[i] * vv;
                        }
#undef V_VEC4
                    }
                }
#elif (WG % DV == 0) && ((BQ * DV) % WG == 0)
                // Register blocking: each V element read from shared memory feeds ACC outputs.
                {
                    const int d = lid % DV, r0 = lid / DV;
                    for (int a = 0; a < ACC; ++a) acc[a] *= row_alpha[r0 + a * (WG / DV)];
                    for (int j = 0; j < kn; ++j) {
                        float vd = KVs[j * KVD + d];
                        for (int a = 0; a < ACC; ++a) acc[a] += Ss[(r0 + a * (WG / DV)) * SST + j] * vd;
                    }
                }
#else
                for (int a = 0; a < ACC; ++a) {
                    int e = lid + a * WG;
                    if (e < BQ * DV) {
                        int r = e / DV, d = e - (e / DV) * DV;
                        float o = acc[a] * row_alpha[r];
                        for (int j = 0; j < kn; ++j) o += Ss[r * SST + j] * KVs[j * KVD + d];
                        acc[a] = o;
                    }
                }
#endif
                barrier();
            }
            if (k0 < k_stop) walked = false;
        }
        if (i < n) walked = false;
    }
    if (pass < 2) walked = false;
    if (!walked && lid == 0) vkf_report(4, 0, 0, 0);

#if TPR > 1
    // The row sums: each row's TPR shares added up.
#if VKF_BLOCKED
    if (part == 0) row_m[sr] = m_run;
#endif
    l_parts[lid] = l_part;
    barrier();
    if (part == 0) {
        float l = 0.0;
        for (int i = 0; i < TPR; ++i) l += l_parts[lid + i];
        row_l[sr] = l;
    }
    barrier();
#endif
#if VKF_MAX_SCORES
    // The running max is exact here (never raised lazily); in log2 units, so times ln 2. (Before
    // the sink joins: the maximum is over the scores.)
    if (p.write_max != 0 && lid < rows) {
        const float l = row_l[lid];
        max_data[p.lse_base SPLIT_LSE + bl * p.lse_sb + hl * p.lse_sh + (q0 + lid) * p.lse_sl] =
            isnan(l) ? uintBitsToFloat(0x7FC00000u) : l != 0.0 ? vkf_from_l2(row_m[lid]) : NEG_INF;
    }
#endif
#if VKF_SINKS
    // The head's sink joins each row's denominator: M = max(m, sink), l' = l 2^(m - M) + 2^(sink - M);
    // O is scaled by 2^(m - M) / l' and the LSE is (M + log2 l') ln 2 (the sink's own, no key).
    if (lid < BQ) {
        const float s2 = sinks[h] * LOG2E, m = row_m[lid], M = max(m, s2), f = exp2(m - M);
        row_l[lid] = row_l[lid] * f + exp2(s2 - M);
        row_alpha[lid] = f;
        row_m[lid] = M;
    }
    barrier();
#define SINK_F(r) * row_alpha[r]
#else
#define SINK_F(r)
#endif
    const int ooff = p.o_base + bl * p.o_sb + hl * p.o_sh SPLIT_O;
#if VKF_BLOCKED
    [[unroll]] for (int n = 0; n < PV_NT; ++n) {
        const int rg = PV_TASK(n) / (DV / 4), dq = PV_TASK(n) % (DV / 4);
        [[unroll]] for (int i = 0; i < 4; ++i) {
            const int r = 4 * rg + i;
            if (PV_HAS(n) && r < rows) {
                const float l = row_l[r];
                [[unroll]] for (int c = 0; c < 4; ++c)
                    o_data[ooff + (q0 + r) * p.o_sl + (4 * dq + c) * p.o_sd] = OUT_VALUE(l != 0.0 ? acc4[4 * n + i][c] SINK_F(r) / l : 0.0);
            }
        }
    }
#else
    for (int a = 0; a < ACC; ++a) {
        int e = lid + a * WG;
        if (e < BQ * DV) {
            int r = e / DV, d = e - (e / DV) * DV;
            if (r < rows) {
                float l = row_l[r];
                o_data[ooff + (q0 + r) * p.o_sl + d * p.o_sd] = OUT_VALUE(l != 0.0 ? acc[a] SINK_F(r) / l : 0.0);
            }
        }
    }
#endif
    if (p.write_lse != 0 && lid < rows) {
        float l = row_l[lid];
        lse_data[p.lse_base SPLIT_LSE + bl * p.lse_sb + hl * p.lse_sh + (q0 + lid) * p.lse_sl] = l != 0.0 ? vkf_lse(row_m[lid], l) : NEG_INF;
    }
}
