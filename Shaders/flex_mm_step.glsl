// One step of staged keys as the layout-free matrix forward kernels take it
// (flex_attention_fwd_generic.comp, flex_attention_decode_mm.comp), for a subgroup's MM rows that
// start at row R0 of the shared tiles: S = Q Kᵀ into the score tile, the online softmax there
// (flex_softmax.glsl's sm_tile), O rescaled where a row's maximum moved, O += P V. Macros, not
// functions: they pass cooperative matrices (Q's fragments QF, the accumulators O), which GLSL
// functions do not take portably.
//
// Declares the shared tiles — Ks4 / Vs4 (K and V, rows KS4 / VS4 units apart), Ss (scores, and O
// one fragment of MN columns at a time, rows SST floats apart), Ps (P, rows PST apart) and,
// emulated, Qs4 (Q) — and the 16-byte
// views of Q, K and V. Include after flex_mm.glsl with D, DV, MM, MN, MK, SG, BKV and BQ (the
// workgroup's rows) defined; the macros expand where flex_softmax.glsl's sm_tile is defined.
// Emulated (VKF_MM_EMULATE) the products are scalar loops over the same tiles and O is the lane's
// float o[SM_RPL][DV / SM_TPR] in the softmax's row/column assignment (no round trip); else QF is
// FRAG_A[D / MK] and O FRAG_C[DV / MN].

// MM_RB (default 1): row blocks of MM rows a subgroup owns (the generic forward's GEN_RPW; the
// register softmax's macros and the emulated ones take it): each K or V fragment read from shared
// memory then feeds MM_RB products, so a step's shared-memory reads per product drop MM_RB-fold.
// The subgroup's matrices are arrays with one entry per block: Q's A operands QF[b * (D / MK) + kk],
// O's accumulators O[b * (DV / MN) + nn], MB[b] and LS[b].
#ifndef MM_RB
#define MM_RB 1
#endif

// The tiles, for BQ rows (the workgroup's).
// K and V (and Q on its way to registers) in shared memory as 16-byte units of 8 halves, filled
// by 16-byte loads where rows allow (p.vec_ok); rows KS4 / VS4 units apart, one unit of padding
// so that rows start on different banks. Matrix loads take offsets and strides in units.
#define KS4 (D / 8 + 1)
#define VS4 (DV / 8 + 1)
// P (fp16) and the score tile (fp32): rows padded by 16 bytes, strides multiples of 16 bytes.
// The score tile is BKV wide (BKV is a multiple of MN): O crosses it one MN-column fragment at a
// time (MM_O_CHUNK), never whole — at D = 128 a DV-wide tile was 8.4 KB a subgroup of 16 rows,
// the largest of a one-subgroup workgroup's shared arrays.
#define PST (BKV + 8)
#define SST (BKV + 4)
// KV_NBUF (default 1) buffers of each: the step's macros take the buffer's first unit.
#ifndef KV_NBUF
#define KV_NBUF 1
#endif
shared uvec4 Ks4[KV_NBUF * BKV * KS4];
shared uvec4 Vs4[KV_NBUF * BKV * VS4];
shared float Ss[BQ * SST];        // each subgroup's rows: scores (and O's fragments on their way through)
shared HALF_T Ps[BQ * PST];
#if VKF_MM_EMULATE
shared uvec4 Qs4[BQ * KS4];
#endif
// K, V and Q seen as 16-byte units (flex_mm.glsl's loads).
layout(std430, set = 0, binding = VKF_BINDING_K) readonly buffer KBufU { uvec4 k_units[]; };
layout(std430, set = 0, binding = VKF_BINDING_V) readonly buffer VBufU { uvec4 v_units[]; };
layout(std430, set = 0, binding = VKF_BINDING_Q) readonly buffer QBufU { uvec4 q_units[]; };
GATHER(q_data, q_units)
GATHER(k_data, k_units)
GATHER(v_data, v_units)

