#version 450
// Block-sparse flash attention, forward, through VK_NV_cooperative_matrix (NVIDIA), fp16 in/out
// (or bf16 in/out through VK_KHR_cooperative_matrix with bfloat16 operands: IN_BF16).
// On a device with VK_KHR_cooperative_matrix the host rewrites the compiled SPIR-V to that
// extension (CooperativeMatrixKHRRewriter): K and V then load as typed B operands, without the
// MOVM transposes mentioned below (H200: +24-29%).
//
// One workgroup of NSG subgroups (32 lanes each) per (query tile of 16 * NSG * RPW rows inside one
// BlockMask query block, head, batch). Each subgroup owns RPW blocks of 16 query rows: their Q
// fragments stay in registers. Per step of SPLIT * BKV keys the workgroup stages the K and V tile in
// shared memory (NBUF buffers; with two, one barrier per step and the next tile's global loads in
// flight meanwhile); each subgroup computes, BKV keys at a time, S = Q K^T into fp32 accumulator fragments (16x16x16
// fp16 -> fp32) and runs the online softmax on them in registers: S and P never leave registers,
// P becomes an fp16 operand by conversion, and O (fp32 fragments) accumulates P V.
//
// This relies on the accumulator layout of NVIDIA's tensor cores, which the host measures before
// choosing this kernel (CooperativeMatrixLayout.nvidiaMMA): lane l holds rows l/4 and l/4 + 8 of
// each 16x16 fragment; element e is in row l/4 + 8 * (e >> 2), column 2 * (l % 4) + (e & 1)
// + 8 * ((e >> 1) & 1) (measured on an H200). So each element's row and column are known at compile time up to the lane, and a
// row's statistics reduce over the four lanes that share it with two shuffles.
//
// Softmax statistics are fp32 in base 2. The running maximum is raised only when a tile's maximum
// exceeds it by more than TAU (log2 units): P then stays below 2^TAU (fine in fp16) and O is
// rescaled only on those rare steps, which the final division by l makes exact. Without a
// score_mod the maximum is taken over raw scores and scale * log2(e) is folded into the exp2's
// FMA (the host picks VKF_RAW_MAX only for scale > 0).
//
// Defines: D (= DV, a multiple of 16 up to 256; QC above 128), BKV (a multiple of 16), NSG (subgroups per workgroup),
// RPW (16-row blocks per subgroup), NBUF (1 or 2 K/V buffers), SPLIT (computed steps per staged
// tile), VKF_RAW_MAX (0 or 1).
// Subgroup size must be 32. Bindings as flex_attention_fwd.comp.
#extension GL_GOOGLE_include_directive : require
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_16bit_storage : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_KHR_shader_subgroup_vote : require
#extension GL_EXT_control_flow_attributes : require

#define DV D
#ifndef RPW
#define RPW 1
#endif
#ifndef NBUF
#define NBUF 1
#endif
#ifndef VKF_RAW_MAX
#define VKF_RAW_MAX 0
#endif
// The lazy maximum's margin, in log2 units (see the header).
#define TAU 8.0
// VKF_NO_PREFETCH: K/V loaded from global memory right before they are stashed, not a tile ahead
// (fewer registers; faster at D = 128 with two row blocks per subgroup).
#ifndef VKF_NO_PREFETCH
#define VKF_NO_PREFETCH 0
#endif
// VKF_EXP16: P = exp2(s - m) evaluated in fp16, in pairs (the precision P is used in): fewer
// special-function cycles, which pays where a score_mod adds its own (tanh).
#ifndef VKF_EXP16
#define VKF_EXP16 0
#endif
// VKF_K8: S = Q K^T as 16x8x16 products, K^T in 16x8 operands. NVIDIA's compiler lays a 16x16
// fp16 fragment out for the A operand and re-transposes it (MOVM) wherever it serves as B; a 16x8
// type serves only as B here. (The transposes stay — the driver emits them for 16x8 B operands
// too — but the kernel gets smaller and faster: H200, causal D=64 205.0 -> 210.1 TFLOP/s, document
// 143.3 -> 147.9.) Needs the 16x8x16 shape; the host turns it on where the layout was measured.
#ifndef VKF_K8
#define VKF_K8 0
#endif
// VKF_ALWAYS_HALVES computes every step of a staged tile, also one past the keys (all masked);
// VKF_ALWAYS_RESCALE multiplies O by alpha at every step (alpha is 1 mostly). Both spare the
// compiler a merge of two versions of O, which it pays in register moves (seen in the SASS). The
// host sets both at D <= 64 (H200, causal D=64 196.8 -> 205.0 TFLOP/s, ALiBi 145.5 -> 155.8); at
// D = 128 they made the driver spill (188.5 -> 161.0). Through VK_KHR_cooperative_matrix it sets
// only VKF_ALWAYS_HALVES (the lazy rescale is faster there: causal D=64 255.7 -> 268.4).
#ifndef VKF_ALWAYS_HALVES
#define VKF_ALWAYS_HALVES 0
#endif
#ifndef VKF_ALWAYS_RESCALE
#define VKF_ALWAYS_RESCALE 0
#endif
// VKF_MMA_ROWSUM (with VKF_K8): the row sums of P by a product with a ones matrix (16x8x16, into a
// 16x8 accumulator per row block whose every column holds its rows' sums) instead of an add per
// element and two shuffles per row at the end; l then sums the fp16 P that O is built from.
// (H200, seed suite, two runs each: full D=64 218.8 / 218.7 -> 221.1 / 220.9 TFLOP/s, ALiBi
// 180.9 / 180.3 -> 183.7 / 186.3, causal D=128 190.4 / 193.3 -> 192.9 / 194.5, soft-cap
// 161.6 / 160.5 -> 159.9 / 159.9.)
// The host turns it off where the call returns the LSE: a sum of fp16 P is off by ~1e-5 relative,
// which the LSE (and a backward reading it) would carry; float32 P sums like PyTorch's kernel.
#ifndef VKF_MMA_ROWSUM
#define VKF_MMA_ROWSUM VKF_K8
#endif
// Last query tiles first (flex_attention_common.glsl): under causal-like masks they have the most
// keys (H200, causal D=64 175.8 -> 179.2 TFLOP/s).
#define VKF_REVERSE_TILES 1
// SPLIT: K/V tiles are staged SPLIT * BKV keys at a time (the barriers and the loads' loop are
// paid per staged tile) and computed BKV keys at a time (the score fragments stay small).
#ifndef SPLIT
#define SPLIT 1
#endif
#define STG (BKV * SPLIT)
#define BQ (16 * NSG * RPW)
layout(local_size_x = 32 * NSG) in;

