#version 450
// Split-KV decoding on NVIDIA's tensor cores with no shared-memory round trip per step: K and V
// go from memory straight into matrix operands, and the softmax works on the accumulators in
// registers (the accumulator layout the coopmat-nv kernels rely on, measured by the host:
// CooperativeMatrixLayout.nvidiaMMA — lane l holds rows l/4 and l/4 + 8 of each 16x16 fragment,
// element e in row l/4 + 8 * (e >> 2), column 2 * (l % 4) + (e & 1) + 8 * ((e >> 1) & 1)).
//
// Why: the layout-free matrix kernel (flex_attention_decode_mm.comp) stages K, V, S and P in
// shared memory, so an NVIDIA SM, whose resident workgroups share about 48 KiB, ran two to four of
// its one-subgroup workgroups at once, each a chain of dependent loads (H100: specdec_4_of_8k in
// 384 µs, decode_mqa_32k at 19% of HBM; docs/performance.md). Here the only shared memory is one
// 16-row tile per subgroup that Q passes through once and, at a block's last 16 keys when they
// are fewer than 16, V (zeros past the keys: rows past a sequence's end are never read, and may
// hold anything, NaN included), so registers alone bound the subgroups an SM runs, and with
// DEC_PREFETCH each subgroup's next 16 keys of K and V are in flight while it computes.
//
// Like flex_attention_decode_mm.comp (flex_decode.glsl's walk and packing): a subgroup takes one
// (batch, KV head, split), its 16 rows are (query head, query row) pairs that share the KV head,
// its keys one split's share of their BlockMask row's walked blocks, 16 at a time; it writes per
// row its output normalized over those keys (float32), their LSE and (VKF_MAX_SCORES) their
// largest score, which flex_attention_merge.comp combines. A split with no key writes 0 / -inf;
// a NaN score makes its row's partial NaN.
//
// The host picks this kernel only where every 16-key chunk it walks lies in memory it may read:
// K and V rows contiguous and 8-aligned (16-byte loads), KV blocks a multiple of 16 keys, and the
// cache a multiple of 16 rows (contiguous) or pages of a multiple of 16 keys (paged), so the rows
// past a sequence's end that a chunk's K load touches are inside its page or tensor; their scores
// are dropped before any mod sees them.
//
// Defines: D, DV (multiples of 16), NSG (subgroups a workgroup, each walking a split of its
// own), DEC_PREFETCH (0/1), IN_F16 or IN_BF16 (the host retypes the 16-bit operands), and what
// flex_attention_common.glsl takes (VKF_KV_LENGTHS, VKF_PAGED, VKF_Q_OFFSETS, VKF_MAX_SCORES).
// Bindings as flex_attention_fwd.comp; O and LSE bind the partials. Subgroups of 32.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_KHR_shader_subgroup_vote : require

#ifndef NSG
#define NSG 1
#endif
#ifndef DEC_PREFETCH
#define DEC_PREFETCH 1
#endif
layout(local_size_x = 32 * NSG) in;
#define DEC_NSG NSG

#define OUT_F16 0
#define OUT_BF16 0
// Several heads per subgroup: the mods are spliced without their per-(b, h) hoisting.
#define VKF_NO_HOIST 1
#include "flex_dtype.glsl"
#include "flex_attention_common.glsl"
#define VKF_MM_EMULATE 0
#define MM 16
#define MN 16
#define MK 16
#include "flex_mm.glsl"
#define RMAX 16
#include "flex_decode.glsl"

