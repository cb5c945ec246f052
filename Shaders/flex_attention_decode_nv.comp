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
// With DEC_REGLOAD the matrices are not loaded by coopMatLoad at all: each lane reads the 32-bit
// words its B-operand registers hold (the B layout the host measured, CooperativeMatrixLayout
// .nvidiaMMAB: element e of lane l at row 2(l%4) + (e&1) + 8((e>>1)&1), column l/4 + 8(e>>2)) with
// 16-byte loads and puts them into the matrices element by element. Why: a 16-key step's K and V
// are then 16 loads a lane issued together, whatever the driver does for a strided matrix load
// from memory. For that the head dims are permuted — any order of d gives the same Q·Kᵀ when Q
// and K share it, and O's columns are written back in memory order — so that the d's a lane holds
// lie in a few 16-byte units of each K row (and, for V, of each V row): K_WORD and V_WORD below. No
// shared memory: Q goes into its A operands the same way (A's layout is nvidiaMMA, whose element
// e sits where B's element e sits transposed), and a chunk's V words past its keys are zeroed.
//
// Defines: DEC_DONT_UNROLL (1/0: the step loop not unrolled / left to the driver), DEC_CHUNKS (1, or
// 2: two 16-key chunks a step, below) with DEC_B_T (1: the B operand's measured layout is
// CooperativeMatrixLayout.nvidiaMMAB, 0: nvidiaMMA), D, DV (multiples of 16), NSG (subgroups a workgroup, each walking a split of its
// own), DEC_PREFETCH (0: each step's loads at its start; 1: the next step's K and V loaded before
// a step computes; 2, DEC_REGLOAD only: the next step's K loaded as soon as this step's Q·Kᵀ has
// read its registers, its V after P·V, so no register holds two steps), DEC_REGLOAD (0/1), IN_F16 or IN_BF16 (the host retypes the 16-bit operands), and what
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
#ifndef DEC_DONT_UNROLL
#define DEC_DONT_UNROLL 1
#endif
#ifndef DEC_CHUNKS
#define DEC_CHUNKS 1
#endif
#ifndef DEC_B_T
#define DEC_B_T 0
#endif
#if DEC_CHUNKS == 2 && DEC_PREFETCH
#error DEC_CHUNKS 2 is written for no prefetch
#endif
#if DEC_PREFETCH == 2 && !DEC_REGLOAD || DEC_PREFETCH > 2
#error DEC_PREFETCH is 0, 1, or 2 with word loads (DEC_REGLOAD)
#endif
#ifndef DEC_KLINES
#define DEC_KLINES 0
#endif
#if DEC_KLINES && (!DEC_REGLOAD || DEC_CHUNKS != 1 || D % 64 != 0)
#error DEC_KLINES is written for word loads (DEC_REGLOAD), one chunk a step and D a multiple of 64
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
#ifndef DEC_REGLOAD
#define DEC_REGLOAD 0
#endif
#if !DEC_REGLOAD || DEC_CHUNKS == 2
#define TS4 ((D > DV ? D : DV) / 8 + 1)
shared uvec4 Ts4[NSG * 16 * TS4];
#endif

// The 16 keys' K (transposed) and V fragments from physical row ROW on (a macro: the KHR rewrite
// takes no matrices as function parameters).
#define LOAD_KV(ROW, KF, VF) { \
    const uint ks_ = uint((koff + (ROW) * p.k_sl) / 8), vs_ = uint((voff + (ROW) * p.v_sl) / 8); \
    [[unroll]] for (int kk = 0; kk < FD; ++kk) coopMatLoadNV(KF[kk], k_units, ks_ + uint(2 * kk), uint(p.k_sl / 8), true); \
    [[unroll]] for (int nn = 0; nn < FDV; ++nn) coopMatLoadNV(VF[nn], v_units, vs_ + uint(2 * nn), uint(p.v_sl / 8), false); }

