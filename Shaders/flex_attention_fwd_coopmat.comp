#version 450
// Block-sparse flash attention, forward, through VK_NV_cooperative_matrix (NVIDIA), fp16 in/out.
//
// One workgroup of NSG subgroups (32 lanes each) per (query tile of 16*NSG rows inside one
// BlockMask query block, head, batch). Each subgroup owns 16 query rows: its Q fragments stay in
// registers; per BKV keys it computes S = Q K^T into fp32 accumulator fragments (16x16x16
// fp16 -> fp32), applies scale, score_mod and (partial blocks) mask_mod to the fragment
// elements — a fragment of row indices and one of column indices, loaded once with the same
// layout, tell each element its (row, column) — then stores S to shared memory, where pairs of
// lanes run the online softmax of a row (fp32 statistics, base 2, running max from -1e30) and
// write P as fp16; O (fp32 fragments) is rescaled and accumulates P V.
//
// Defines: D (= DV, a multiple of 16), BKV (a multiple of 16), NSG (subgroups per workgroup),
// RPW (16-row blocks per subgroup: 1 or 2; with 2 each K/V fragment load feeds two products).
// Subgroup size must be 32. Bindings as flex_attention_fwd.comp. spirv-opt survives this shader
// (a test compiles every variant optimized); it crashes on some other NV cooperative-matrix code.
#extension GL_GOOGLE_include_directive : require
#extension GL_NV_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_16bit_storage : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_EXT_control_flow_attributes : require
#extension GL_KHR_shader_subgroup_vote : require
// VKF_FAST_PATH: 0 shared-memory softmax only, 1 registers where the layout allows (checked at run
// time) else shared memory, 2 registers only (NVIDIA; another layout reports error 4).
#ifndef VKF_FAST_PATH
#define VKF_FAST_PATH 1
#endif

#define DV D
#ifndef RPW
#define RPW 1
#endif
#define BQ (16 * NSG * RPW)
// Lanes per row in the softmax: 32 lanes over the subgroup's 16 * RPW rows.
#define LPR (2 / RPW)
layout(local_size_x = 32 * NSG) in;

#define IN_T float16_t
#define OUT_T float16_t
#include "flex_attention_common.glsl"

// The same buffers seen 8 halves at a time, for the vector path.
layout(std430, set = 0, binding = 0) readonly buffer QBuf4 { uvec4 q4[]; };
layout(std430, set = 0, binding = 1) readonly buffer KBuf4 { uvec4 k4[]; };
layout(std430, set = 0, binding = 2) readonly buffer VBuf4 { uvec4 v4[]; };
layout(std430, set = 0, binding = 3) writeonly buffer OBuf4 { uvec4 o4[]; };


// Row strides in shared memory (elements), padded to keep rows 16-byte aligned and off one bank.
#define KS (D + 8)
#define SS (BKV + 4)
#define PS (BKV + 8)
// K and V tiles side by side; the same space stages Q (16 * NSG rows at a time) at the start and
// O (as many rows) at the end. The score area holds the index tables at the start.
#define KV_HALVES (2 * BKV * KS)
#define STAGE_HALVES (16 * NSG * KS)
shared float16_t kv16[KV_HALVES > STAGE_HALVES ? KV_HALVES : STAGE_HALVES];
#if VKF_FAST_PATH == 2
// Register path only: the score area just holds the index tables at the start.
shared float s32[512];
#else
shared float s32[BQ * SS > 512 ? BQ * SS : 512];
shared float16_t p16[BQ * PS];
#endif
shared float m_s[BQ], l_s[BQ], a_s[BQ];