// Staging loops unroll on a GPU; emulated (lavapipe) they stay loops, which compiles faster.
#if VKF_MM_EMULATE || VKF_MM_SOFT
#define STAGE_UNROLL
#else
#define STAGE_UNROLL [[unroll]]
#endif
// Units an invocation loads into registers before it stores them (a round): a store right after
// each load waits for it, so a step that stored each unit as it came spent one memory latency per
// unit (H100: the split-KV matrix kernel's 32 a step, 4x slower than the scalar kernel). Emulated,
// one unit a round: a CPU has no latency to hide, and lavapipe compiled the rounds' register
// arrays slowly (the tests of both kernels took 1.5-2.2x as long); the same code runs.
#if VKF_MM_EMULATE || VKF_MM_SOFT
#undef STAGE_CH
#define STAGE_CH 1
#elif !defined(STAGE_CH)
#define STAGE_CH 8
#endif
// A step's rows [0, BKV) as BKV x UNITS units, NT invocations of which this is I taking units
// I, I + NT, ...: MM_FETCH loads its units C0 .. C0 + CN - 1 into R[0 .. CN) (LOAD(j, u): unit u
// of the step's row j; zeros for rows at or past KN and for units past the tile), MM_STASH stores
// them into the shared tile T (rows TS units apart) from unit TB on. MM_STAGE does both in rounds
// of STAGE_CH units; the pipelined generic kernel fetches one step and stashes it a step later.
#define MM_FETCH(R, C0, CN, UNITS, KN, I, NT, LOAD) \
    STAGE_UNROLL for (int i_ = 0; i_ < (CN); ++i_) { \
        const int e_ = (I) + ((C0) + i_) * (NT), j_ = e_ / (UNITS), u_ = e_ - j_ * (UNITS); \
        R[i_] = e_ < BKV * (UNITS) && j_ < (KN) ? LOAD(j_, u_) : uvec4(0); \
    }
#define MM_STASH(R, C0, CN, T, TB, TS, UNITS, I, NT) \
    STAGE_UNROLL for (int i_ = 0; i_ < (CN); ++i_) { \
        const int e_ = (I) + ((C0) + i_) * (NT), j_ = e_ / (UNITS), u_ = e_ - j_ * (UNITS); \
        if (e_ < BKV * (UNITS)) T[(TB) + j_ * (TS) + u_] = R[i_]; \
    }
#define MM_STAGE(T, TB, TS, UNITS, KN, I, NT, LOAD) { \
    const int per_ = (BKV * (UNITS) + (NT) - 1) / (NT); \
    STAGE_UNROLL for (int c_ = 0; c_ < per_; c_ += STAGE_CH) { \
        uvec4 r_[STAGE_CH]; \
        MM_FETCH(r_, c_, STAGE_CH, UNITS, KN, I, NT, LOAD) \
        MM_STASH(r_, c_, STAGE_CH, T, TB, TS, UNITS, I, NT) \
    } }

// O's fragment NN (columns NN * MN ..) into columns 0 .. MN - 1 of the score tile's rows R0..,
// for the lanes to read or scale their own rows' elements there: MM_OCPL of them a row, the
// lane's columns sm_col0(lane) + u * SM_TPR (u < MM_OCPL) — O's columns NN * MN + those, the
// elements t = NN * MM_OCPL + u of the softmax's column assignment. The first sync frees the
// tile (its scores, or the previous fragment, read), the second makes the fragment visible.
#define MM_OCPL (MN / SM_TPR)
#define MM_O_CHUNK(O, NN, R0) { \
    subgroup_sync(); \
    MM_UNROLL for (int ob_ = 0; ob_ < MM_RB; ++ob_) \
        coopMatStoreNV(O[ob_ * (DV / MN) + (NN)], Ss, uint(((R0) + ob_ * MM) * SST), uint(SST), false); \
    subgroup_sync(); }

// S = Q Kᵀ into rows R0.. of the score tile, K from the buffer starting at unit KB of Ks4.
#if VKF_MM_EMULATE
#define MM_SCORES(QF, R0, LANE, KB) \
    for (int e_ = (LANE); e_ < MM * MM_RB * BKV; e_ += SG) { \
        const int r_ = (R0) + e_ / BKV, j_ = e_ - (e_ / BKV) * BKV; \
        float dot_ = 0.0; \
        /* A unit (8 halves) an iteration: a driver that caps loop iterations (lavapipe) counts D / 8. */ \
        for (int d_ = 0; d_ < D; d_ += 8) \
            MM_UNROLL for (int i_ = 0; i_ < 8; ++i_) dot_ += HALF_AT(Qs4, r_ * KS4 * 8 + d_ + i_) * HALF_AT(Ks4, ((KB) + j_ * KS4) * 8 + d_ + i_); \
        Ss[r_ * SST + j_] = dot_; \
    }
