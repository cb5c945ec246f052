#version 450
// Builds a BlockMask from a mask_mod without materializing the dense mask.
//
// Default variant (classify): one workgroup per (kv block, q block, b*h) tile evaluates mask_mod over
// the in-range elements of the tile and writes its class: 0 empty, 1 partial, 2 full.
// COMPACT variant: one invocation per q-block row (then per kv-block column) turns the classes into
// PyTorch's index lists: kv_num_blocks/kv_indices (partial), full_kv_*, and the transposes q_*.
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require

#ifndef COMPACT
layout(local_size_x_id = 0) in;
layout(std430, set = 0, binding = 0) writeonly buffer Classes { int classes[]; };
layout(push_constant) uniform Push {
    int q_len; int kv_len; int q_block; int kv_block; int q_blocks; int kv_blocks; int heads; int pad;
} pc;

// Splice point: mask_mod (error buffer at binding 1, captures from binding 2).
#include "flex_mods.glsl"

shared int s_count;

void main() {
    int kvb = int(gl_WorkGroupID.x), qb = int(gl_WorkGroupID.y), bh = int(gl_WorkGroupID.z);
    int b = bh / pc.heads, h = bh % pc.heads;
    int q0 = qb * pc.q_block, kv0 = kvb * pc.kv_block;
    int qn = min(pc.q_block, pc.q_len - q0), kn = min(pc.kv_block, pc.kv_len - kv0);
    int total = qn * kn;
    if (gl_LocalInvocationIndex == 0) s_count = 0;
    barrier();
    // Threads as a grid of 32 columns by (workgroup / 32) rows: no division per element.
    int count = 0;
    const int lanes = 32, rows_at_once = int(gl_WorkGroupSize.x) / 32;
    int c0 = int(gl_LocalInvocationIndex) % lanes, r0 = int(gl_LocalInvocationIndex) / lanes;
    for (int r = r0; r < qn; r += rows_at_once) {
        for (int c = c0; c < kn; c += lanes) {
            if (mask_mod(b, h, q0 + r, kv0 + c)) count += 1;
        }
    }
    count = subgroupAdd(count);
    if (subgroupElect()) atomicAdd(s_count, count);
    barrier();
    if (gl_LocalInvocationIndex == 0) {
        int c = s_count;
        classes[(bh * pc.q_blocks + qb) * pc.kv_blocks + kvb] = c == 0 ? 0 : (c == total ? 2 : 1);
    }
}
#else
layout(local_size_x = 64) in;
layout(std430, set = 0, binding = 0) readonly buffer Classes { int classes[]; };
layout(std430, set = 0, binding = 1) writeonly buffer KvNum { int kv_num[]; };
layout(std430, set = 0, binding = 2) writeonly buffer KvIdx { int kv_idx[]; };
layout(std430, set = 0, binding = 3) writeonly buffer FullKvNum { int full_kv_num[]; };
layout(std430, set = 0, binding = 4) writeonly buffer FullKvIdx { int full_kv_idx[]; };
layout(std430, set = 0, binding = 5) writeonly buffer QNum { int q_num[]; };
layout(std430, set = 0, binding = 6) writeonly buffer QIdx { int q_idx[]; };
layout(std430, set = 0, binding = 7) writeonly buffer FullQNum { int full_q_num[]; };
layout(std430, set = 0, binding = 8) writeonly buffer FullQIdx { int full_q_idx[]; };
layout(push_constant) uniform Push { int q_blocks; int kv_blocks; int bh_count; int pad; } pc;

void main() {
    int i = int(gl_GlobalInvocationID.x);
    int rows = pc.bh_count * pc.q_blocks, cols = pc.bh_count * pc.kv_blocks;
    if (i < rows) {
        int base = i * pc.kv_blocks;
        int p = 0, f = 0;
        for (int kvb = 0; kvb < pc.kv_blocks; ++kvb) {
            int c = classes[base + kvb];
            if (c == 1) { kv_idx[base + p] = kvb; p += 1; }
            else if (c == 2) { full_kv_idx[base + f] = kvb; f += 1; }
        }
        for (int k = p; k < pc.kv_blocks; ++k) kv_idx[base + k] = 0;
        for (int k = f; k < pc.kv_blocks; ++k) full_kv_idx[base + k] = 0;
        kv_num[i] = p;
        full_kv_num[i] = f;
    } else if (i < rows + cols) {
        int j = i - rows;
        int bh = j / pc.kv_blocks, kvb = j - bh * pc.kv_blocks;
        int base = j * pc.q_blocks;
        int p = 0, f = 0;
        for (int qb = 0; qb < pc.q_blocks; ++qb) {
            int c = classes[(bh * pc.q_blocks + qb) * pc.kv_blocks + kvb];
            if (c == 1) { q_idx[base + p] = qb; p += 1; }
            else if (c == 2) { full_q_idx[base + f] = qb; f += 1; }
        }
        for (int k = p; k < pc.q_blocks; ++k) q_idx[base + k] = 0;
        for (int k = f; k < pc.q_blocks; ++k) full_q_idx[base + k] = 0;
        q_num[j] = p;
        full_q_num[j] = f;
    }
}
#endif
