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
// Decoding reads each key once and does little arithmetic with it, so the walk keeps no tile in
// shared memory and has no barrier: LK invocations of a subgroup hold one key (its K and V row in
// 16-byte units, straight from memory into registers), every key slot of the workgroup runs its
// own online softmax over its keys, and the next round's K and V are loaded while this round is
// computed. A score is the LK partial dot products summed by a butterfly of subgroup shuffles;
// every invocation of the key's group then holds it, so each computes P for the key and adds
// P·V to its own V units. The slots merge their (max, sum, P·V) at the end (shuffles within a
// subgroup, shared memory across them). Nothing depends on the subgroup size beyond LK dividing
// it (LK is at most the device's smallest subgroup size): a subgroup of 8, 32 or 64 holds 8/LK,
// 32/LK or 64/LK keys.
//
// Rows of one workgroup share one BlockMask row: the heads packed are those of a broadcast mask
// (per-head masks pack one head per workgroup), and query rows at offsets (VKF_Q_OFFSETS) that
// fall in different query blocks go to different workgroups (dec_segs segments).
//
// Grid: x = split, y = (KV head × head chunks × segments), z = batch of this dispatch.
// Defines: D, DV, WG, RMAX (rows per workgroup), LK (invocations per key, a power of two),
// KPL (keys per key slot and round: loads in flight), DEC_RS (0/1, below), IN_F16/IN_BF16, and what
// flex_attention_common.glsl takes (VKF_KV_LENGTHS, VKF_PAGED, VKF_Q_OFFSETS, ...).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_KHR_shader_subgroup_vote : require

layout(local_size_x = WG) in;

#define OUT_F16 0
#define OUT_BF16 0
// Several heads per workgroup: the mods are spliced without their per-(b, h) hoisting.
#define VKF_NO_HOIST 1
#include "flex_dtype.glsl"
#include "flex_attention_common.glsl"
#include "flex_decode.glsl"

// K and V as 16-byte units where rows are contiguous and 8-element aligned (p.vec_ok, D and DV
// multiples of 8); else element by element into the same units, zero past the head dim.
#define VEC_PATH (D % 8 == 0 && DV % 8 == 0)
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBufU { UNIT_T k_units[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBufU { UNIT_T v_units[]; };

#define KU ((D + UNIT - 1) / UNIT)     // units per K row
#define VU ((DV + UNIT - 1) / UNIT)    // units per V row
#define UPL ((KU + LK - 1) / LK)       // K units per invocation (unit kl + u·LK)
#define VPL ((VU + LK - 1) / LK)       // V units per invocation
#define NSLOT (WG / LK)                // key slots of the workgroup
#define ROUND (NSLOT * KPL)            // keys per round

// Unit c of a row at element offset o, elements stride s apart, n of them (fp16 repacked from
// floats it holds exactly, bfloat16 from its bits).
#if IN_F16
#define SCALAR_UNIT(DATA, o, s, c, n, U) { \
    float f_[8]; \
    [[unroll]] for (int e_ = 0; e_ < 8; ++e_) { const int d_ = (c) * 8 + e_; f_[e_] = d_ < (n) ? float(DATA[(o) + d_ * (s)]) : 0.0; } \
    U = uvec4(packHalf2x16(vec2(f_[0], f_[1])), packHalf2x16(vec2(f_[2], f_[3])), packHalf2x16(vec2(f_[4], f_[5])), packHalf2x16(vec2(f_[6], f_[7]))); }
#elif IN_BF16
#define SCALAR_UNIT(DATA, o, s, c, n, U) { \
    uint w_[8]; \
    [[unroll]] for (int e_ = 0; e_ < 8; ++e_) { const int d_ = (c) * 8 + e_; w_[e_] = d_ < (n) ? uint(DATA[(o) + d_ * (s)]) : 0u; } \
    U = uvec4(w_[0] | (w_[1] << 16), w_[2] | (w_[3] << 16), w_[4] | (w_[5] << 16), w_[6] | (w_[7] << 16)); }
#else
#define SCALAR_UNIT(DATA, o, s, c, n, U) { \
    [[unroll]] for (int e_ = 0; e_ < 4; ++e_) { const int d_ = (c) * 4 + e_; U[e_] = d_ < (n) ? DATA[(o) + d_ * (s)] : 0.0; } }