#else
// ACC = Q Kᵀ for the step's keys NN * MN.. (one accumulator of MN keys), K from unit KB of Ks4.
#define MM_QK(QF, ACC, NN, KB) { \
        ACC = C_FILL(0.0); \
        MM_UNROLL for (int kk_ = 0; kk_ < D / MK; ++kk_) { \
            FRAG_B kt_;   /* Kᵀ: element (d, key) of the K tile, read column-major */ \
            coopMatLoadNV(kt_, Ks4, uint((KB) + (NN) * MN * KS4 + kk_ * MK / 8), uint(KS4), true); \
            ACC = coopMatMulAddNV(QF[kk_], kt_, ACC); \
        } }
#define MM_SCORES(QF, R0, LANE, KB) \
    MM_UNROLL for (int nn_ = 0; nn_ < BKV / MN; ++nn_) { \
        FRAG_C acc_; \
        MM_QK(QF, acc_, nn_, KB) \
        coopMatStoreNV(acc_, Ss, uint((R0) * SST + nn_ * MN), uint(SST), false); \
    }
#endif

// The online softmax over the scores (running maxima M, the lane's row sums L), O rescaled where
// a maximum moved, then O += P V (V from the buffer starting at unit VB of Vs4). Starts after the scores are visible to the subgroup (a
// subgroup_sync after MM_SCORES); ends with P V added (emulated: through the score tile).
#if VKF_MM_EMULATE
#define MM_SOFTMAX_PV(O, R0, LANE, M, L, VB) { \
    float alpha_[SM_RPL]; \
    sm_tile(M, L, alpha_); \
    MM_UNROLL for (int k_ = 0; k_ < SM_RPL; ++k_) \
        MM_UNROLL for (int t_ = 0; t_ < DV / SM_TPR; ++t_) O[k_][t_] *= alpha_[k_]; \
    subgroup_sync();   /* P written */ \
    /* Each lane its own elements of O (its rows, its columns): P V as a scalar loop. */ \
    MM_UNROLL for (int k_ = 0; k_ < SM_RPL; ++k_) { \
        const int r_ = (R0) + sm_row(LANE, k_); \
        for (int t_ = 0; t_ < DV / SM_TPR; ++t_) { \
            const int d_ = sm_col0(LANE) + t_ * SM_TPR; \
            float acc_ = 0.0; \
            MM_UNROLL for (int j_ = 0; j_ < BKV; ++j_) acc_ += HALF_FLOAT(Ps[r_ * PST + j_]) * HALF_AT(Vs4, ((VB) + j_ * VS4) * 8 + d_); \
            O[k_][t_] += acc_; \
        } \
    } }
#else
// O += P V: P's A operands PF (BKV / MK of them), V from the buffer starting at unit VB of Vs4.
#define MM_PV(O, PF, VB) \
    MM_UNROLL for (int nn_ = 0; nn_ < DV / MN; ++nn_) { \
        MM_UNROLL for (int kk_ = 0; kk_ < BKV / MK; ++kk_) { \
            FRAG_B vf_; \
            coopMatLoadNV(vf_, Vs4, uint((VB) + kk_ * MK * VS4 + nn_ * MN / 8), uint(VS4), false); \
            O[nn_] = coopMatMulAddNV(PF[kk_], vf_, O[nn_]); \
        } \
    }