// IN_F16 = OUT_F16 = 1, or IN_BF16 = OUT_BF16 = 1: bfloat16 operands, which the host retypes in the
// SPIR-V (BFloat16Retyper; as flex_mm.glsl says, nothing here computes with a float16_t then).
#include "flex_dtype.glsl"
#include "flex_attention_common.glsl"

// VKF_FLOAT_INDICES (host: lengths up to 2^22): where the splice offers score_mod_f, the score-mod
// takes its sums of indices (ALiBi's kv_idx - q_idx) from float indices kept per row and per tile,
// with no int-to-float conversion per score (a quarter-rate instruction, like exp2). Exact: both
// forms are the same integers below 2^24.
#ifndef VKF_FLOAT_INDICES
#define VKF_FLOAT_INDICES 0
#endif
// SCORE_L2: the score-mod of the raw product s (before the scale), in log2 units. Where the splice
// offers score_mod_l2, log2(e) is folded into the mod's constants
// and the scaled score (score_l2 = s * scale * log2(e)), not multiplied per score afterwards.
#if defined(VKF_HAS_SCORE_MOD_L2F) && VKF_FLOAT_INDICES
#define SCORE_L2(s, q, kv, qf, kvf) score_mod_l2f((s) * p.scale, (s) * g_c, g_b, g_h, q, kv, qf, kvf)
#elif defined(VKF_HAS_SCORE_MOD_L2)
#define SCORE_L2(s, q, kv, qf, kvf) score_mod_l2((s) * p.scale, (s) * g_c, g_b, g_h, q, kv)
#elif defined(VKF_HAS_SCORE_MOD_F) && VKF_FLOAT_INDICES
#define SCORE_L2(s, q, kv, qf, kvf) (score_mod_f((s) * p.scale, g_b, g_h, q, kv, qf, kvf) * LOG2E)
#else
#define SCORE_L2(s, q, kv, qf, kvf) (score_mod((s) * p.scale, g_b, g_h, q, kv) * LOG2E)
#endif

// VKF_SELECT_CHECKS: on tiles that need range and mask checks, evaluate the mods on every element
// and select, where the mods allow it (VKF_PURE_MODS, from the splice: no loads, no reports).
// Branching per element was slower where partial tiles are common (H200, sliding window 158.7 ->
// 180.8 TFLOP/s, causal D=128 185.8 -> 191.6).
#define VKF_SELECT_CHECKS VKF_PURE_MODS