// Writes 8 halves packed in a uvec4 to shared memory at kv16[at].
void put8(int at, uvec4 w) {
    f16vec2 a = unpackFloat2x16(w.x), b2 = unpackFloat2x16(w.y), c2 = unpackFloat2x16(w.z), d2 = unpackFloat2x16(w.w);
    kv16[at] = a.x; kv16[at + 1] = a.y; kv16[at + 2] = b2.x; kv16[at + 3] = b2.y;
    kv16[at + 4] = c2.x; kv16[at + 5] = c2.y; kv16[at + 6] = d2.x; kv16[at + 7] = d2.y;
}
uvec4 get8(int at) {
    return uvec4(packFloat2x16(f16vec2(kv16[at], kv16[at + 1])), packFloat2x16(f16vec2(kv16[at + 2], kv16[at + 3])),
                 packFloat2x16(f16vec2(kv16[at + 4], kv16[at + 5])), packFloat2x16(f16vec2(kv16[at + 6], kv16[at + 7])));
}

#define FRAG16 fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>
#define FRAG32 fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>

// Per-invocation state shared by main() and the tile functions.
FRAG16 qf[RPW][D / 16];
FRAG32 of[RPW][DV / 16];
FRAG32 rowf, colf;
// Fast path: when every lane holds rows (lane / 4) and (lane / 4 + 8) of each accumulator (NVIDIA's
// layout, checked at run time), S and P stay in registers and rows reduce with two shuffles.
bool g_fast;
float fm[RPW][2], fl[RPW][2];
int g_b, g_h, g_q0, g_rows, g_sg, g_lane, g_mrow, g_nfull, g_npart, g_tiles_per_kvb, g_koff, g_voff;

// Key range of tile t of this row of blocks: full blocks first, then partial ones.
void tile_range(int t, out int k0, out int kn, out int pass) {
    int blk = t / g_tiles_per_kvb, sub = t - blk * g_tiles_per_kvb;
    pass = blk < g_nfull ? 0 : 1;
    int i = pass == 0 ? blk : blk - g_nfull;
    int kb = p.dense != 0 ? i : (pass == 0 ? full_kv_idx[g_mrow * p.kv_blocks + i] : kv_idx[g_mrow * p.kv_blocks + i]);
    int k_start = kb * p.kv_bs, k_stop = min(k_start + p.kv_bs, p.Lkv);
    k0 = k_start + sub * BKV;
    kn = min(BKV, k_stop - k0);
}

// First row (in the tile) of the subgroup's row block rb.
int row_base(int rb) { return (rb * NSG + g_sg) * 16; }