#define MM_SOFTMAX_PV(O, R0, LANE, M, L, VB) { \
    float alpha_[SM_RPL]; \
    sm_tile(M, L, alpha_); \
    bool moved_ = false; \
    MM_UNROLL for (int k_ = 0; k_ < SM_RPL; ++k_) moved_ = moved_ || alpha_[k_] != 1.0; \
    if (subgroupAny(moved_)) { \
        /* O's round trip, a fragment at a time: out to the score tile (its scores are read), */ \
        /* each lane scales its own rows' elements, back into the accumulator. */ \
        MM_UNROLL for (int nn_ = 0; nn_ < DV / MN; ++nn_) { \
            MM_O_CHUNK(O, nn_, R0) \
            MM_UNROLL for (int k_ = 0; k_ < SM_RPL; ++k_) { \
                const int r_ = (R0) + sm_row(LANE, k_); \
                MM_UNROLL for (int u_ = 0; u_ < MM_OCPL; ++u_) Ss[r_ * SST + sm_col0(LANE) + u_ * SM_TPR] *= alpha_[k_]; \
            } \
            subgroup_sync(); \
            coopMatLoadNV(O[nn_], Ss, uint((R0) * SST), uint(SST), false); \
        } \
    } \
    subgroup_sync();   /* P written */ \
    FRAG_A pf_[BKV / MK]; \
    MM_UNROLL for (int kk_ = 0; kk_ < BKV / MK; ++kk_) coopMatLoadNV(pf_[kk_], Ps, uint((R0) * PST + kk_ * MK), uint(PST), false); \
    MM_PV(O, pf_, VB) }
#endif

#if !VKF_MM_EMULATE
// The register softmax (GEN_REGSM): the step's scores stay in their accumulators. Which (row,
// column) an element holds is read from IX, an accumulator of the same type loaded from a table
// of r * MN + c (matrices of one type share their element order: that is what makes the
// specification's element-wise operations well defined), so the mods, the mask and the test
// against the running maximum work element by element with no layout assumed. MB holds each
// row's running maximum broadcast over its columns (loaded from a table), LS the row sums the
// same way (accumulated by products with a matrix of ones, from the fp16 P the products take) —
// or, with MM_EXACT_SUMS 1 (where the call returns the LSE, whose error fp16 sums would set at
// ~1e-5), LS adds each element's float32 P in place (element (r, c) the sum of row r's columns
// c, c + MN, ...) and the steps that go through sm_tile add theirs to its lane sums L:
// MM_REG_SUMS then adds a row's columns and the lanes' shares. MM_EXACT_SUMS 2 keeps both:
// LS[b] the products with ones (O's normalization, sharing the rounding of the bfloat16 P that O
// is built from) and LS[MM_RB + b] the float32 sums (the LSE's, MM_REG_LSE_SUMS); MM_LS_N sums
// a row block, the includer's LS array MM_RB * MM_LS_N long.
// Only where a score passes its row's maximum by more than SM_TAU (every row's first step, then
// rarely) do the scores go through the score tile to flex_softmax.glsl's sm_tile, which raises
// the maxima; MB is reloaded and O and LS rescaled element-wise by a broadcast of the factors.
// Else each lane writes its elements' P straight to the P tile. The includer defines
// mm_score(raw, r, j): the score of raw product RAW at the workgroup tile's row R, step column J,
// in log2 units after scale, mods and mask (-inf outside the tile), and sm_score reading the
// score tile as stored.
#ifndef MM_EXACT_SUMS
#define MM_EXACT_SUMS 0
#endif
#define MM_LS_N (MM_EXACT_SUMS == 2 ? 2 : 1)
#define MM_IX_ROW(E) ((E) / MN)
// Accumulators of a step's scores a row block, and S[b * MM_NS + nn]: block b's keys nn * MN ...
#define MM_NS (BKV / MN)
// A table of MN columns in rows R0.. of the score tile, each lane writing its own rows' columns.
#define MM_ROW_TABLE(R0, LANE, V) \
    MM_UNROLL for (int k_ = 0; k_ < SM_RPL; ++k_) \
        MM_UNROLL for (int u_ = 0; u_ < MN / SM_TPR; ++u_) Ss[((R0) + sm_row(LANE, k_)) * SST + sm_col0(LANE) + u_ * SM_TPR] = V[k_];
// IX, MB (every row at the starting maximum M0) and LS (zero), before the first step.
#define MM_REG_INIT(R0, LANE, IX, MB, LS, M0) { \
    for (int e_ = (LANE); e_ < MM * MN; e_ += SG) Ss[((R0) + e_ / MN) * SST + e_ % MN] = float(e_); \
    subgroup_sync(); \
    coopMatLoadNV(IX, Ss, uint((R0) * SST), uint(SST), false); \
    subgroup_sync(); \
    MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) MB[b_] = C_FILL(M0); \
    MM_UNROLL for (int b_ = 0; b_ < MM_RB * MM_LS_N; ++b_) LS[b_] = C_FILL(0.0); }