// The same buffers seen 8 halves at a time, for the vector path.
layout(std430, set = 0, binding = VKF_BINDING_Q) readonly buffer QBuf4 { uvec4 q4[]; };
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBuf4 { uvec4 k4[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBuf4 { uvec4 v4[]; };
layout(std430, set = 0, binding = VKF_BINDING_O) writeonly buffer OBuf4 { uvec4 o4[]; };

// Shared memory in units of 8 halves. Rows of K and V are KS4 units apart: one unit of
// padding keeps the eight rows of a fragment load on distinct banks.
#define KS4 (D / 8 + 1)
#define TILE4 (STG * KS4)
// K tiles in NBUF buffers, then V tiles in NBUF buffers.
#define KV4 (2 * NBUF * TILE4)
// Q and O pass through shared memory QC columns at a time, rows QS4 units apart: all of D up to
// 128; above, a multiple of 16 up to 128 that divides D, which the host passes (128 for 256, 96
// for 192, 80 for 240, 16 for 208), so that they stage in the room of D = 128.
#ifndef QC
#define QC (D > 128 ? 128 : D)
#endif
#define QS4 (QC / 8 + 1)
#define STAGE4 (16 * NSG * QS4)
shared uvec4 kvs[KV4 > STAGE4 ? KV4 : STAGE4];

#define FRAG16 fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>
#define FRAG32 fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>
// 16x8 fragments (VKF_K8): lane l holds rows l/4 and l/4 + 8 (elements 0-1 and 2-3), columns
// 2 * (l % 4) and 2 * (l % 4) + 1 — the left or right half of the 16x16 layout (the host
// measures this too: CooperativeMatrixLayout.nvidiaMMANarrow).
#define FRAG16N fcoopmatNV<16, gl_ScopeSubgroup, 16, 8>
#define FRAG32N fcoopmatNV<32, gl_ScopeSubgroup, 16, 8>

// Element e of a fragment: in the upper 8 rows when EL_HI(e), column lane_c + EL_COL(e).
#define EL_HI(e) ((e) >> 2)
#define EL_COL(e) (((e) & 1) + 8 * (((e) >> 1) & 1))

// Per-invocation state shared by main() and the tile functions.
FRAG16 qf[RPW][D / 16];        // this subgroup's Q rows, as A operands
FRAG32 of[RPW][DV / 16];       // O, unnormalized (fp32 accumulators)
FRAG16 pf[RPW][BKV / 16];      // P of the current tile, as fp16 operands
float fm[RPW][2], fl[RPW][2];   // running max (log2 domain) and this lane's share of the row sum
#if VKF_MAX_SCORES
float fx[RPW][2];               // this lane's share of each row's exact maximum (fm moves lazily, by TAU)
#endif
#if VKF_MMA_ROWSUM
FRAG32N lsum[RPW];              // the row sums (VKF_MMA_ROWSUM): elements 0 and 2 are rows l/4 and l/4 + 8
#endif
int g_b, g_h, g_q0, g_rows, g_sg, g_lane_r, g_lane_c, g_mrow, g_nfull, g_npart, g_tiles_per_kvb, g_koff, g_voff;
bool g_allrows;                 // every row of this subgroup is inside the query range
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
vkf_mrow_t g_mrv[RPW][2];       // the mask's per-row values of this lane's rows
#endif
float g_c;                      // scale * log2(e)
float g_fq[RPW];                // this lane's first query row of each row block, as a float (SCORE_MOD)

// This batch's keys (VKF_KV_LENGTHS: its own length; tiles past it hold no key and add nothing).
#if VKF_KV_LENGTHS
int g_lkv;
#define G_LKV g_lkv
#else
#define G_LKV p.Lkv
#endif

// Tiles are walked by a cursor (blk, sub): sub-tile sub of the blk-th block of this row of
// blocks, full blocks first, then partial ones. Stepping it needs no division.
ivec2 next_tile(ivec2 c) { return c.y + 1 == g_tiles_per_kvb ? ivec2(c.x + 1, 0) : ivec2(c.x, c.y + 1); }

// The K/V block of the tile at cursor c: the BlockMask's index (a load), 0 past the last tile.
int tile_block(ivec2 c) {
    const int blk = c.x;
    if (p.dense != 0) return blk;
    if (blk >= g_nfull + g_npart) return 0;
    return blk < g_nfull ? full_kv_idx[g_mrow * p.kv_blocks + blk] : kv_idx[g_mrow * p.kv_blocks + blk - g_nfull];
}

// Key range of the tile at cursor c, whose block is kb.
void tile_range_kb(ivec2 c, int kb, out int k0, out int kn, out int pass) {
    pass = c.x < g_nfull ? 0 : 1;
    int k_start = kb * p.kv_bs, k_stop = min(k_start + p.kv_bs, G_LKV);
    k0 = k_start + c.y * STG;
    kn = min(STG, k_stop - k0);
}

// First row (in the tile) of the subgroup's row block rb.
int row_base(int rb) { return (rb * NSG + g_sg) * 16; }

// O += P V, V from the buffer at vbase.
void accumulate_pv(int vbase) {
    [[unroll]] for (int dd = 0; dd < DV / 16; ++dd) {
        [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
            FRAG16 vf;
            coopMatLoadNV(vf, kvs, uint(vbase + c * 16 * KS4 + dd * 2), uint(KS4), false);
            [[unroll]] for (int rb = 0; rb < RPW; ++rb) of[rb][dd] = coopMatMulAddNV(pf[rb][c], vf, of[rb][dd]);
        }
    }
}

// Scores, online softmax and P V for the BKV keys k0.. (kn of them valid) whose K rows start at
// kbase and V rows at vbase in the shared area.
void process_tile(int kbase, int vbase, int k0, int kn, int pass) {
    FRAG32 acc[RPW][BKV / 16];
#if VKF_K8
    // K^T as 16x8 operands (16x8x16 products): a type only ever used as B.
    [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
        FRAG32N a8[RPW][2];
        [[unroll]] for (int rb = 0; rb < RPW; ++rb) { a8[rb][0] = FRAG32N(0.0); a8[rb][1] = FRAG32N(0.0); }
        [[unroll]] for (int kk = 0; kk < D / 16; ++kk) {
            [[unroll]] for (int hh = 0; hh < 2; ++hh) {
                FRAG16N kt;
                coopMatLoadNV(kt, kvs, uint(kbase + (c * 16 + hh * 8) * KS4 + kk * 2), uint(KS4), true);
                [[unroll]] for (int rb = 0; rb < RPW; ++rb) a8[rb][hh] = coopMatMulAddNV(qf[rb][kk], kt, a8[rb][hh]);
            }
        }
        [[unroll]] for (int rb = 0; rb < RPW; ++rb)
            [[unroll]] for (int e = 0; e < 8; ++e) acc[rb][c][e] = a8[rb][(e >> 1) & 1][(e & 1) + 2 * (e >> 2)];
    }
#else
    [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
        [[unroll]] for (int rb = 0; rb < RPW; ++rb) acc[rb][c] = FRAG32(0.0);
        [[unroll]] for (int kk = 0; kk < D / 16; ++kk) {
            FRAG16 kt;
            coopMatLoadNV(kt, kvs, uint(kbase + c * 16 * KS4 + kk * 2), uint(KS4), true);
            [[unroll]] for (int rb = 0; rb < RPW; ++rb) acc[rb][c] = coopMatMulAddNV(qf[rb][kk], kt, acc[rb][c]);
        }
    }
#endif
    // Whole tile inside the keys, the rows and a full block: no element needs a check.
    const bool clean = kn == BKV && g_allrows && pass == 0;
    const float fk0 = float(k0 + g_lane_c);   // this lane's first key as a float (SCORE_MOD)
    float al[RPW][2], mx[RPW][2];   // alpha per row; this lane's share of each row's tile maximum
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
        const int rbase = row_base(rb);
        float mx0 = NEG_INF, mx1 = NEG_INF;
        if (clean) {
            [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
                [[unroll]] for (int e = 0; e < 8; ++e) {
                    float s = acc[rb][c][e];
#if !VKF_RAW_MAX
                    s = SCORE_L2(s, g_q0 + rbase + g_lane_r + 8 * EL_HI(e), k0 + c * 16 + g_lane_c + EL_COL(e),
                                 g_fq[rb] + float(8 * EL_HI(e)), fk0 + float(c * 16 + EL_COL(e)));
                    acc[rb][c][e] = s;
#endif
                    if (EL_HI(e) == 0) mx0 = max(mx0, s); else mx1 = max(mx1, s);
                }
            }
        } else {
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
            // The mask's per-key values, once per column this lane holds (not per element).
            vkf_mcol_t mc[BKV / 16][4];
            if (pass == 1) {
                [[unroll]] for (int c = 0; c < BKV / 16; ++c)
                    [[unroll]] for (int i = 0; i < 4; ++i) {
                        const int j = c * 16 + g_lane_c + (i & 1) + 8 * (i >> 1);
                        if (j < kn) mc[c][i] = vkf_mcol(g_b, g_h, k0 + j);
                    }
            }
#endif
            [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
                [[unroll]] for (int e = 0; e < 8; ++e) {
                    const int r = rbase + g_lane_r + 8 * EL_HI(e), j = c * 16 + g_lane_c + EL_COL(e);
#if VKF_SELECT_CHECKS
                    // Mods that load and report nothing run on every element (scores past the keys
                    // or rows are finite: their K or Q rows were staged as zeros), and the checks
                    // become selects: no branch per element.
                    float s = acc[rb][c][e];
#if !VKF_RAW_MAX
                    s = SCORE_L2(s, g_q0 + r, k0 + j, g_fq[rb] + float(8 * EL_HI(e)), fk0 + float(c * 16 + EL_COL(e)));
#endif
                    bool keep = r < g_rows && j < kn;
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
                    const bool allowed = mask_mod_rc(g_b, g_h, g_q0 + r, k0 + j, g_mrv[rb][EL_HI(e)], mc[c][(e & 1) + 2 * ((e >> 1) & 1)]);
                    keep = keep && (pass == 0 || allowed);
#elif VKF_HAS_MASK_MOD
                    const bool allowed = mask_mod(g_b, g_h, g_q0 + r, k0 + j);
                    keep = keep && (pass == 0 || allowed);
#endif
                    s = keep ? s : NEG_INF;
#else
                    float s = NEG_INF;
                    if (r < g_rows && j < kn) {
                        s = acc[rb][c][e];
#if !VKF_RAW_MAX
                        s = SCORE_L2(s, g_q0 + r, k0 + j, g_fq[rb] + float(8 * EL_HI(e)), fk0 + float(c * 16 + EL_COL(e)));
#endif
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
                        if (pass == 1 && !mask_mod_rc(g_b, g_h, g_q0 + r, k0 + j, g_mrv[rb][EL_HI(e)], mc[c][(e & 1) + 2 * ((e >> 1) & 1)])) s = NEG_INF;
#elif VKF_HAS_MASK_MOD
                        if (pass == 1 && !mask_mod(g_b, g_h, g_q0 + r, k0 + j)) s = NEG_INF;
#endif
                    }
#endif
                    acc[rb][c][e] = s;
                    if (EL_HI(e) == 0) mx0 = max(mx0, s); else mx1 = max(mx1, s);
                }
            }
        }
#if VKF_RAW_MAX
        mx0 *= g_c; mx1 *= g_c;
#endif
        mx[rb][0] = mx0; mx[rb][1] = mx1;
        al[rb][0] = 1.0; al[rb][1] = 1.0;
#if VKF_MAX_SCORES
        fx[rb][0] = max(fx[rb][0], mx0); fx[rb][1] = max(fx[rb][1], mx1);
#endif
    }
    // The running max is raised only by more than TAU. Where no lane holds a score above its row's
    // max + TAU (most tiles once a row has seen a few), one vote skips the row reductions (H200,
    // causal: D=64 175.8 -> 179.3 TFLOP/s, D=128 154.3 -> 158.6).
    bool over = false;
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) over = over || mx[rb][0] > fm[rb][0] + TAU || mx[rb][1] > fm[rb][1] + TAU;
    if (subgroupAny(over))
    {
        bool rescale = false;
        [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
            [[unroll]] for (int i = 0; i < 2; ++i) {
                float m = mx[rb][i];
                m = max(m, subgroupShuffleXor(m, 1)); m = max(m, subgroupShuffleXor(m, 2));
                // alpha rescales O and l when the max moves.
                const bool up = m > fm[rb][i] + TAU;
                rescale = rescale || up;
                m = up ? m : fm[rb][i];
                al[rb][i] = exp2(fm[rb][i] - m);
                fm[rb][i] = m;
            }
        }
#if !VKF_ALWAYS_RESCALE
        if (subgroupAny(rescale)) {
            [[unroll]] for (int rb = 0; rb < RPW; ++rb)
                [[unroll]] for (int dd = 0; dd < DV / 16; ++dd)
                    [[unroll]] for (int e = 0; e < 8; ++e) of[rb][dd][e] *= al[rb][EL_HI(e)];
            // l too, here: alpha then ends with the branch instead of living on with its two
            // versions (H200, D=128: causal 191.2 -> 194.7, full 191.5 -> 198.1 TFLOP/s).
#if VKF_MMA_ROWSUM
            [[unroll]] for (int rb = 0; rb < RPW; ++rb)
                [[unroll]] for (int e = 0; e < 4; ++e) lsum[rb][e] *= al[rb][e >> 1];
#else
            [[unroll]] for (int rb = 0; rb < RPW; ++rb) { fl[rb][0] *= al[rb][0]; fl[rb][1] *= al[rb][1]; }
#endif
        }
#endif
    }
#if VKF_ALWAYS_RESCALE
    [[unroll]] for (int rb = 0; rb < RPW; ++rb)
        [[unroll]] for (int dd = 0; dd < DV / 16; ++dd)
            [[unroll]] for (int e = 0; e < 8; ++e) of[rb][dd][e] *= al[rb][EL_HI(e)];
#if VKF_MMA_ROWSUM
    [[unroll]] for (int rb = 0; rb < RPW; ++rb)
        [[unroll]] for (int e = 0; e < 4; ++e) lsum[rb][e] *= al[rb][e >> 1];
#endif
#endif
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
        const float m0 = fm[rb][0], m1 = fm[rb][1];
#if !VKF_MMA_ROWSUM
        float s0 = 0.0, s1 = 0.0;   // this lane's share of the tile's row sums
#endif
        [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
#if VKF_EXP16
            [[unroll]] for (int e = 0; e < 8; e += 2) {
                const float m = EL_HI(e) == 0 ? m0 : m1;
#if VKF_RAW_MAX
                const vec2 x = vec2(fma(acc[rb][c][e], g_c, -m), fma(acc[rb][c][e + 1], g_c, -m));
#else
                const vec2 x = vec2(acc[rb][c][e] - m, acc[rb][c][e + 1] - m);
#endif
                const f16vec2 ph = exp2(f16vec2(x));
                pf[rb][c][e] = ph.x; pf[rb][c][e + 1] = ph.y;
#if !VKF_MMA_ROWSUM
                const vec2 pj = vec2(ph);
                if (EL_HI(e) == 0) s0 += pj.x + pj.y; else s1 += pj.x + pj.y;
#endif
            }
#else
            [[unroll]] for (int e = 0; e < 8; ++e) {
                const float m = EL_HI(e) == 0 ? m0 : m1;
#if VKF_RAW_MAX
                const float pj = exp2(fma(acc[rb][c][e], g_c, -m));
#else
                const float pj = exp2(acc[rb][c][e] - m);
#endif
                acc[rb][c][e] = pj;
#if !VKF_MMA_ROWSUM
                if (EL_HI(e) == 0) s0 += pj; else s1 += pj;
#endif
            }
            pf[rb][c] = FRAG16(acc[rb][c]);
#endif
        }
#if VKF_MMA_ROWSUM
        const FRAG16N ones = FRAG16N(1.0);
        [[unroll]] for (int c = 0; c < BKV / 16; ++c) lsum[rb] = coopMatMulAddNV(pf[rb][c], ones, lsum[rb]);
#elif !VKF_ALWAYS_RESCALE
        fl[rb][0] += s0; fl[rb][1] += s1;   // scaled by alpha with O, above
#else
        fl[rb][0] = fl[rb][0] * al[rb][0] + s0; fl[rb][1] = fl[rb][1] * al[rb][1] + s1;
#endif
    }
    accumulate_pv(vbase);
}

