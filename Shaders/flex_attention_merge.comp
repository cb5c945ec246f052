#version 450
// Merges the partial results of attention over disjoint key ranges (one per split): each split
// wrote its normalized output O_s (float32) and its LSE l_s over its keys; over all keys
//   LSE = log Σ_s exp(l_s),  O = Σ_s exp(l_s − LSE) · O_s.
// A row no split saw a key of (every l_s = −inf) gives O = 0 and LSE = −inf; a NaN LSE (a row
// with a NaN score) stays NaN. A head's sink (sinks) joins the denominator once, here. One
// invocation per output element; the LSE by the d = 0 ones.
//
// Defines: OUT_F16 / OUT_BF16 (0/1, the output's element type: flex_dtype.glsl). Bindings: 0 partial O [S, rows, Dv], 1
// partial LSE [S, rows], 2 output, 3 LSE (written when write_lse), 4 partial maximum scores
// [S, rows] and 5 the rows' maximum scores (both when write_max). Push constants below.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require

layout(local_size_x = 64) in;

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
} p;

#define NEG_INF (-uintBitsToFloat(0x7F800000u))
#define MS 8   // splits whose loads are in flight together

void main() {
    const int rows = p.nb * p.nh * p.Lq;
    const int e = int(gl_GlobalInvocationID.x) + int(gl_GlobalInvocationID.y) * int(gl_NumWorkGroups.x * gl_WorkGroupSize.x);
    if (e >= rows * p.Dv) return;
    const int row = e / p.Dv, d = e - row * p.Dv;
    const int i = row % p.Lq, bh = row / p.Lq, h = bh % p.nh, b = bh / p.nh;
    const float sink = p.has_sinks != 0 ? sinks[p.h_start + h] : NEG_INF;
    // The splits MS at a time, their loads issued together: a loop of one load an iteration waited
    // out one memory latency per split (H100: 14-16 µs a merge of 32 splits, docs/performance.md).
    // The sums keep the splits' order.
    float m = sink;
    bool nan_row = false;
    for (int s0 = 0; s0 < p.splits; s0 += MS) {
        float l[MS];
        [[unroll]] for (int k = 0; k < MS; ++k) l[k] = s0 + k < p.splits ? part_l[(s0 + k) * rows + row] : NEG_INF;
        [[unroll]] for (int k = 0; k < MS; ++k) { if (isnan(l[k])) nan_row = true; else m = max(m, l[k]); }
    }
    float o = 0.0, sum = 0.0;
    if (m > NEG_INF) {
        for (int s0 = 0; s0 < p.splits; s0 += MS) {
            float w[MS], v[MS];
            [[unroll]] for (int k = 0; k < MS; ++k) {
                // w: 0 for a split that saw no key (and past the last split), whose O is not read.
                w[k] = s0 + k < p.splits ? exp(part_l[(s0 + k) * rows + row] - m) : 0.0;
                v[k] = w[k] != 0.0 ? part_o[((s0 + k) * rows + row) * p.Dv + d] : 0.0;
            }
            [[unroll]] for (int k = 0; k < MS; ++k) {
                if (w[k] != 0.0) o += w[k] * v[k];
                sum += w[k];
            }
        }
        sum += exp(sink - m);   // the sink: a logit with no value row (0 without one)
        o /= sum;
    }
    const float nan = uintBitsToFloat(0x7FC00000u);
    if (nan_row) o = nan;
    o_data[p.o_base + b * p.o_sb + h * p.o_sh + i * p.o_sl + d * p.o_sd] = OUT_VALUE(o);
    if (p.write_lse != 0 && d == 0)
        lse_data[p.lse_base + b * p.lse_sb + h * p.lse_sh + i * p.lse_sl] = nan_row ? nan : m > NEG_INF ? m + log(sum) : NEG_INF;
    if (p.write_max != 0 && d == 0) {
        float mx = NEG_INF;
        for (int s0 = 0; s0 < p.splits; s0 += MS) {
            float x[MS];
            [[unroll]] for (int k = 0; k < MS; ++k) x[k] = s0 + k < p.splits ? part_max[(s0 + k) * rows + row] : NEG_INF;
            [[unroll]] for (int k = 0; k < MS; ++k) mx = max(mx, x[k]);
        }
        max_data[p.lse_base + b * p.lse_sb + h * p.lse_sh + i * p.lse_sl] = nan_row ? nan : mx;
    }
}