// S[b * MM_NS + NN] = Q Kᵀ for every row block b, keys NN * MN.., each Kᵀ fragment read once.
#define MM_QK_RB(QF, S, NN, KB) { \
    MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) S[b_ * MM_NS + (NN)] = C_FILL(0.0); \
    MM_UNROLL for (int kk_ = 0; kk_ < D / MK; ++kk_) { \
        FRAG_B kt_; \
        coopMatLoadNV(kt_, Ks4, uint((KB) + (NN) * MN * KS4 + kk_ * MK / 8), uint(KS4), true); \
        MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) \
            S[b_ * MM_NS + (NN)] = coopMatMulAddNV(QF[b_ * (D / MK) + kk_], kt_, S[b_ * MM_NS + (NN)]); \
    } }
// O[b * (DV / MN) + nn] += P V for every row block b (P's A operands PF[b * (BKV / MK) + kk]),
// each V fragment read once.
#define MM_PV_RB(O, PF, VB) \
    MM_UNROLL for (int nn_ = 0; nn_ < DV / MN; ++nn_) { \
        MM_UNROLL for (int kk_ = 0; kk_ < BKV / MK; ++kk_) { \
            FRAG_B vf_; \
            coopMatLoadNV(vf_, Vs4, uint((VB) + kk_ * MK * VS4 + nn_ * MN / 8), uint(VS4), false); \
            MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) \
                O[b_ * (DV / MN) + nn_] = coopMatMulAddNV(PF[b_ * (BKV / MK) + kk_], vf_, O[b_ * (DV / MN) + nn_]); \
        } \
    }
#define MM_STEP_REG(QF, O, R0, LANE, M, L, IX, MB, LS, KB, VB) { \
    FRAG_C s_[MM_RB * MM_NS]; \
    bool up_ = false; \
    MM_UNROLL for (int nn_ = 0; nn_ < MM_NS; ++nn_) { \
        MM_QK_RB(QF, s_, nn_, KB) \
        MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) \
            MM_UNROLL for (int i_ = 0; i_ < IX.length(); ++i_) { \
                const int e_ = int(IX[i_]), r_ = MM_IX_ROW(e_); \
                const float v_ = mm_score(s_[b_ * MM_NS + nn_][i_], (R0) + b_ * MM + r_, nn_ * MN + e_ - r_ * MN); \
                s_[b_ * MM_NS + nn_][i_] = v_; \
                up_ = up_ || v_ > MB[b_][i_] + SM_TAU; \
            } \
    } \
    if (subgroupAny(up_)) { \
        MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) \
            MM_UNROLL for (int nn_ = 0; nn_ < MM_NS; ++nn_) \
                coopMatStoreNV(s_[b_ * MM_NS + nn_], Ss, uint(((R0) + b_ * MM) * SST + nn_ * MN), uint(SST), false); \
        subgroup_sync(); \
        float alpha_[SM_RPL]; \
        sm_tile(M, L, alpha_); \
        subgroup_sync();   /* the scores read: the tile takes the maxima, then the factors */ \
        MM_ROW_TABLE(R0, LANE, M) \
        subgroup_sync(); \
        MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) coopMatLoadNV(MB[b_], Ss, uint(((R0) + b_ * MM) * SST), uint(SST), false); \
        subgroup_sync(); \
        MM_ROW_TABLE(R0, LANE, alpha_) \
        subgroup_sync(); \
        MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) { \
            FRAG_C a_; \
            coopMatLoadNV(a_, Ss, uint(((R0) + b_ * MM) * SST), uint(SST), false); \
            MM_UNROLL for (int s_ = 0; s_ < MM_LS_N; ++s_) \
                MM_UNROLL for (int i_ = 0; i_ < a_.length(); ++i_) LS[s_ * MM_RB + b_][i_] *= a_[i_]; \
            MM_UNROLL for (int nn_ = 0; nn_ < DV / MN; ++nn_) \
                MM_UNROLL for (int i_ = 0; i_ < a_.length(); ++i_) O[b_ * (DV / MN) + nn_][i_] *= a_[i_]; \
        } \
    } else { \
        MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) \
            MM_UNROLL for (int nn_ = 0; nn_ < MM_NS; ++nn_) \
                MM_UNROLL for (int i_ = 0; i_ < IX.length(); ++i_) { \
                    const int e_ = int(IX[i_]), r_ = MM_IX_ROW(e_); \
                    const float p_ = exp2(s_[b_ * MM_NS + nn_][i_] - MB[b_][i_]); \
                    Ps[((R0) + b_ * MM + r_) * PST + nn_ * MN + e_ - r_ * MN] = TO_HALF(p_); \
                    MM_EXACT_ADD(LS, b_, i_, p_) \
                } \
    } \
    subgroup_sync();   /* P written */ \
    FRAG_A pf_[MM_RB * (BKV / MK)]; \
    MM_ONES_DECL \
    MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) \
        MM_UNROLL for (int kk_ = 0; kk_ < BKV / MK; ++kk_) { \
            coopMatLoadNV(pf_[b_ * (BKV / MK) + kk_], Ps, uint(((R0) + b_ * MM) * PST + kk_ * MK), uint(PST), false); \
            MM_ONES_SUM(LS, b_, pf_[b_ * (BKV / MK) + kk_]) \
        } \
    MM_PV_RB(O, pf_, VB) }