#if DEC_REGLOAD
// The words a lane holds of each K (and Q) row: KW; logical column 16·kk + 2·(l%4) + b + 8·h
// (the B operand's element) is the lane's word w = 2·kk + h, half b. Of each V row: VW, logical
// column 16·nn + l/4 + 8·h at the lane's word nn, half h. Where those words lie in a row
// (DEC_COALESCED, default 1): interleaved in units of WUNIT(KW) (WUNIT(VW)) words, the lanes that
// share a row side by side — the lane's unit i at unit G·i + its place, G = 4 for K (lanes l%4),
// 8 for V (lanes l/4) — so that one 16-byte load instruction reads 64 (K) or 128 (V) contiguous
// bytes of each row it touches, whole sectors; 0: each lane's words one contiguous run, which
// leaves a load instruction reading 16 bytes every 64 (K) / 32 (V) bytes, half of each sector.
#ifndef DEC_COALESCED
#define DEC_COALESCED 1
#endif
#define KW (D / 8)
#define VW (DV / 16)
#define WUNIT(N) ((N) % 4 == 0 ? 4 : (N) % 2 == 0 ? 2 : 1)
#if DEC_COALESCED
#define K_G 4
#define V_G 8
#define K_WORD(c, w) (((w) / WUNIT(KW)) * 4 * WUNIT(KW) + (c) * WUNIT(KW) + (w) % WUNIT(KW))
#define V_WORD(r, nn) (((nn) / WUNIT(VW)) * 8 * WUNIT(VW) + (r) * WUNIT(VW) + (nn) % WUNIT(VW))
#else
#define K_G 1
#define V_G 1
#define K_WORD(c, w) ((c) * KW + (w))
#define V_WORD(r, nn) ((r) * VW + (nn))
#endif
// O's logical column n of fragment nn in memory (halves).
#define V_PHYS(nn, n) (2 * V_WORD((n) & 7, nn) + ((n) >> 3))
layout(std430, set = 0, binding = VKF_BINDING_Q) readonly buffer QBufW { uint q_words[]; };
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBufW4 { uvec4 k_w4[]; };
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBufW2 { uvec2 k_w2[]; };
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBufW1 { uint k_w1[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBufW4 { uvec4 v_w4[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBufW2 { uvec2 v_w2[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBufW1 { uint v_w1[]; };
// N words of the buffer seen as U4 / U2 / U1 (uvec4, uvec2, uint) into DST[AT..], in units of
// WUNIT(N) words, unit i from word W0 + i·G·WUNIT(N) (W0 a multiple of the unit: rows start
// 16-byte aligned).
#define WORDS(U4, U2, U1, DST, AT, W0, N, G) { \
    if ((N) % 4 == 0) { [[unroll]] for (int i_ = 0; i_ < (N) / 4; ++i_) { const uvec4 u_ = U4[(W0) / 4 + i_ * (G)]; \
        DST[(AT) + 4 * i_] = u_.x; DST[(AT) + 4 * i_ + 1] = u_.y; DST[(AT) + 4 * i_ + 2] = u_.z; DST[(AT) + 4 * i_ + 3] = u_.w; } } \
    else if ((N) % 2 == 0) { [[unroll]] for (int i_ = 0; i_ < (N) / 2; ++i_) { const uvec2 u_ = U2[(W0) / 2 + i_ * (G)]; \
        DST[(AT) + 2 * i_] = u_.x; DST[(AT) + 2 * i_ + 1] = u_.y; } } \
    else { [[unroll]] for (int i_ = 0; i_ < (N); ++i_) DST[(AT) + i_] = U1[(W0) + i_ * (G)]; } }
// This lane's words of the 16 keys from physical row ROW: K of keys l/4 and l/4 + 8, V of keys
// 2·(l%4) + {0, 1, 8, 9}.
#if DEC_KLINES && !DEC_COALESCED
#error DEC_KLINES gives the lanes the interleaved units (DEC_COALESCED)
#endif
#if DEC_KLINES
// DEC_KLINES: four lanes share a K row in the B operand, so its loads read 64 bytes of each of
// eight rows an instruction; these read as V's do — eight lanes a row, 128 bytes of each of four
// rows: instruction (q, h) gives lane l row l/8 + 4q, unit 8h + l%8 — into the slots of the two
// units (rows q/2 · 8 + …, units 8h + c and 8h + 4 + c) that K_LINES_FIX then moves to the lanes
// the layout gives them: for each (row half i, h), two shuffle rounds, in each of which every lane
// shows one of its two loaded units and takes one (lanes of rows 0-3 of the half from the
// instruction q = 2i, of rows 4-7 from q = 2i + 1). Run where the words are consumed, so the
// shuffles wait on no load that could still be in flight.
#define LOAD_K_WORDS(ROW, KR) { \
    [[unroll]] for (int q_ = 0; q_ < 4; ++q_) [[unroll]] for (int h_ = 0; h_ < D / 64; ++h_) { \
        const uvec4 u_ = k_w4[(koff + ((ROW) + (lane >> 3) + 4 * q_) * p.k_sl) / 8 + 8 * h_ + (lane & 7)]; \
        const int a_ = (q_ >> 1) * KW + 8 * h_ + 4 * (q_ & 1); \
        KR[a_] = u_.x; KR[a_ + 1] = u_.y; KR[a_ + 2] = u_.z; KR[a_ + 3] = u_.w; } }
#define K_LINES_FIX(KR) { \
    const bool lo_ = lane < 16, shows_a_ = (lane & 7) < 4; \
    const uint s0_ = uint(((lane >> 2) & 3) * 8 + (lo_ ? 0 : 4) + (lane & 3)), s1_ = s0_ ^ 4u; \
    [[unroll]] for (int i_ = 0; i_ < 2; ++i_) [[unroll]] for (int h_ = 0; h_ < D / 64; ++h_) [[unroll]] for (int x_ = 0; x_ < 4; ++x_) { \
        const int ua_ = i_ * KW + 8 * h_ + x_, ub_ = ua_ + 4; \
        const uint a_ = KR[ua_], b_ = KR[ub_]; \
        const uint r0_ = subgroupShuffle(shows_a_ ? a_ : b_, s0_), r1_ = subgroupShuffle(shows_a_ ? b_ : a_, s1_); \
        KR[ua_] = lo_ ? r0_ : r1_; KR[ub_] = lo_ ? r1_ : r0_; } }
#else
#define LOAD_K_WORDS(ROW, KR) { \
    [[unroll]] for (int i = 0; i < 2; ++i) WORDS(k_w4, k_w2, k_w1, KR, i * KW, (koff + ((ROW) + lane_r + 8 * i) * p.k_sl) / 2 + K_WORD(lane & 3, 0), KW, K_G) }
#endif
#define LOAD_V_WORDS(ROW, VR) { \
    [[unroll]] for (int j = 0; j < 4; ++j) WORDS(v_w4, v_w2, v_w1, VR, j * VW, (voff + ((ROW) + lane_c + (j & 1) + 8 * (j >> 1)) * p.v_sl) / 2 + V_WORD(lane_r, 0), VW, V_G) }
// The 32-bit word of Q at half X of the row from element AT (16-byte rows where p.vec_ok, else gathered).
#define Q_WORD(AT, X) (p.vec_ok != 0 ? q_words[(AT) / 2 + (X) / 2] : PAIR(q_data[(AT) + (X) * p.q_sd], q_data[(AT) + ((X) + 1) * p.q_sd]))
// Word w's halves into elements E and E + 1 of matrix M.
#define PUT2(M, E, w) { const f16vec2 h_ = unpackFloat2x16(w); M[E] = h_.x; M[(E) + 1] = h_.y; }
// A chunk's words (LOAD_K_WORDS, LOAD_V_WORDS) put into the operands as the products consume
// them (K_FRAG also puts Q's words into its A operands); V's words of keys past a chunk's KN zeroed.
#define ZERO_V_WORDS(VR, KN) if ((KN) < 16) { \
    [[unroll]] for (int j = 0; j < 4; ++j) if (lane_c + (j & 1) + 8 * (j >> 1) >= (KN)) [[unroll]] for (int x = 0; x < VW; ++x) VR[j * VW + x] = 0u; }
