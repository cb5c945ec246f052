#version 450
// Evaluates the spliced mods over an index grid [B, H, Q, KV] (row-major): score_mod on given
// scores, its derivative, and mask_mod. Used to check generated code against the CPU interpreter.
// form 1 and 2 give score_mod times log2(e) instead, through score_mod_l2 (2: score_mod_l2f, with
// float indices) where the splice has it: the form the attention kernels take.
#extension GL_GOOGLE_include_directive : require

layout(local_size_x = 64) in;
layout(std430, set = 0, binding = 0) readonly buffer Scores { float scores[]; };
layout(std430, set = 0, binding = 1) writeonly buffer OutScore { float out_score[]; };
layout(std430, set = 0, binding = 2) writeonly buffer OutGrad { float out_grad[]; };
layout(std430, set = 0, binding = 3) writeonly buffer OutMask { int out_mask[]; };
layout(push_constant) uniform Push { int B; int H; int Q; int KV; int form; } pc;

// Splice point: score_mod, score_mod_grad, mask_mod; error buffer at binding 4, captures from 5.
#include "flex_mods.glsl"

void main() {
    uint i = gl_GlobalInvocationID.x;
    uint total = uint(pc.B) * uint(pc.H) * uint(pc.Q) * uint(pc.KV);
    if (i >= total) return;
    int kv = int(i % uint(pc.KV));
    int q = int((i / uint(pc.KV)) % uint(pc.Q));
    int h = int((i / (uint(pc.KV) * uint(pc.Q))) % uint(pc.H));
    int b = int(i / (uint(pc.KV) * uint(pc.Q) * uint(pc.H)));
    const float s = scores[i], log2e = 1.4426950408889634;
    float r = score_mod(s, b, h, q, kv) * (pc.form != 0 ? log2e : 1.0);
#ifdef VKF_HAS_SCORE_MOD_L2
    if (pc.form == 1) r = score_mod_l2(s, s * log2e, b, h, q, kv);
#endif
#ifdef VKF_HAS_SCORE_MOD_L2F
    if (pc.form == 2) r = score_mod_l2f(s, s * log2e, b, h, q, kv, float(q), float(kv));
#endif
    out_score[i] = r;
    out_grad[i] = score_mod_grad(scores[i], b, h, q, kv);
    out_mask[i] = mask_mod(b, h, q, kv) ? 1 : 0;
}