// The row sums: with MM_EXACT_SUMS each element of LS adds its float32 P, and a lane's row total
// (MM_LANE_EXACT) adds the row's MN columns of LS, then the lanes sharing the row and sm_tile's
// shares L; else the products with ones put the row's sum in every column of LS (MM_LANE_ONES).
#if MM_EXACT_SUMS == 1
#define MM_EXACT_ADD(LS, B, I, P) LS[B][I] += (P);
#define MM_ONES_DECL
#define MM_ONES_SUM(LS, B, PF)
#define MM_LANE_SUM MM_LANE_EXACT
#else
#if MM_EXACT_SUMS == 2
#define MM_EXACT_ADD(LS, B, I, P) LS[MM_RB + (B)][I] += (P);
#else
#define MM_EXACT_ADD(LS, B, I, P)
#endif
#define MM_ONES_DECL const FRAG_B ones_ = B_FILL(1.0);
#define MM_ONES_SUM(LS, B, PF) LS[B] = coopMatMulAddNV(PF, ones_, LS[B]);
#define MM_LANE_SUM MM_LANE_ONES
#endif
#define MM_LANE_EXACT(R0, LANE, L, LK, K) { \
    float c_ = L[K]; \
    MM_UNROLL for (int u_ = 0; u_ < MN / SM_TPR; ++u_) c_ += Ss[((R0) + sm_row(LANE, K)) * SST + sm_col0(LANE) + u_ * SM_TPR]; \
    LK[K] = sm_row_sum(c_); }
#define MM_LANE_ONES(R0, LANE, L, LK, K) LK[K] = Ss[((R0) + sm_row(LANE, K)) * SST + sm_col0(LANE)];
// Each lane's rows' sums (LK) from LS[OFF..] through the score tile.
#define MM_SUMS_VIA_TILE(R0, LANE, LS, OFF, L, LK, LANE_SUM) { \
    subgroup_sync(); \
    MM_UNROLL for (int b_ = 0; b_ < MM_RB; ++b_) coopMatStoreNV(LS[(OFF) + b_], Ss, uint(((R0) + b_ * MM) * SST), uint(SST), false); \
    subgroup_sync(); \
    MM_UNROLL for (int k_ = 0; k_ < SM_RPL; ++k_) LANE_SUM(R0, LANE, L, LK, k_) }
#define MM_REG_SUMS(R0, LANE, LS, L, LK) MM_SUMS_VIA_TILE(R0, LANE, LS, 0, L, LK, MM_LANE_SUM)
// MM_EXACT_SUMS 2: the LSE's float32 sums (LE) beside MM_REG_SUMS' products with ones.
#define MM_REG_LSE_SUMS(R0, LANE, LS, L, LE) MM_SUMS_VIA_TILE(R0, LANE, LS, MM_RB, L, LE, MM_LANE_EXACT)
#endif