#define K_FRAG(KF, KR, kk) { PUT2(KF, 0, KR[2 * (kk)]) PUT2(KF, 2, KR[2 * (kk) + 1]) PUT2(KF, 4, KR[KW + 2 * (kk)]) PUT2(KF, 6, KR[KW + 2 * (kk) + 1]) }
#define V_FRAG(VF, VR, nn) { [[unroll]] for (int e = 0; e < 8; ++e) VF[e] = unpackFloat2x16(VR[(e & 3) * VW + (nn)])[e >> 2]; }
#endif

void main() {
    const int lane = int(gl_SubgroupInvocationID), sg = NSG > 1 ? int(gl_SubgroupID) : 0;
    const int lane_r = lane >> 2, lane_c = 2 * (lane & 3);
    // Built for subgroups of 32 (the layout above): otherwise NaN partials, never wrong numbers.
    const bool sized = gl_SubgroupSize == 32u && gl_NumSubgroups == uint(NSG);
#if !DEC_REGLOAD || DEC_CHUNKS == 2
    const int tb = sg * 16 * TS4;   // this subgroup's tile
#endif
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

    const int qoff = p.q_base + bl * p.q_sb;
    FRAG_A qf[FD];
#if DEC_REGLOAD && DEC_CHUNKS == 1
    // Q: this lane's words of its two rows (zeros where a row is none), straight into A operands.
    {
        uint qr[2 * KW];
        [[unroll]] for (int i = 0; i < 2; ++i) {
            // (A row that is none reads the buffer's first row, in bounds, and keeps zeros.)
            const int at = rh[i] < 0 ? 0 : qoff + rh[i] * p.q_sh + row_query(lane_r + 8 * i, chunk) * p.q_sl;
            [[unroll]] for (int w = 0; w < KW; ++w) {
                const int x = 2 * K_WORD(lane & 3, w);
                qr[i * KW + w] = rh[i] < 0 ? 0u : Q_WORD(at, x);
            }
        }
        [[unroll]] for (int kk = 0; kk < FD; ++kk) { K_FRAG(qf[kk], qr, kk) }   // A's element e sits where B's does
    }
#else
    // Q: the rows' query vectors (zeros where a row is none) through the tile, kept as A operands.
    for (int e = lane; e < 16 * (D / 8); e += 32) {
        const int r = e / (D / 8), u = e - r * (D / 8), h = row_head(r, chunk, hk, group, off, qb);
        const int at = qoff + h * p.q_sh + row_query(r, chunk) * p.q_sl;
#if DEC_REGLOAD
        // Logical column 16·kk + 2·c + 8·hh (a word: columns 2m, 2m + 1) is K's word 2·kk + hh of
        // lane c (K_WORD): the tile holds Q in that order, as the K words' B operands take it.
        uvec4 v = uvec4(0);
        if (h >= 0) {
            [[unroll]] for (int i = 0; i < 4; ++i) {
                const int m = 4 * u + i, x = 2 * K_WORD(m & 3, 2 * (m >> 3) + ((m >> 2) & 1));
                v[i] = Q_WORD(at, x);
            }
        }
        Ts4[tb + r * TS4 + u] = v;
#else
        Ts4[tb + r * TS4 + u] = h >= 0 ? unit_q_data(at, p.q_sd, u) : uvec4(0);
#endif
    }
    subgroup_sync();
    [[unroll]] for (int kk = 0; kk < FD; ++kk) coopMatLoadNV(qf[kk], Ts4, uint(tb + 2 * kk), uint(TS4), false);
#endif

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
// What both step loops share: a chunk's scores in log2 units (scale, score-mod, mask; -inf past
// its KN keys and for rows that are none), their largest per row of the lane into mx; the lazy
// maximum, whose one vote skips the row reductions on most steps; and the loop's unroll hint.
#if VKF_HAS_MASK_MOD
#define CHUNK_MASKED(CP, h, q, kv) ((CP) && !mask_mod(b, h, q, kv))
#else
#define CHUNK_MASKED(CP, h, q, kv) false
#endif
#define SCORE_CHUNK(SC, C0, KN, CP) \
    [[unroll]] for (int e = 0; e < 8; ++e) { \
        const int i = EL_HI(e), j = lane_c + EL_COL(e), h = rh[i]; \
        float s = NEG_INF; \
        if (h >= 0 && j < (KN)) { s = modded_l2(SC[e], b, h, rpos[i], (C0) + j); if (CHUNK_MASKED(CP, h, rpos[i], (C0) + j)) s = NEG_INF; } \
        SC[e] = s; mx[i] = max(mx[i], s); }
#if VKF_MAX_SCORES
#define TAKE_MAX_SCORES() { fx[0] = max(fx[0], mx[0]); fx[1] = max(fx[1], mx[1]); }
#else
#define TAKE_MAX_SCORES()
#endif
#define LAZY_MAX() \
    if (subgroupAny(mx[0] > fm[0] + TAU || mx[1] > fm[1] + TAU)) { \
        float al[2]; \
        bool rescale = false; \
        [[unroll]] for (int i = 0; i < 2; ++i) { \
            float m = mx[i]; \
            m = max(m, subgroupShuffleXor(m, 1)); m = max(m, subgroupShuffleXor(m, 2)); \
            const bool up = m > fm[i] + TAU; \
            rescale = rescale || up; \
            m = up ? m : fm[i]; \
            al[i] = exp2(fm[i] - m); \
            fm[i] = m; \
        } \
        if (subgroupAny(rescale)) { \
            [[unroll]] for (int nn = 0; nn < FDV; ++nn) \
                [[unroll]] for (int e = 0; e < 8; ++e) o[nn][e] *= al[EL_HI(e)]; \
            fl[0] *= al[0]; fl[1] *= al[1]; \
        } \
    }
// Not unrolled by default: the driver unrolled the step loop eight times (H100, 2026-12-06: a 90 KB
// loop, 185 KB of code in all), past what an SM's instruction caches hold.
#if DEC_DONT_UNROLL
#define STEP_LOOP [[dont_unroll]] while
#else
#define STEP_LOOP while
#endif
#if DEC_CHUNKS == 2
    // Two of the walk's 16-key chunks a step, both chunks' K and V loads issued at its start: twice
    // the bytes in flight a subgroup of DEC_CHUNKS 1 without its prefetch, in the registers Q
    // gives up (it is read from the tile at each product). A step with one chunk left gives the
    // second no keys (its loads repeat the first's rows, its scores are -inf, its V is zeroed).
    // A chunk's V rows past its keys are zeroed in the matrices, element by element, through the
    // B operand's measured layout (DEC_B_T).
#if DEC_B_T
#define B_KEY(e) (lane_c + ((e) & 1) + 8 * (((e) >> 1) & 1))   // CooperativeMatrixLayout.nvidiaMMAB
#else
#define B_KEY(e) (lane_r + 8 * ((e) >> 2))                      // the A layout (nvidiaMMA)
#endif
#define ZERO_V_PAST(VF, KN) if ((KN) < 16) { \
    [[unroll]] for (int nn = 0; nn < FDV; ++nn) [[unroll]] for (int e = 0; e < 8; ++e) if (B_KEY(e) >= (KN)) VF[nn][e] = float16_t(0.0); }
    STEP_LOOP (more) {
        const int c0a = k0, kna = min(16, k_stop - k0), rowa = CHUNK_ROW(k0);
        const bool cpa = partial;
        k0 += 16;
        more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
        int c0b = c0a, knb = 0, rowb = rowa;
        bool cpb = false;
        if (more) {
            c0b = k0; knb = min(16, k_stop - k0); rowb = CHUNK_ROW(k0); cpb = partial;
            k0 += 16;
            more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
        }
#if DEC_REGLOAD
        uint kra[2 * KW], vra[4 * VW], krb[2 * KW], vrb[4 * VW];
        LOAD_K_WORDS(rowa, kra) LOAD_V_WORDS(rowa, vra)
        LOAD_K_WORDS(rowb, krb) LOAD_V_WORDS(rowb, vrb)
#else
        FRAG_B kfa[FD], vfa[FDV], kfb[FD], vfb[FDV];
        LOAD_KV(rowa, kfa, vfa)
        LOAD_KV(rowb, kfb, vfb)
#endif
        FRAG_C sa = FRAG_C(0.0), sb = FRAG_C(0.0);
        [[unroll]] for (int kk = 0; kk < FD; ++kk) {
            FRAG_A q_;
            coopMatLoadNV(q_, Ts4, uint(tb + 2 * kk), uint(TS4), false);
#if DEC_REGLOAD
            FRAG_B ka_, kb_;
            K_FRAG(ka_, kra, kk) K_FRAG(kb_, krb, kk)
            sa = coopMatMulAddNV(q_, ka_, sa);
            sb = coopMatMulAddNV(q_, kb_, sb);
#else
            sa = coopMatMulAddNV(q_, kfa[kk], sa);
            sb = coopMatMulAddNV(q_, kfb[kk], sb);
#endif
        }
        float mx[2] = float[2](NEG_INF, NEG_INF);
        SCORE_CHUNK(sa, c0a, kna, cpa)
        SCORE_CHUNK(sb, c0b, knb, cpb)
        TAKE_MAX_SCORES()
        LAZY_MAX()
        [[unroll]] for (int e = 0; e < 8; ++e) {
            const float pa_ = exp2(sa[e] - fm[EL_HI(e)]), pb_ = exp2(sb[e] - fm[EL_HI(e)]);
            sa[e] = pa_; sb[e] = pb_;
            fl[EL_HI(e)] += pa_ + pb_;
        }
        const FRAG_A pa = FRAG_A(sa), pb = FRAG_A(sb);
#if DEC_REGLOAD
        ZERO_V_WORDS(vra, kna)
        ZERO_V_WORDS(vrb, knb)
        [[unroll]] for (int nn = 0; nn < FDV; ++nn) {
            FRAG_B va_, vb_;
            V_FRAG(va_, vra, nn) V_FRAG(vb_, vrb, nn)
            o[nn] = coopMatMulAddNV(pa, va_, o[nn]);
            o[nn] = coopMatMulAddNV(pb, vb_, o[nn]);
        }
#else
        ZERO_V_PAST(vfa, kna)
        ZERO_V_PAST(vfb, knb)
        [[unroll]] for (int nn = 0; nn < FDV; ++nn) {
            o[nn] = coopMatMulAddNV(pa, vfa[nn], o[nn]);
            o[nn] = coopMatMulAddNV(pb, vfb[nn], o[nn]);
        }
#endif
    }