#endif

// DEC_RS: the key's LK invocations reduce-scatter the rows' dot products instead of each summing
// all of them: every halving step sends the half of the rows the partner keeps, so after
// log2(min(RMAX, LK)) steps an invocation holds the whole score of NOWN rows (a butterfly
// finishes where LK > RMAX), evaluates the mods and the online softmax for those rows only, and
// P (and the rescale factor, where a maximum grew) goes to the key's other invocations by
// shuffles. Fewer shuffles and no redundant mods when rows are many.
#ifndef DEC_RS
#define DEC_RS 0
#endif
#define NOWN (RMAX > LK ? RMAX / LK : 1)
#define OWN_KL(r) (RMAX >= LK ? (r) / NOWN : (r) * (LK / RMAX))   // an invocation holding row r
#define OWN_J(r) (RMAX >= LK ? (r) % NOWN : 0)                     // and where
// One halving step I (offset LK >> I): the rows are RMAX >> I after it; past log2(RMAX), a butterfly.
#define RS_STEP(I) \
    if ((LK >> (I)) >= 1) { \
        const int o_ = LK >> (I), n_ = RMAX >> (I); \
        if (n_ >= 1) { \
            const bool up_ = (kl & o_) != 0; \
            [[unroll]] for (int j_ = 0; j_ < n_; ++j_) { \
                const float send_ = up_ ? dot[j_] : dot[j_ + n_]; \
                dot[j_] = (up_ ? dot[j_ + n_] : dot[j_]) + subgroupShuffleXor(send_, o_); \
            } \
        } else dot[0] += subgroupShuffleXor(dot[0], o_); \
    }

shared float sh_m[NSLOT][RMAX];   // per subgroup (at most NSLOT of them): its slots' merged maximum and sum
shared float sh_l[NSLOT][RMAX];
shared float sh_o[RMAX][VU * UNIT];
shared int sh_nan[RMAX];

