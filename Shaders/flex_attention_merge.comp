#version 450
// Merges the partial results of attention over disjoint key ranges (one per split): each split
// wrote its normalized output O_s (float32) and its LSE l_s over its keys; over all keys
//   LSE = log Σ_s exp(l_s),  O = Σ_s exp(l_s − LSE) · O_s.
// A row no split saw a key of (every l_s = −inf) gives O = 0 and LSE = −inf; a NaN LSE (a row
// with a NaN score) stays NaN. A head's sink (sinks) joins the denominator once, here.
//
// A workgroup takes R rows; each row's splits are dealt to G groups of UL invocations (split s to
// group s mod G), each invocation holding VW columns (a vec4 where Dv allows) of a unit of the row:
// a group merges its splits against its own maximum, then the first group combines the G groups'
// results through shared memory, in the groups' order (deterministic). With many splits and few
// rows — split-KV decoding of one-row MQA: 132 splits of 128 rows — one invocation per element
// walking every split waited one memory latency per eight splits (H100: a 22 µs merge beside an
// 84 µs kernel, docs/performance.md); the host picks G for the call (push constants ul, groups).
//
// Defines: OUT_F16 / OUT_BF16 (0/1, the output's element type: flex_dtype.glsl), WG, MERGE_VEC4 (0/1:
// Dv a multiple of 4, the partial O read as vec4). Bindings: 0 partial O [S, rows, Dv], 1
// partial LSE [S, rows], 2 output, 3 LSE (written when write_lse), 4 partial maximum scores
// [S, rows] and 5 the rows' maximum scores (both when write_max). Push constants below.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require

#ifndef WG
#define WG 256   // invocations a workgroup, a power of two (the host: 256, or the device's limit)
#endif
layout(local_size_x = WG) in;

#include "flex_dtype.glsl"
layout(std430, set = 0, binding = 0) readonly buffer PartO { float part_o[]; };
layout(std430, set = 0, binding = 1) readonly buffer PartL { float part_l[]; };
layout(std430, set = 0, binding = 2) writeonly buffer OBuf { OUT_T o_data[]; };
layout(std430, set = 0, binding = 3) writeonly buffer LBuf { float lse_data[]; };
layout(std430, set = 0, binding = 4) readonly buffer PartM { float part_max[]; };
layout(std430, set = 0, binding = 5) writeonly buffer MBuf { float max_data[]; };
// Per-head sink logits (sinks != 0): joined once, here, not in the partials.
layout(std430, set = 0, binding = 6) readonly buffer Sinks { float sinks[]; };
// Rows are (b, h, i) of a [nb, nh, Lq] block; the output and LSE are addressed by their strides.
layout(push_constant) uniform Params {
    int splits, nb, nh, Lq, Dv;
    int o_base, o_sb, o_sh, o_sl, o_sd;
    int lse_base, lse_sb, lse_sh, lse_sl, write_lse, write_max;
    int has_sinks, h_start;   // the heads of these rows are h_start + h
    int ul, groups;           // invocations a group (a power of two), groups a row: UL * G divides WG
} p;
#ifndef MERGE_VEC4
#define MERGE_VEC4 0
#endif
#if MERGE_VEC4
#define VW 4
#define VT vec4
layout(std430, set = 0, binding = 0) readonly buffer PartO4 { vec4 part_o4[]; };
#define PART_O(i) part_o4[i]
#else
#define VW 1
#define VT float
#define PART_O(i) part_o[i]
#endif
shared float sh_m[WG], sh_s[WG];
shared VT sh_o[WG];

#define NEG_INF (-uintBitsToFloat(0x7F800000u))
#define MS 8   // splits whose loads are in flight together (the host: mergeSplitsInFlight)