#if VKF_FAST_PATH != 2
// Scores, softmax and P V for the K/V tile already in shared memory.
void process_tile(int k0, int kn, int pass) {
    // S = Q K^T, then scale, mods and mask on the fragment elements.
    [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
        FRAG32 acc[RPW];
        [[unroll]] for (int rb = 0; rb < RPW; ++rb) acc[rb] = FRAG32(0.0);
        [[unroll]] for (int kk = 0; kk < D / 16; ++kk) {
            FRAG16 kt;
            coopMatLoadNV(kt, kv16, uint(c * 16 * KS + kk * 16), uint(KS), true);
            [[unroll]] for (int rb = 0; rb < RPW; ++rb) acc[rb] = coopMatMulAddNV(qf[rb][kk], kt, acc[rb]);
        }
        [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
            int rbase = row_base(rb);
            [[unroll]] for (int e = 0; e < acc[rb].length(); ++e) {
                int r = rbase + int(rowf[e]), j = c * 16 + int(colf[e]);
                int qi = g_q0 + r, ki = k0 + j;
                float s = NEG_INF;
                if (r < g_rows && j < kn) {
                    s = acc[rb][e] * p.scale;
#if VKF_HAS_SCORE_MOD
                    s = score_mod(s, g_b, g_h, qi, ki);
#endif
#if VKF_HAS_MASK_MOD
                    if (pass == 1 && !mask_mod(g_b, g_h, qi, ki)) s = NEG_INF;
#endif
                }
                acc[rb][e] = s * LOG2E;
            }
            coopMatStoreNV(acc[rb], s32, uint(rbase * SS + c * 16), uint(SS), false);
        }
    }
    subgroupMemoryBarrierShared();
    subgroupBarrier();

    // Online softmax: LPR lanes per row, each over BKV / LPR columns.
    {
        int rl = g_lane / LPR, side = g_lane % LPR;
        int r = row_base(rl / 16) + rl % 16;
        int c0 = side * (BKV / LPR);
        float m_old = m_s[r], mx = m_old;
        [[unroll]] for (int j = 0; j < BKV / LPR; ++j) mx = max(mx, s32[r * SS + c0 + j]);
#if LPR == 2
        mx = max(mx, subgroupShuffleXor(mx, 1));
#endif
        float sum = 0.0;
        [[unroll]] for (int j = 0; j < BKV / LPR; ++j) {
            float pj = exp2(s32[r * SS + c0 + j] - mx);
            p16[r * PS + c0 + j] = float16_t(pj);
            sum += pj;
        }
#if LPR == 2
        sum += subgroupShuffleXor(sum, 1);
#endif
        float alpha = exp2(m_old - mx);
        if (side == 0) { m_s[r] = mx; l_s[r] = l_s[r] * alpha + sum; a_s[r] = alpha; }
    }
    subgroupMemoryBarrierShared();
    subgroupBarrier();

    // O = O * alpha + P V
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
        int rbase = row_base(rb);
        [[unroll]] for (int dd = 0; dd < DV / 16; ++dd)
            [[unroll]] for (int e = 0; e < of[rb][dd].length(); ++e) of[rb][dd][e] *= a_s[rbase + int(rowf[e])];
    }
    FRAG16 pf[RPW][BKV / 16];
    [[unroll]] for (int rb = 0; rb < RPW; ++rb)
        [[unroll]] for (int c = 0; c < BKV / 16; ++c) coopMatLoadNV(pf[rb][c], p16, uint(row_base(rb) * PS + c * 16), uint(PS), false);
    [[unroll]] for (int dd = 0; dd < DV / 16; ++dd) {
        [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
            FRAG16 vf;
            coopMatLoadNV(vf, kv16, uint(BKV * KS + c * 16 * KS + dd * 16), uint(KS), false);
            [[unroll]] for (int rb = 0; rb < RPW; ++rb) of[rb][dd] = coopMatMulAddNV(pf[rb][c], vf, of[rb][dd]);
        }
    }
}

#else
void process_tile(int k0, int kn, int pass) {}
#endif