// Eight halves of a strided row, packed like a uvec4 load.
uvec4 gather8(int base, int stride, bool k) {
    uvec4 w;
    [[unroll]] for (int i = 0; i < 4; ++i)
        w[i] = k ? PAIR(k_data[base + 2 * i * stride], k_data[base + (2 * i + 1) * stride])
                 : PAIR(v_data[base + 2 * i * stride], v_data[base + (2 * i + 1) * stride]);
    return w;
}

// Each invocation moves PRE 8-half units of K and of V per tile: global -> registers (fetch,
// issued a tile ahead) -> shared memory (stash).
#define PRE ((STG * (D / 8) + 32 * NSG - 1) / (32 * NSG))
uvec4 pre_k[PRE], pre_v[PRE];

void fetch(ivec2 c, int kb, int lid) {
    int k0, kn, pass;
    tile_range_kb(c, kb, k0, kn, pass);
    // The layout branch stays inside the loop: taken out of it (one branch for all units) the
    // kernel ran 18% slower at D = 64 (H200, causal 210.1 -> 171.6 TFLOP/s).
    [[unroll]] for (int a = 0; a < PRE; ++a) {
        const int e = lid + a * 32 * NSG;
        const int j = e / (D / 8), d8 = e - j * (D / 8);
        const bool ok = e < STG * (D / 8) && j < kn;
        if (p.vec_ok != 0) {
            // The offset of a row that is loaded is >= 0 and a multiple of 8 (vec_ok), so a shift
            // divides it: a signed division by 8 costs three more instructions per load (H200,
            // two runs each: full D=128 197.7 / 198.1 -> 200.8 / 200.3 TFLOP/s, causal D=128
            // 193.6 / 192.1 -> 194.8 / 196.2, ALiBi 183.9 / 185.6 -> 187.0 / 185.8).
            pre_k[a] = ok ? k4[((g_koff + (k0 + j) * p.k_sl) >> 3) + d8] : uvec4(0);
            pre_v[a] = ok ? v4[((g_voff + (k0 + j) * p.v_sl) >> 3) + d8] : uvec4(0);
        } else {
            pre_k[a] = ok ? gather8(g_koff + (k0 + j) * p.k_sl + d8 * 8 * p.k_sd, p.k_sd, true) : uvec4(0);
            pre_v[a] = ok ? gather8(g_voff + (k0 + j) * p.v_sl + d8 * 8 * p.v_sd, p.v_sd, false) : uvec4(0);
        }
    }
}