// Q, K and V as 16-byte units: K and V for the matrix loads (the host checked their rows
// contiguous and 8-aligned), Q where p.vec_ok (else gathered).
layout(std430, set = 0, binding = VKF_BINDING_Q) readonly buffer QBufU { uvec4 q_units[]; };
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBufU { uvec4 k_units[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBufU { uvec4 v_units[]; };
GATHER(q_data, q_units)

#define FD (D / 16)
#define FDV (DV / 16)
// Element e of a fragment: in the upper 8 rows when EL_HI(e), column lane_c + EL_COL(e).
#define EL_HI(e) ((e) >> 2)
#define EL_COL(e) (((e) & 1) + 8 * (((e) >> 1) & 1))
// The running maximum moves only by more than TAU (log2 units), as in the coopmat-nv forward: P
// stays below 2^TAU, and O is rescaled only on those rare steps.
#define TAU 8.0

// Each subgroup's tile: 16 rows of max(D, DV) halves (+ one unit of padding, so that the eight
// rows a fragment load reads fall on distinct banks).
#define TS4 ((D > DV ? D : DV) / 8 + 1)
shared uvec4 Ts4[NSG * 16 * TS4];

// The 16 keys' K (transposed) and V fragments from physical row ROW on (a macro: the KHR rewrite
// takes no matrices as function parameters).
#define LOAD_KV(ROW, KF, VF) { \
    const uint ks_ = uint((koff + (ROW) * p.k_sl) / 8), vs_ = uint((voff + (ROW) * p.v_sl) / 8); \
    [[unroll]] for (int kk = 0; kk < FD; ++kk) coopMatLoadNV(KF[kk], k_units, ks_ + uint(2 * kk), uint(p.k_sl / 8), true); \
    [[unroll]] for (int nn = 0; nn < FDV; ++nn) coopMatLoadNV(VF[nn], v_units, vs_ + uint(2 * nn), uint(p.v_sl / 8), false); }

void main() {
    const int lane = int(gl_SubgroupInvocationID), sg = NSG > 1 ? int(gl_SubgroupID) : 0;
    const int lane_r = lane >> 2, lane_c = 2 * (lane & 3);
    // Built for subgroups of 32 (the layout above): otherwise NaN partials, never wrong numbers.
    const bool sized = gl_SubgroupSize == 32u && gl_NumSubgroups == uint(NSG);
    const int tb = sg * 16 * TS4;   // this subgroup's tile
    const DecodeWG w = decode_wg();
    const int b = w.b, bl = w.bl, chunk = w.chunk, hk = w.hk, group = w.group, off = w.off, qb = w.qb;
    bool any = false;
    [[unroll]] for (int r = 0; r < 16; ++r) any = any || row_head(r, chunk, hk, group, off, qb) >= 0;
    if (!any) return;   // uniform: no row of this batch lies in this segment

    // This lane's two rows (lane_r, lane_r + 8): query head (-1: none) and position (q_idx).
    int rh[2], rpos[2];
    [[unroll]] for (int i = 0; i < 2; ++i) {
        const int r = lane_r + 8 * i;
        rh[i] = row_head(r, chunk, hk, group, off, qb);
        rpos[i] = off + row_query(r, chunk);
    }

    // Q: the rows' query vectors (zeros where a row is none) through the tile, kept as A operands.
    const int qoff = p.q_base + bl * p.q_sb;
    for (int e = lane; e < 16 * (D / 8); e += 32) {
        const int r = e / (D / 8), u = e - r * (D / 8), h = row_head(r, chunk, hk, group, off, qb);
        Ts4[tb + r * TS4 + u] = h >= 0 ? unit_q_data(qoff + h * p.q_sh + row_query(r, chunk) * p.q_sl, p.q_sd, u) : uvec4(0);
    }
    subgroup_sync();
    FRAG_A qf[FD];
    [[unroll]] for (int kk = 0; kk < FD; ++kk) coopMatLoadNV(qf[kk], Ts4, uint(tb + 2 * kk), uint(TS4), false);

    FRAG_C o[FDV];
    [[unroll]] for (int nn = 0; nn < FDV; ++nn) o[nn] = FRAG_C(0.0);
    // Per row of the lane: the running maximum (log2 units; finite, so that a row with no key yet
    // gets P = 0), this lane's share of the row sum, and (VKF_MAX_SCORES) of the exact maximum.
    float fm[2] = float[2](-1e30, -1e30), fl[2] = float[2](0.0, 0.0), fx[2] = float[2](NEG_INF, NEG_INF);

    const int mrow = w.mrow, n_full = w.n_full, t_end = w.t_end, lkv = w.lkv, koff = w.koff, voff = w.voff;
    int t = w.t0 - 1, k0 = 0, k_stop = 0, kb0 = 0, row0 = -1;
    bool partial = false;
    bool more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
    // A chunk's 16 keys lie in one page (pages and blocks are multiples of 16): one lookup.
#define CHUNK_ROW(key) KEY_ROW(key)
    FRAG_B kf[FD], vf[FDV];
#if DEC_PREFETCH
    if (more) LOAD_KV(CHUNK_ROW(k0), kf, vf)
#endif
    while (more) {
        const int c0 = k0, kn = min(16, k_stop - k0), crow = CHUNK_ROW(k0);
        const bool cpart = partial;
        k0 += 16;
        more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
#if DEC_PREFETCH
        FRAG_B kn_[FD], vn_[FDV];
        if (more) LOAD_KV(CHUNK_ROW(k0), kn_, vn_)   // in flight while this chunk computes
#else
        LOAD_KV(crow, kf, vf)
#endif
        // S = Q Kᵀ, then the scores in log2 units (scale, score-mod, mask), -inf past the keys.
        FRAG_C sc = FRAG_C(0.0);
        [[unroll]] for (int kk = 0; kk < FD; ++kk) sc = coopMatMulAddNV(qf[kk], kf[kk], sc);
        float mx[2] = float[2](NEG_INF, NEG_INF);
        [[unroll]] for (int e = 0; e < 8; ++e) {
            const int i = EL_HI(e), j = lane_c + EL_COL(e), h = rh[i];
            float s = NEG_INF;
            if (h >= 0 && j < kn) {
                s = modded_l2(sc[e], b, h, rpos[i], c0 + j);
#if VKF_HAS_MASK_MOD
                if (cpart && !mask_mod(b, h, rpos[i], c0 + j)) s = NEG_INF;
#endif
            }
            sc[e] = s;
            mx[i] = max(mx[i], s);
        }
#if VKF_MAX_SCORES
        fx[0] = max(fx[0], mx[0]); fx[1] = max(fx[1], mx[1]);
#endif
        // The lazy maximum: one vote skips the row reductions on most chunks.
        if (subgroupAny(mx[0] > fm[0] + TAU || mx[1] > fm[1] + TAU)) {
            float al[2];
            bool rescale = false;
            [[unroll]] for (int i = 0; i < 2; ++i) {
                float m = mx[i];
                m = max(m, subgroupShuffleXor(m, 1)); m = max(m, subgroupShuffleXor(m, 2));
                const bool up = m > fm[i] + TAU;
                rescale = rescale || up;
                m = up ? m : fm[i];
                al[i] = exp2(fm[i] - m);
                fm[i] = m;
            }
            if (subgroupAny(rescale)) {
                [[unroll]] for (int nn = 0; nn < FDV; ++nn)
                    [[unroll]] for (int e = 0; e < 8; ++e) o[nn][e] *= al[EL_HI(e)];
                fl[0] *= al[0]; fl[1] *= al[1];
            }
        }
        [[unroll]] for (int e = 0; e < 8; ++e) {
            const float pe = exp2(sc[e] - fm[EL_HI(e)]);
            sc[e] = pe;
            fl[EL_HI(e)] += pe;
        }
        const FRAG_A pa = FRAG_A(sc);
        if (kn < 16) {
            // Fewer than 16 keys: V's rows past them may hold anything (0 · NaN is NaN), so this
            // chunk's V goes through the tile, zeros past the keys.
            subgroup_sync();   // the tile's previous reads are done
            for (int e = lane; e < 16 * (DV / 8); e += 32) {
                const int j = e / (DV / 8), u = e - j * (DV / 8);
                Ts4[tb + j * TS4 + u] = j < kn ? v_units[(voff + (crow + j) * p.v_sl) / 8 + u] : uvec4(0);
            }
            subgroup_sync();
            [[unroll]] for (int nn = 0; nn < FDV; ++nn) coopMatLoadNV(vf[nn], Ts4, uint(tb + 2 * nn), uint(TS4), false);
        }
        [[unroll]] for (int nn = 0; nn < FDV; ++nn) o[nn] = coopMatMulAddNV(pa, vf[nn], o[nn]);
#if DEC_PREFETCH
        [[unroll]] for (int kk = 0; kk < FD; ++kk) kf[kk] = kn_[kk];
        [[unroll]] for (int nn = 0; nn < FDV; ++nn) vf[nn] = vn_[nn];
#endif
    }

    // This split's partial per row: O over its keys, normalized, and their LSE (natural log);
    // partials [split, b, h, i(, d)], contiguous over this dispatch's batches and every head.
    const float nan = uintBitsToFloat(0x7FC00000u);
    float lt[2];
    bool bad[2];
    int prow[2];
    [[unroll]] for (int i = 0; i < 2; ++i) {
        float l = fl[i];
        l += subgroupShuffleXor(l, 1); l += subgroupShuffleXor(l, 2);
        lt[i] = l;
        bad[i] = isnan(l) || !sized;
        prow[i] = (bl * p.Hq + rh[i]) * p.Lq + row_query(lane_r + 8 * i, chunk);
#if VKF_MAX_SCORES
        float mxs = fx[i];
        mxs = max(mxs, subgroupShuffleXor(mxs, 1)); mxs = max(mxs, subgroupShuffleXor(mxs, 2));
        if (rh[i] >= 0 && (lane & 3) == 0)
            max_data[p.lse_base + w.split * p.lse_split_stride + prow[i]] = bad[i] ? nan : l != 0.0 ? mxs * LN2 : NEG_INF;
#endif
        if (rh[i] >= 0 && (lane & 3) == 0)
            lse_data[p.lse_base + w.split * p.lse_split_stride + prow[i]] = bad[i] ? nan : l != 0.0 ? (fm[i] + log2(l)) * LN2 : NEG_INF;
    }
    [[unroll]] for (int nn = 0; nn < FDV; ++nn) {
        [[unroll]] for (int e = 0; e < 8; ++e) {
            const int i = EL_HI(e);
            if (rh[i] < 0) continue;
            const float l = lt[i];
            o_data[p.o_base + w.split * p.o_split_stride + prow[i] * DV + nn * 16 + lane_c + EL_COL(e)] = bad[i] ? nan : l != 0.0 ? o[nn][e] / l : 0.0;
        }
    }
}