void main() {
    const int lid = int(gl_LocalInvocationIndex);
    const int sgi = int(gl_SubgroupInvocationID), sg = int(gl_SubgroupID);
    const int kl = sgi % LK;                                       // this invocation's place in its key
    const int slot = sg * (int(gl_SubgroupSize) / LK) + sgi / LK;  // its key slot
    const DecodeWG w = decode_wg();
    const int split = w.split, bl = w.bl, b = w.b, chunk = w.chunk, hk = w.hk, group = w.group, off = w.off, qb = w.qb;
    int row_h[RMAX], row_i[RMAX];
    bool any = false;
    [[unroll]] for (int r = 0; r < RMAX; ++r) {
        row_h[r] = row_head(r, chunk, hk, group, off, qb); row_i[r] = row_query(r, chunk);
        any = any || row_h[r] >= 0;
    }
    if (!any) return;   // uniform: no row of this batch lies in this segment
    // This invocation's share of each row's query: the elements of its K units, in float.
    float qf[RMAX][UPL][UNIT];
    [[unroll]] for (int r = 0; r < RMAX; ++r)
        [[unroll]] for (int u = 0; u < UPL; ++u)
            [[unroll]] for (int e = 0; e < UNIT; ++e) {
                const int d = (kl + u * LK) * UNIT + e, h = row_h[r];
                qf[r][u][e] = h >= 0 && d < D ? IN_FLOAT(q_data[p.q_base + bl * p.q_sb + h * p.q_sh + row_i[r] * p.q_sl + d * p.q_sd]) : 0.0;
            }
    // Per row, this slot's online softmax: running maximum (log2 units), sum of P, P·V over this
    // invocation's V units, and whether a score was NaN.
    float m[RMAX], l[RMAX], acc[RMAX][VPL][UNIT];
    bool bad[RMAX];
    [[unroll]] for (int r = 0; r < RMAX; ++r) {
        m[r] = -1e30; l[r] = 0.0; bad[r] = false;
        [[unroll]] for (int u = 0; u < VPL; ++u) [[unroll]] for (int e = 0; e < UNIT; ++e) acc[r][u][e] = 0.0;
    }
#if DEC_RS
    // The rows this invocation scores (from own0), their online softmax.
    const int own0 = RMAX >= LK ? kl * NOWN : kl / (LK / RMAX), keybase = sgi - kl;
    float m_own[NOWN], l_own[NOWN];
    bool bad_own[NOWN];
    [[unroll]] for (int j = 0; j < NOWN; ++j) { m_own[j] = -1e30; l_own[j] = 0.0; bad_own[j] = false; }
#endif
    const int mrow = w.mrow, n_full = w.n_full, t_end = w.t_end, lkv = w.lkv, koff = w.koff, voff = w.voff;
    const bool vec = VEC_PATH && p.vec_ok != 0;
    int t = w.t0 - 1, k0 = 0, k_stop = 0, kb0 = 0, row0 = -1;
    bool partial = false;
    bool more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
    // The round ahead, in registers: this invocation's units of keys k0 + j·NSLOT + slot.
    UNIT_T kreg[KPL][UPL], vreg[KPL][VPL];
#define LOAD_ROUND(K0, KSTOP) \
    [[unroll]] for (int j = 0; j < KPL; ++j) { \
        const int key = (K0) + j * NSLOT + slot; \
        if (key < (KSTOP)) { \
            const int row = KEY_ROW(key), ko = koff + row * p.k_sl, vo = voff + row * p.v_sl; \
            [[unroll]] for (int u = 0; u < UPL; ++u) { \
                const int c = kl + u * LK; \
                if (c < KU) { if (vec) kreg[j][u] = k_units[ko / UNIT + c]; else SCALAR_UNIT(k_data, ko, p.k_sd, c, D, kreg[j][u]) } \
            } \
            [[unroll]] for (int u = 0; u < VPL; ++u) { \
                const int c = kl + u * LK; \
                if (c < VU) { if (vec) vreg[j][u] = v_units[vo / UNIT + c]; else SCALAR_UNIT(v_data, vo, p.v_sd, c, DV, vreg[j][u]) } \
            } \
        } \
    }
    if (more) LOAD_ROUND(k0, k_stop)
    // DEC_DONT_UNROLL (VKFLEX_DECODE_UNROLL=0): not unrolled, as the NVIDIA-layout kernel's loop,
    // which NVIDIA's compiler unrolled eight times past its instruction caches (1.27x slower).
#ifndef DEC_DONT_UNROLL
#define DEC_DONT_UNROLL 0
#endif
#if DEC_DONT_UNROLL
    [[dont_unroll]]
#endif
    while (more) {
        const int kt = k0, ks = k_stop;
        const bool part = partial;
        UNIT_T kcur[KPL][UPL] = kreg, vcur[KPL][VPL] = vreg;
        // Move the cursor and start loading the next round.
        k0 += ROUND;
        more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
        if (more) LOAD_ROUND(k0, k_stop)
        [[unroll]] for (int j = 0; j < KPL; ++j) {
            const int key = kt + j * NSLOT + slot;
            const bool live = key < ks;
            // Partial dot products over this invocation's K units, then summed over the key's LK.
            float dot[RMAX];
            [[unroll]] for (int r = 0; r < RMAX; ++r) dot[r] = 0.0;
            [[unroll]] for (int u = 0; u < UPL; ++u) {
                if (kl + u * LK < KU && live) {
                    float kf[UNIT];
                    unit_floats(kcur[j][u], kf);
                    [[unroll]] for (int r = 0; r < RMAX; ++r) [[unroll]] for (int e = 0; e < UNIT; ++e) dot[r] += qf[r][u][e] * kf[e];
                }
            }
#if DEC_RS
            RS_STEP(1) RS_STEP(2) RS_STEP(3) RS_STEP(4) RS_STEP(5) RS_STEP(6)
            float vf[VPL][UNIT];
            [[unroll]] for (int u = 0; u < VPL; ++u) {
                if (kl + u * LK < VU && live) unit_floats(vcur[j][u], vf[u]);
                else [[unroll]] for (int e = 0; e < UNIT; ++e) vf[u][e] = 0.0;
            }
            float pown[NOWN], aown[NOWN];
            bool grew = false;
            [[unroll]] for (int jo = 0; jo < NOWN; ++jo) {
                const int r = own0 + jo, h = row_head(r, chunk, hk, group, off, qb), pos = off + row_query(r, chunk);
                float sc = NEG_INF;
                if (h >= 0 && live) {
                    sc = modded_l2(dot[jo], b, h, pos, key);
#if VKF_HAS_MASK_MOD
                    if (part && !mask_mod(b, h, pos, key)) sc = NEG_INF;
#endif
                }
                if (isnan(sc)) { bad_own[jo] = true; sc = NEG_INF; }
                aown[jo] = 1.0;
                if (sc > m_own[jo]) {   // the maximum grew: the key's invocations rescale this row
                    aown[jo] = exp2(m_own[jo] - sc);
                    l_own[jo] *= aown[jo];
                    m_own[jo] = sc;
                    grew = true;
                }
                pown[jo] = exp2(sc - m_own[jo]);
                l_own[jo] += pown[jo];
            }
            if (subgroupAny(grew)) {
                [[unroll]] for (int r = 0; r < RMAX; ++r) {
                    const float a = subgroupShuffle(aown[OWN_J(r)], keybase + OWN_KL(r));
                    [[unroll]] for (int u = 0; u < VPL; ++u) [[unroll]] for (int e = 0; e < UNIT; ++e) acc[r][u][e] *= a;
                }
            }
            [[unroll]] for (int r = 0; r < RMAX; ++r) {
                const float pr = subgroupShuffle(pown[OWN_J(r)], keybase + OWN_KL(r));
                [[unroll]] for (int u = 0; u < VPL; ++u) [[unroll]] for (int e = 0; e < UNIT; ++e) acc[r][u][e] += pr * vf[u][e];
            }
#else
            [[unroll]] for (int o = 1; o < LK; o <<= 1)
                [[unroll]] for (int r = 0; r < RMAX; ++r) dot[r] += subgroupShuffleXor(dot[r], o);
            float vf[VPL][UNIT];
            [[unroll]] for (int u = 0; u < VPL; ++u) {
                if (kl + u * LK < VU && live) unit_floats(vcur[j][u], vf[u]);
                else [[unroll]] for (int e = 0; e < UNIT; ++e) vf[u][e] = 0.0;
            }
            [[unroll]] for (int r = 0; r < RMAX; ++r) {
                if (row_h[r] < 0 || !live) continue;
                const int pos = off + row_i[r];
                float s = modded_l2(dot[r], b, row_h[r], pos, key);
#if VKF_HAS_MASK_MOD
                if (part && !mask_mod(b, row_h[r], pos, key)) s = NEG_INF;
#endif
                if (isnan(s)) { bad[r] = true; continue; }
                if (s > m[r]) {   // the maximum grew: rescale what this slot has summed
                    const float alpha = exp2(m[r] - s);
                    l[r] *= alpha;
                    [[unroll]] for (int u = 0; u < VPL; ++u) [[unroll]] for (int e = 0; e < UNIT; ++e) acc[r][u][e] *= alpha;
                    m[r] = s;
                }
                const float pr = exp2(s - m[r]);
                l[r] += pr;
                [[unroll]] for (int u = 0; u < VPL; ++u) [[unroll]] for (int e = 0; e < UNIT; ++e) acc[r][u][e] += pr * vf[u][e];
            }
#endif
        }
    }
#if DEC_RS
    // Every row's (max, sum, NaN) from an invocation that scored it, for the merge below.
    [[unroll]] for (int r = 0; r < RMAX; ++r) {
        m[r] = subgroupShuffle(m_own[OWN_J(r)], keybase + OWN_KL(r));
        l[r] = subgroupShuffle(l_own[OWN_J(r)], keybase + OWN_KL(r));
        bad[r] = subgroupShuffle(bad_own[OWN_J(r)], keybase + OWN_KL(r));
    }
#endif
    // A walk that ends on its own leaves the cursor past the share; one a driver stopped (lavapipe's
    // loop cap) leaves it inside: reported, never a silent truncation.
    bool cut = more;
    // Merge the key slots of this subgroup (butterfly over the slots), ...
    int o = LK;
    for (; o < int(gl_SubgroupSize); o <<= 1) {
        [[unroll]] for (int r = 0; r < RMAX; ++r) {
            const float mo = subgroupShuffleXor(m[r], o), lo = subgroupShuffleXor(l[r], o);
            const bool bo = subgroupShuffleXor(bad[r], o);
            const float mm = max(m[r], mo), a = exp2(m[r] - mm), c = exp2(mo - mm);
            [[unroll]] for (int u = 0; u < VPL; ++u)
                [[unroll]] for (int e = 0; e < UNIT; ++e) acc[r][u][e] = acc[r][u][e] * a + subgroupShuffleXor(acc[r][u][e], o) * c;
            l[r] = l[r] * a + lo * c; m[r] = mm; bad[r] = bad[r] || bo;
        }
    }
    cut = cut || o < int(gl_SubgroupSize);
    // ... then the subgroups, through shared memory: the rows' maximum over all, each subgroup's
    // P·V rescaled to it and added in subgroup order (deterministic).
    const int nsg = int(gl_NumSubgroups);
    if (lid < RMAX) sh_nan[lid] = 0;
    if (sgi == 0) [[unroll]] for (int r = 0; r < RMAX; ++r) { sh_m[sg][r] = m[r]; sh_l[sg][r] = l[r]; }
    barrier();
    if (sgi == 0) [[unroll]] for (int r = 0; r < RMAX; ++r) if (bad[r]) sh_nan[r] = 1;
    float mall[RMAX], lall[RMAX];
    int g = 0;
    [[unroll]] for (int r = 0; r < RMAX; ++r) { mall[r] = -1e30; lall[r] = 0.0; }
    for (; g < nsg; ++g) [[unroll]] for (int r = 0; r < RMAX; ++r) mall[r] = max(mall[r], sh_m[g][r]);
    cut = cut || g < nsg;
    for (g = 0; g < nsg; ++g) [[unroll]] for (int r = 0; r < RMAX; ++r) lall[r] += sh_l[g][r] * exp2(sh_m[g][r] - mall[r]);
    cut = cut || g < nsg;
    for (g = 0; g < nsg; ++g) {
        if (sg == g && sgi < LK) {
            [[unroll]] for (int r = 0; r < RMAX; ++r) {
                const float a = exp2(m[r] - mall[r]);
                [[unroll]] for (int u = 0; u < VPL; ++u) {
                    const int c = kl + u * LK;
                    if (c < VU) [[unroll]] for (int e = 0; e < UNIT; ++e) {
                        const float x = acc[r][u][e] * a;
                        sh_o[r][c * UNIT + e] = g == 0 ? x : sh_o[r][c * UNIT + e] + x;
                    }
                }
            }
        }
        barrier();
    }
    cut = cut || g < nsg;
    if (cut) vkf_report(4, 0, 0, 0);
    // This split's partial per row: O over its keys, normalized, and their LSE (natural log).
    const float nan = uintBitsToFloat(0x7FC00000u);
    for (int e = lid; e < RMAX * DV; e += WG) {
        const int r = e / DV, d = e - r * DV;
        int h = -1, i = 0;
        float lr = 0.0, mr = 0.0;
        [[unroll]] for (int q = 0; q < RMAX; ++q) if (q == r) { h = row_h[q]; i = row_i[q]; lr = lall[q]; mr = mall[q]; }
        if (h < 0) continue;
        // Partials [split, b, h, i(, d)], contiguous over this dispatch's batches and every head.
        const int prow = (bl * p.Hq + h) * p.Lq + i;
        const bool isnan_row = sh_nan[r] != 0;
        o_data[p.o_base + split * p.o_split_stride + prow * DV + d] = isnan_row ? nan : lr != 0.0 ? sh_o[r][d] / lr : 0.0;
        if (d == 0) {
            lse_data[p.lse_base + split * p.lse_split_stride + prow] = isnan_row ? nan : lr != 0.0 ? vkf_lse(mr, lr) : NEG_INF;
#if VKF_MAX_SCORES
            // The split's largest score (natural units), where it saw a key.
            max_data[p.lse_base + split * p.lse_split_stride + prow] = isnan_row ? nan : lr != 0.0 ? vkf_from_l2(mr) : NEG_INF;
#endif
        }
    }
}