void stash(int buf, int lid) {
    [[unroll]] for (int a = 0; a < PRE; ++a) {
        const int e = lid + a * 32 * NSG;
        if (e < STG * (D / 8)) {
            const int j = e / (D / 8), d8 = e - j * (D / 8);
            kvs[buf * TILE4 + j * KS4 + d8] = pre_k[a];
            kvs[(NBUF + buf) * TILE4 + j * KS4 + d8] = pre_v[a];
        }
    }
}

void main() {
    const int lid = int(gl_LocalInvocationIndex);
    const int sg = lid / 32, lane = lid % 32;
    WorkgroupTile wt;
    if (!workgroup_tile(BQ, wt)) return;
    const int b = wt.b, bl = wt.bl, h = wt.h, hl = wt.hl, hk = wt.hk, qb = wt.qb, q0 = wt.q0, rows = wt.rows;

    g_sg = sg; g_lane_r = lane / 4; g_lane_c = 2 * (lane % 4);
    g_b = b; g_h = h; g_q0 = q0; g_rows = rows;
#if VKF_KV_LENGTHS
    g_lkv = KV_LEN(b);
#endif
    g_allrows = row_base(RPW - 1) + 16 <= rows;
    g_c = p.scale * LOG2E;
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) g_fq[rb] = float(q0 + row_base(rb) + g_lane_r);
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
        fm[rb][0] = -1e30; fm[rb][1] = -1e30; fl[rb][0] = 0.0; fl[rb][1] = 0.0;