// Scores, softmax and P V for the K/V tile in shared memory, S and P in registers.
void process_tile_fast(int k0, int kn, int pass) {
    FRAG32 acc[RPW][BKV / 16];
    [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
        [[unroll]] for (int rb = 0; rb < RPW; ++rb) acc[rb][c] = FRAG32(0.0);
        [[unroll]] for (int kk = 0; kk < D / 16; ++kk) {
            FRAG16 kt;
            coopMatLoadNV(kt, kv16, uint(c * 16 * KS + kk * 16), uint(KS), true);
            [[unroll]] for (int rb = 0; rb < RPW; ++rb) acc[rb][c] = coopMatMulAddNV(qf[rb][kk], kt, acc[rb][c]);
        }
    }
    FRAG16 pf[RPW][BKV / 16];
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
        int rbase = row_base(rb);
        float mx0 = fm[rb][0], mx1 = fm[rb][1];
        [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
            [[unroll]] for (int e = 0; e < acc[rb][c].length(); ++e) {
                int rr = int(rowf[e]), r = rbase + rr, j = c * 16 + int(colf[e]);
                float s = NEG_INF;
                if (r < g_rows && j < kn) {
                    s = acc[rb][c][e] * p.scale;
#if VKF_HAS_SCORE_MOD
                    s = score_mod(s, g_b, g_h, g_q0 + r, k0 + j);
#endif
#if VKF_HAS_MASK_MOD
                    if (pass == 1 && !mask_mod(g_b, g_h, g_q0 + r, k0 + j)) s = NEG_INF;
#endif
                }
                s *= LOG2E;
                acc[rb][c][e] = s;
                if (rr < 8) mx0 = max(mx0, s); else mx1 = max(mx1, s);
            }
        }
        mx0 = max(mx0, subgroupShuffleXor(mx0, 1)); mx0 = max(mx0, subgroupShuffleXor(mx0, 2));
        mx1 = max(mx1, subgroupShuffleXor(mx1, 1)); mx1 = max(mx1, subgroupShuffleXor(mx1, 2));
        float a0 = exp2(fm[rb][0] - mx0), a1 = exp2(fm[rb][1] - mx1);
        float s0 = 0.0, s1 = 0.0;
        [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
            [[unroll]] for (int e = 0; e < acc[rb][c].length(); ++e) {
                bool lo = int(rowf[e]) < 8;
                float pj = exp2(acc[rb][c][e] - (lo ? mx0 : mx1));
                acc[rb][c][e] = pj;
                if (lo) s0 += pj; else s1 += pj;
            }
            pf[rb][c] = FRAG16(acc[rb][c]);
        }
        s0 += subgroupShuffleXor(s0, 1); s0 += subgroupShuffleXor(s0, 2);
        s1 += subgroupShuffleXor(s1, 1); s1 += subgroupShuffleXor(s1, 2);
        fl[rb][0] = fl[rb][0] * a0 + s0; fl[rb][1] = fl[rb][1] * a1 + s1;
        fm[rb][0] = mx0; fm[rb][1] = mx1;
        [[unroll]] for (int dd = 0; dd < DV / 16; ++dd)
            [[unroll]] for (int e = 0; e < of[rb][dd].length(); ++e) of[rb][dd][e] *= int(rowf[e]) < 8 ? a0 : a1;
    }
    [[unroll]] for (int dd = 0; dd < DV / 16; ++dd) {
        [[unroll]] for (int c = 0; c < BKV / 16; ++c) {
            FRAG16 vf;
            coopMatLoadNV(vf, kv16, uint(BKV * KS + c * 16 * KS + dd * 16), uint(KS), false);
            [[unroll]] for (int rb = 0; rb < RPW; ++rb) of[rb][dd] = coopMatMulAddNV(pf[rb][c], vf, of[rb][dd]);
        }
    }
}

// Vector path: each invocation moves PRE 8-half vectors of K and of V per tile.
#define PRE ((BKV * (D / 8) + 32 * NSG - 1) / (32 * NSG))
uvec4 pre_k[PRE], pre_v[PRE];

void fetch(int t, int lid) {
    int k0, kn, pass;
    tile_range(t, k0, kn, pass);
    [[unroll]] for (int a = 0; a < PRE; ++a) {
        int e = lid + a * 32 * NSG;
        int j = e / (D / 8), d8 = e - j * (D / 8);
        bool ok = e < BKV * (D / 8) && j < kn;
        pre_k[a] = ok ? k4[(g_koff + (k0 + j) * p.k_sl) / 8 + d8] : uvec4(0);
        pre_v[a] = ok ? v4[(g_voff + (k0 + j) * p.v_sl) / 8 + d8] : uvec4(0);
    }
}

void stash(int lid) {
    [[unroll]] for (int a = 0; a < PRE; ++a) {
        int e = lid + a * 32 * NSG;
        if (e < BKV * (D / 8)) {
            int j = e / (D / 8), d8 = e - j * (D / 8);
            put8(j * KS + d8 * 8, pre_k[a]);
            put8(BKV * KS + j * KS + d8 * 8, pre_v[a]);
        }
    }
}