#else
#if DEC_REGLOAD
    uint kr[2 * KW], vr[4 * VW];   // this chunk's words (LOAD_K_WORDS, LOAD_V_WORDS)
#if DEC_PREFETCH
    if (more) { const int r0_ = CHUNK_ROW(k0); LOAD_K_WORDS(r0_, kr) LOAD_V_WORDS(r0_, vr) }
#endif
#else
    FRAG_B kf[FD], vf[FDV];
#if DEC_PREFETCH
    if (more) LOAD_KV(CHUNK_ROW(k0), kf, vf)
#endif
#endif
    STEP_LOOP (more) {
        const int c0 = k0, kn = min(16, k_stop - k0), crow = CHUNK_ROW(k0);
        const bool cpart = partial;
        k0 += 16;
        more = seek(t, k0, k_stop, partial, kb0, row0, t_end, n_full, mrow, lkv, b);
#if DEC_REGLOAD
#if DEC_PREFETCH == 1
        uint kn_[2 * KW], vn_[4 * VW];
        if (more) { const int r_ = CHUNK_ROW(k0); LOAD_K_WORDS(r_, kn_) LOAD_V_WORDS(r_, vn_) }   // in flight while this chunk computes
#elif DEC_PREFETCH == 0
        LOAD_K_WORDS(crow, kr) LOAD_V_WORDS(crow, vr)
#endif
#if DEC_KLINES
        K_LINES_FIX(kr)
#endif
        // S = Q Kᵀ, K's words put into B operands as they are consumed.
        FRAG_C sc = FRAG_C(0.0);
        [[unroll]] for (int kk = 0; kk < FD; ++kk) {
            FRAG_B kf_;
            K_FRAG(kf_, kr, kk)
            sc = coopMatMulAddNV(qf[kk], kf_, sc);
        }
#if DEC_PREFETCH == 2
        const int nrow = more ? CHUNK_ROW(k0) : 0;
        if (more) LOAD_K_WORDS(nrow, kr)   // K's registers are free: the next chunk's K is in flight from here
#endif
#else
#if DEC_PREFETCH
        FRAG_B kn_[FD], vn_[FDV];
        if (more) LOAD_KV(CHUNK_ROW(k0), kn_, vn_)   // in flight while this chunk computes
#else
        LOAD_KV(crow, kf, vf)
#endif
        // S = Q Kᵀ.
        FRAG_C sc = FRAG_C(0.0);
        [[unroll]] for (int kk = 0; kk < FD; ++kk) sc = coopMatMulAddNV(qf[kk], kf[kk], sc);
#endif
        float mx[2] = float[2](NEG_INF, NEG_INF);
        SCORE_CHUNK(sc, c0, kn, cpart)
        TAKE_MAX_SCORES()
        LAZY_MAX()
        [[unroll]] for (int e = 0; e < 8; ++e) {
            const float pe = exp2(sc[e] - fm[EL_HI(e)]);
            sc[e] = pe;
            fl[EL_HI(e)] += pe;
        }
        const FRAG_A pa = FRAG_A(sc);
#if DEC_REGLOAD
        // Fewer than 16 keys: V's rows past them may hold anything (0 · NaN is NaN): zeros.
        ZERO_V_WORDS(vr, kn)
        [[unroll]] for (int nn = 0; nn < FDV; ++nn) {
            FRAG_B vf_;
            V_FRAG(vf_, vr, nn)
            o[nn] = coopMatMulAddNV(pa, vf_, o[nn]);
        }
#if DEC_PREFETCH == 2
        if (more) LOAD_V_WORDS(nrow, vr)
#elif DEC_PREFETCH == 1
        [[unroll]] for (int x = 0; x < 2 * KW; ++x) kr[x] = kn_[x];
        [[unroll]] for (int x = 0; x < 4 * VW; ++x) vr[x] = vn_[x];
#endif
#else
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
#endif
    }
#endif

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
            max_data[p.lse_base + w.split * p.lse_split_stride + prow[i]] = bad[i] ? nan : l != 0.0 ? vkf_from_l2(mxs) : NEG_INF;
#endif
        if (rh[i] >= 0 && (lane & 3) == 0)
            lse_data[p.lse_base + w.split * p.lse_split_stride + prow[i]] = bad[i] ? nan : l != 0.0 ? vkf_lse(fm[i], l) : NEG_INF;
    }
    [[unroll]] for (int nn = 0; nn < FDV; ++nn) {
        [[unroll]] for (int e = 0; e < 8; ++e) {
            const int i = EL_HI(e);
            if (rh[i] < 0) continue;
            const float l = lt[i];
#if DEC_REGLOAD
            const int col = V_PHYS(nn, lane_c + EL_COL(e));
#else
            const int col = nn * 16 + lane_c + EL_COL(e);
#endif
            o_data[p.o_base + w.split * p.o_split_stride + prow[i] * DV + col] = bad[i] ? nan : l != 0.0 ? o[nn][e] / l : 0.0;
        }
    }
}