#if VKF_MAX_SCORES
        fx[rb][0] = -1e30; fx[rb][1] = -1e30;
#endif
#if VKF_MMA_ROWSUM
        lsum[rb] = FRAG32N(0.0);
#endif
        [[unroll]] for (int dd = 0; dd < DV / 16; ++dd) of[rb][dd] = FRAG32(0.0);
    }

    // Q: each subgroup stages its own 16-row blocks (rows past the end are zero) through its
    // part of the shared area, then keeps them as fragments.
    const int qoff = p.q_base + bl * p.q_sb + hl * p.q_sh;
    const int mine = sg * 16 * QS4;
    // Above D = 128 the same, 128 columns at a time. (The two forms stay apart so that the
    // kernels up to 128 compile to the SPIR-V that docs/performance.md measured; a one-chunk loop
    // is not unrolled by spirv-opt around the inner loop. Likewise for O below.)
#if D <= 128
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
        const int first = row_base(rb);
        for (int e = lane; e < 16 * (D / 8); e += 32) {
            const int r = e / (D / 8), d8 = e - r * (D / 8);
            uvec4 w = uvec4(0);
            if (first + r < rows) {
                const int at = qoff + (q0 + first + r) * p.q_sl;
                if (p.vec_ok != 0) w = q4[at / 8 + d8];
                else {
                    [[unroll]] for (int i = 0; i < 4; ++i)
                        w[i] = PAIR(q_data[at + (d8 * 8 + 2 * i) * p.q_sd], q_data[at + (d8 * 8 + 2 * i + 1) * p.q_sd]);
                }
            }
            kvs[mine + r * QS4 + d8] = w;
        }
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        [[unroll]] for (int kk = 0; kk < D / 16; ++kk) coopMatLoadNV(qf[rb][kk], kvs, uint(mine + kk * 2), uint(QS4), false);
        subgroupBarrier();
    }