void main() {
    const int lid = int(gl_LocalInvocationIndex);
    const int sg = lid / 32, lane = lid % 32;
    const int tile = int(gl_WorkGroupID.x), h = p.h_start + int(gl_WorkGroupID.y), bl = int(gl_WorkGroupID.z);
    const int hl = int(gl_WorkGroupID.y);   // the head within this dispatch's bindings
    const int b = p.b_start + bl;
    const int qb = tile / p.tiles_per_block, sub = tile - qb * p.tiles_per_block;
    const int q0 = qb * p.q_bs + sub * BQ;
    const int q_end = min(min(q0 + BQ, (qb + 1) * p.q_bs), p.Lq);
    if (q0 >= q_end) return;
    const int rows = q_end - q0;
    const int hk = h / (p.Hq / p.Hkv);

    g_sg = sg;
    // The index tables, in the score area for now.
    for (int e = lid; e < 256; e += 32 * NSG) { s32[e] = float(e / 16); s32[256 + e] = float(e % 16); }
    if (lid < BQ) { m_s[lid] = -1e30; l_s[lid] = 0.0; a_s[lid] = 1.0; }
    barrier();
    coopMatLoadNV(rowf, s32, 0, 16, false);
    coopMatLoadNV(colf, s32, 256, 16, false);
    {
        bool mine = true;
        for (int e = 0; e < rowf.length(); ++e) mine = mine && (int(rowf[e]) % 8 == lane / 4);
        g_fast = subgroupAll(mine) && VKF_FAST_PATH != 0;
#if VKF_FAST_PATH == 2
        // Built for NVIDIA's layout only: anything else is reported, never computed wrongly.
        if (!g_fast) { if (lid == 0) vkf_report(4, 0, 0, 0); return; }
#endif
        [[unroll]] for (int rb = 0; rb < RPW; ++rb) { fm[rb][0] = -1e30; fm[rb][1] = -1e30; fl[rb][0] = 0.0; fl[rb][1] = 0.0; }
    }
    [[unroll]] for (int rb = 0; rb < RPW; ++rb)
        [[unroll]] for (int dd = 0; dd < DV / 16; ++dd) of[rb][dd] = FRAG32(0.0);

    // Stage Q, 16 * NSG rows at a time (rows past the end are zero), into the fragments.
    const int qoff = p.q_base + bl * p.q_sb + hl * p.q_sh;
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
        const int first = rb * 16 * NSG;
        barrier();
        if (p.vec_ok != 0) {
            for (int e = lid; e < 16 * NSG * (D / 8); e += 32 * NSG) {
                int r = e / (D / 8), d8 = e - r * (D / 8);
                put8(r * KS + d8 * 8, first + r < rows ? q4[(qoff + (q0 + first + r) * p.q_sl) / 8 + d8] : uvec4(0));
            }
        } else {
            for (int e = lid; e < 16 * NSG * D; e += 32 * NSG) {
                int r = e / D, d = e - (e / D) * D;
                kv16[r * KS + d] = first + r < rows ? q_data[qoff + (q0 + first + r) * p.q_sl + d * p.q_sd] : float16_t(0.0);
            }
        }
        barrier();
        [[unroll]] for (int kk = 0; kk < D / 16; ++kk) coopMatLoadNV(qf[rb][kk], kv16, uint(sg * 16 * KS + kk * 16), uint(KS), false);
    }
    barrier();

    g_b = b; g_h = h; g_q0 = q0; g_rows = rows; g_lane = lane;
    g_mrow = ((p.mask_b == 1 ? 0 : b) * p.mask_h + (p.mask_h == 1 ? 0 : h)) * p.q_blocks + qb;
    g_nfull = p.dense != 0 ? p.kv_blocks : full_kv_num[g_mrow];
    g_npart = p.dense != 0 ? 0 : kv_num[g_mrow];
    g_tiles_per_kvb = (p.kv_bs + BKV - 1) / BKV;
    g_koff = p.k_base + bl * p.k_sb + (hk - p.hk_start) * p.k_sh;
    g_voff = p.v_base + bl * p.v_sb + (hk - p.hk_start) * p.v_sh;
    const int total_tiles = (g_nfull + g_npart) * g_tiles_per_kvb;

    if (p.vec_ok != 0) {
        // Software pipeline: the next tile's global loads are in flight while this one computes.
        if (total_tiles > 0) fetch(0, lid);
        for (int t = 0; t < total_tiles; ++t) {
            int k0, kn, pass;
            tile_range(t, k0, kn, pass);
            stash(lid);
            barrier();
            if (t + 1 < total_tiles) fetch(t + 1, lid);
            if (kn > 0) { if (g_fast) process_tile_fast(k0, kn, pass); else process_tile(k0, kn, pass); }
            barrier();
        }
    } else {
        for (int t = 0; t < total_tiles; ++t) {
            int k0, kn, pass;
            tile_range(t, k0, kn, pass);
            if (kn <= 0) continue;
            for (int e = lid; e < BKV * D; e += 32 * NSG) {
                int j = e / D, d = e - (e / D) * D;
                bool ok = j < kn;
                kv16[j * KS + d] = ok ? k_data[g_koff + (k0 + j) * p.k_sl + d * p.k_sd] : float16_t(0.0);
                kv16[BKV * KS + j * KS + d] = ok ? v_data[g_voff + (k0 + j) * p.v_sl + d * p.v_sd] : float16_t(0.0);
            }
            barrier();
            if (g_fast) process_tile_fast(k0, kn, pass); else process_tile(k0, kn, pass);
            barrier();
        }
    }

    // The fast path's row statistics join the shared ones the epilogue reads.
    if (g_fast && lane % 4 == 0) {
        [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
            int r = row_base(rb) + lane / 4;
            m_s[r] = fm[rb][0]; l_s[r] = fl[rb][0];
            m_s[r + 8] = fm[rb][1]; l_s[r + 8] = fl[rb][1];
        }
    }
    barrier();

    // O / l (0 for rows with no key), staged as fp16 16 * NSG rows at a time, written with the output's strides.
    const int ooff = p.o_base + bl * p.o_sb + hl * p.o_sh;
    [[unroll]] for (int rb = 0; rb < RPW; ++rb) {
        const int first = rb * 16 * NSG;
        [[unroll]] for (int dd = 0; dd < DV / 16; ++dd) {
            [[unroll]] for (int e = 0; e < of[rb][dd].length(); ++e) {
                float l = l_s[row_base(rb) + int(rowf[e])];
                of[rb][dd][e] = l > 0.0 ? of[rb][dd][e] / l : 0.0;
            }
            FRAG16 oh = FRAG16(of[rb][dd]);
            coopMatStoreNV(oh, kv16, uint(sg * 16 * KS + dd * 16), uint(KS), false);
        }
        barrier();
        if (p.vec_ok != 0) {
            for (int e = lid; e < 16 * NSG * (DV / 8); e += 32 * NSG) {
                int r = e / (DV / 8), d8 = e - r * (DV / 8);
                if (first + r < rows) o4[(ooff + (q0 + first + r) * p.o_sl) / 8 + d8] = get8(r * KS + d8 * 8);
            }
        } else {
            for (int e = lid; e < 16 * NSG * DV; e += 32 * NSG) {
                int r = e / DV, d = e - (e / DV) * DV;
                if (first + r < rows) o_data[ooff + (q0 + first + r) * p.o_sl + d * p.o_sd] = kv16[r * KS + d];
            }
        }
        barrier();
    }
    for (int r = lid; r < rows; r += 32 * NSG) {
        float l = l_s[r];
        if (p.write_lse != 0)
            lse_data[p.lse_base + bl * p.lse_sb + hl * p.lse_sh + (q0 + r) * p.lse_sl] = l > 0.0 ? (m_s[r] + log2(l)) * LN2 : NEG_INF;
    }
}