void main() {
    const int rows = p.nb * p.nh * p.Lq, U = p.Dv / VW, UL = p.ul, G = p.groups;
    const int t = int(gl_LocalInvocationID.x);
    const int u0 = t % UL, g = (t / UL) % G, r = t / (UL * G);
    const int row = (int(gl_WorkGroupID.x) + int(gl_WorkGroupID.y) * int(gl_NumWorkGroups.x)) * (WG / (UL * G)) + r;
    const bool live = row < rows;   // no return: the barriers below are the workgroup's
    const int i = row % p.Lq, bh = row / p.Lq, h = bh % p.nh, b = bh / p.nh;
    const float nan = uintBitsToFloat(0x7FC00000u);
    // This group's splits (g, g + G, ...), MS at a time with their loads issued together — each
    // split's LSE and its O at once, merged against the running maximum (one pass: a group of
    // 16 splits is one round of loads, where a pass for the maximum and one for O were two).
    for (int ub = 0; ub < U; ub += UL) {
        const int u = ub + u0;
        float m = NEG_INF, sum = 0.0;
        VT o = VT(0.0);
        bool nan_row = false;
        if (live) {
            for (int s0 = g; s0 < p.splits; s0 += G * MS) {
                float l[MS];
                VT v[MS];
                [[unroll]] for (int k = 0; k < MS; ++k) {
                    const int s = s0 + k * G;
                    // A split that saw no key wrote O = 0 and LSE -inf; past the last split, the same.
                    l[k] = s < p.splits ? part_l[s * rows + row] : NEG_INF;
                    v[k] = s < p.splits && u < U ? PART_O((s * rows + row) * U + u) : VT(0.0);
                }
                float mn = m;
                [[unroll]] for (int k = 0; k < MS; ++k) { if (isnan(l[k])) nan_row = true; else mn = max(mn, l[k]); }
                if (mn > NEG_INF) {
                    const float sc = exp(m - mn);   // 0 while m is -inf (o and sum are 0 then)
                    o *= sc;
                    sum *= sc;
                    [[unroll]] for (int k = 0; k < MS; ++k) {
                        const float w = isnan(l[k]) ? 0.0 : exp(l[k] - mn);
                        if (w != 0.0) o += w * v[k];
                        sum += w;
                    }
                    m = mn;
                }
            }
        }
        sh_m[t] = nan_row ? nan : m;
        sh_s[t] = sum;
        sh_o[t] = o;
        barrier();
        if (g == 0 && live) {
            // The groups' results against the row's maximum (the sink's logit included).
            const float sink = p.has_sinks != 0 ? sinks[p.h_start + h] : NEG_INF;
            float mx = sink;
            bool nan_any = false;
            for (int gg = 0; gg < G; ++gg) {
                const float mg = sh_m[t + gg * UL];
                if (isnan(mg)) nan_any = true; else mx = max(mx, mg);
            }
            VT oo = VT(0.0);
            float total = 0.0;
            if (mx > NEG_INF && !nan_any) {
                for (int gg = 0; gg < G; ++gg) {
                    const float sc = exp(sh_m[t + gg * UL] - mx);   // 0 for a group that saw no key
                    total += sh_s[t + gg * UL] * sc;
                    oo += sh_o[t + gg * UL] * sc;
                }
                total += exp(sink - mx);   // the sink: a logit with no value row (0 without one)
                oo /= total;
            }
            if (nan_any) oo = VT(nan);
            if (u < U) {
                const int at = p.o_base + b * p.o_sb + h * p.o_sh + i * p.o_sl + u * VW * p.o_sd;
#if MERGE_VEC4
                [[unroll]] for (int c = 0; c < 4; ++c) o_data[at + c * p.o_sd] = OUT_VALUE(oo[c]);
#else
                o_data[at] = OUT_VALUE(oo);
#endif
            }
            if (u == 0 && p.write_lse != 0)
                lse_data[p.lse_base + b * p.lse_sb + h * p.lse_sh + i * p.lse_sl] = nan_any ? nan : mx > NEG_INF ? mx + log(total) : NEG_INF;
            if (u == 0 && p.write_max != 0) {
                float x = NEG_INF;
                for (int s0 = 0; s0 < p.splits; s0 += MS) {
                    float xs[MS];
                    [[unroll]] for (int k = 0; k < MS; ++k) xs[k] = s0 + k < p.splits ? part_max[(s0 + k) * rows + row] : NEG_INF;
                    [[unroll]] for (int k = 0; k < MS; ++k) x = max(x, xs[k]);
                }
                max_data[p.lse_base + b * p.lse_sb + h * p.lse_sh + i * p.lse_sl] = nan_any ? nan : x;
            }
        }
        barrier();
    }
}