#else
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
        const int first = row_base(rb);
        [[unroll]] for (int c0 = 0; c0 < D; c0 += QC) {
            for (int e = lane; e < 16 * (QC / 8); e += 32) {
                const int r = e / (QC / 8), u = e - r * (QC / 8), d8 = c0 / 8 + u;
                uvec4 w = uvec4(0);
                if (first + r < rows) {
                    const int at = qoff + (q0 + first + r) * p.q_sl;
                    if (p.vec_ok != 0) w = q4[at / 8 + d8];
                    else {
                        [[unroll]] for (int i = 0; i < 4; ++i)
                            w[i] = PAIR(q_data[at + (d8 * 8 + 2 * i) * p.q_sd], q_data[at + (d8 * 8 + 2 * i + 1) * p.q_sd]);
                    }
                }
                kvs[mine + r * QS4 + u] = w;
            }
            subgroupMemoryBarrierShared();
            subgroupBarrier();
            [[unroll]] for (int kk = 0; kk < QC / 16; ++kk) coopMatLoadNV(qf[rb][c0 / 16 + kk], kvs, uint(mine + kk * 2), uint(QS4), false);
            subgroupBarrier();
        }
    }
#endif
    barrier();   // the Q staging area is the K/V area

    g_mrow = ((p.mask_b == 1 ? 0 : b) * p.mask_h + (p.mask_h == 1 ? 0 : h)) * p.q_blocks + qb;
    g_nfull = p.dense != 0 ? p.kv_blocks : full_kv_num[g_mrow];
    g_npart = p.dense != 0 ? 0 : kv_num[g_mrow];
    g_tiles_per_kvb = (p.kv_bs + STG - 1) / STG;
    g_koff = p.k_base + bl * p.k_sb + (hk - p.hk_start) * p.k_sh;
    g_voff = p.v_base + bl * p.v_sb + (hk - p.hk_start) * p.v_sh;
    const int total_tiles = (g_nfull + g_npart) * g_tiles_per_kvb;
#if VKF_HAS_MASK_MOD && defined(VKF_HAS_MASK_RC)
    if (g_npart > 0) {
        [[unroll]] for (int rb = 0; rb < RPW; ++rb)
            [[unroll]] for (int i = 0; i < 2; ++i) {
                const int r = row_base(rb) + g_lane_r + 8 * i;
                if (r < rows) g_mrv[rb][i] = vkf_mrow(b, h, q0 + r);
            }
    }
#endif

    // Software pipeline: tile t + 1's global loads are in flight while tile t computes. With two
    // buffers, tile t + 1 is stashed into the buffer tile t - 1 used, which every subgroup left
    // before the last barrier: one barrier per tile.
    // Block indices are loaded one tile before they are needed (kb_*), so that neither the loads
    // of a tile nor its key range wait on an index load (H200: causal D=128 181 -> 186 TFLOP/s,
    // document 137.5 -> 143.3).
    ivec2 cur = ivec2(0), ahead = ivec2(0);   // the tile computed, the tile fetched next
    int kb_cur = tile_block(cur);
#if !VKF_NO_PREFETCH
    if (total_tiles > 0) fetch(ahead, kb_cur, lid);
    ahead = next_tile(ahead);
    int kb_ahead = tile_block(ahead);
#else
    int kb_next = tile_block(next_tile(cur));
#endif
    for (int t = 0; t < total_tiles; ++t) {
        const int buf = NBUF == 2 ? (t & 1) : 0;
#if NBUF == 1
        if (t > 0) barrier();
#endif
#if VKF_NO_PREFETCH
        fetch(cur, kb_cur, lid);
#endif
        stash(buf, lid);
        barrier();
#if !VKF_NO_PREFETCH
        if (t + 1 < total_tiles) fetch(ahead, kb_ahead, lid);
        const int kb_following = kb_ahead;
        ahead = next_tile(ahead);
        kb_ahead = tile_block(ahead);
#else
        const int kb_following = kb_next;
        kb_next = tile_block(next_tile(next_tile(cur)));
#endif
        int k0, kn, pass;
        tile_range_kb(cur, kb_cur, k0, kn, pass);
        [[unroll]] for (int hf = 0; hf < SPLIT; ++hf)
            if (VKF_ALWAYS_HALVES != 0 || kn > hf * BKV)
                process_tile(buf * TILE4 + hf * BKV * KS4, (NBUF + buf) * TILE4 + hf * BKV * KS4, k0 + hf * BKV, min(kn - hf * BKV, BKV), pass);
        cur = next_tile(cur);
        kb_cur = kb_following;
    }
    barrier();   // the O staging area is the K/V area

    // Row sums over the four lanes of each row; O / l (0 for rows with no key) as fp16 through
    // this subgroup's part of the shared area, written with the output's strides; then the LSE.
    const int ooff = p.o_base + bl * p.o_sb + hl * p.o_sh;
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
#if VKF_MMA_ROWSUM
        fl[rb][0] = lsum[rb][0]; fl[rb][1] = lsum[rb][2];   // whole rows already
#else
        [[unroll]] for (int i = 0; i < 2; ++i) {
            fl[rb][i] += subgroupShuffleXor(fl[rb][i], 1);
            fl[rb][i] += subgroupShuffleXor(fl[rb][i], 2);
        }
#endif
        // An exact 0 is an empty row; a NaN sum (a NaN score) stays NaN, as in PyTorch.
#if VKF_SINKS
        // The head's sink joins each row's denominator: M = max(m, sink), l' = l 2^(m - M) +
        // 2^(sink - M); O is scaled by 2^(m - M) / l' and the LSE is (M + log2 l') ln 2.
        float sink_f[2];
        [[unroll]] for (int i = 0; i < 2; ++i) {
            const float s2 = sinks[g_h] * LOG2E, M = max(fm[rb][i], s2);
            sink_f[i] = exp2(fm[rb][i] - M);
            fl[rb][i] = fl[rb][i] * sink_f[i] + exp2(s2 - M);
            fm[rb][i] = M;
        }
        const float inv0 = fl[rb][0] != 0.0 ? sink_f[0] / fl[rb][0] : 0.0, inv1 = fl[rb][1] != 0.0 ? sink_f[1] / fl[rb][1] : 0.0;
#else
        const float inv0 = fl[rb][0] != 0.0 ? 1.0 / fl[rb][0] : 0.0, inv1 = fl[rb][1] != 0.0 ? 1.0 / fl[rb][1] : 0.0;
#endif
#if DV <= 128
        [[unroll]] for (int dd = 0; dd < DV / 16; ++dd) {
            [[unroll]] for (int e = 0; e < 8; ++e) of[rb][dd][e] = OUT_ROUND(of[rb][dd][e] * (EL_HI(e) == 0 ? inv0 : inv1));
            FRAG16 oh = FRAG16(of[rb][dd]);
            coopMatStoreNV(oh, kvs, uint(mine + dd * 2), uint(QS4), false);
        }
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        const int first = row_base(rb);
        for (int e = lane; e < 16 * (DV / 8); e += 32) {
            const int r = e / (DV / 8), d8 = e - r * (DV / 8);
            if (first + r < rows) {
                const uvec4 w = kvs[mine + r * QS4 + d8];
                const int at = ooff + (q0 + first + r) * p.o_sl;
                if (p.vec_ok != 0) o4[at / 8 + d8] = w;
                else {
                    [[unroll]] for (int i = 0; i < 4; ++i) {
                        o_data[at + (d8 * 8 + 2 * i) * p.o_sd] = OUT_LO(w[i]);
                        o_data[at + (d8 * 8 + 2 * i + 1) * p.o_sd] = OUT_HI(w[i]);
                    }
                }
            }
        }
        subgroupBarrier();
#else
        const int first = row_base(rb);
        [[unroll]] for (int c0 = 0; c0 < DV; c0 += QC) {
            [[unroll]] for (int dd = 0; dd < QC / 16; ++dd) {
                [[unroll]] for (int e = 0; e < 8; ++e) of[rb][c0 / 16 + dd][e] = OUT_ROUND(of[rb][c0 / 16 + dd][e] * (EL_HI(e) == 0 ? inv0 : inv1));
                FRAG16 oh = FRAG16(of[rb][c0 / 16 + dd]);
                coopMatStoreNV(oh, kvs, uint(mine + dd * 2), uint(QS4), false);
            }
            subgroupMemoryBarrierShared();
            subgroupBarrier();
            for (int e = lane; e < 16 * (QC / 8); e += 32) {
                const int r = e / (QC / 8), u = e - r * (QC / 8), d8 = c0 / 8 + u;
                if (first + r < rows) {
                    const uvec4 w = kvs[mine + r * QS4 + u];
                    const int at = ooff + (q0 + first + r) * p.o_sl;
                    if (p.vec_ok != 0) o4[at / 8 + d8] = w;
                    else {
                        [[unroll]] for (int i = 0; i < 4; ++i) {
                            o_data[at + (d8 * 8 + 2 * i) * p.o_sd] = OUT_LO(w[i]);
                            o_data[at + (d8 * 8 + 2 * i + 1) * p.o_sd] = OUT_HI(w[i]);
                        }
                    }
                }
            }
            subgroupBarrier();
        }
#endif
#if VKF_MAX_SCORES
        // The exact maxima over the four lanes of each row, in log2 units, so times ln 2.
        [[unroll]] for (int i = 0; i < 2; ++i) {
            fx[rb][i] = max(fx[rb][i], subgroupShuffleXor(fx[rb][i], 1));
            fx[rb][i] = max(fx[rb][i], subgroupShuffleXor(fx[rb][i], 2));
        }
        if (p.write_max != 0 && lane % 4 == 0) {
            [[unroll]] for (int i = 0; i < 2; ++i) {
                const int r = first + g_lane_r + 8 * i;
                if (r < rows)
                    max_data[p.lse_base + bl * p.lse_sb + hl * p.lse_sh + (q0 + r) * p.lse_sl] =
                        isnan(fl[rb][i]) ? uintBitsToFloat(0x7FC00000u) : fx[rb][i] > -1e30 ? vkf_from_l2(fx[rb][i]) : NEG_INF;
            }
        }
#endif
        if (p.write_lse != 0 && lane % 4 == 0) {
            [[unroll]] for (int i = 0; i < 2; ++i) {
                const int r = first + g_lane_r + 8 * i;
                if (r < rows)
                    lse_data[p.lse_base + bl * p.lse_sb + hl * p.lse_sh + (q0 + r) * p.lse_sl] =
                        fl[rb][i] != 0.0 ? vkf_lse(fm[rb][i], fl[rb][i]) : NEG_INF;
            }
        }
    }
}
