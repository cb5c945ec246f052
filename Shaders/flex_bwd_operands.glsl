// The operands the backward's matrix passes (flex_attention_bwd_mm.comp, flex_attention_bwd_nv.comp)
// read as 16-byte units: Q, K, V and dO viewed as uvec4 (whole units where p.vec_ok, else gathered
// pairs: flex_mm.glsl's GATHER), and which of them a pass owns and which it stages per step.
// Include after flex_bwd_common.glsl (q_at, k_at, v_at, do_at) and flex_mm.glsl (GATHER).
layout(std430, set = 0, binding = BWD_BINDING_Q) readonly buffer QBufU { uvec4 q_units[]; };
layout(std430, set = 0, binding = BWD_BINDING_K) readonly buffer KBufU { uvec4 k_units[]; };
layout(std430, set = 0, binding = BWD_BINDING_V) readonly buffer VBufU { uvec4 v_units[]; };
layout(std430, set = 0, binding = BWD_BINDING_DO) readonly buffer DOBufU { uvec4 do_units[]; };
GATHER(q_data, q_units)
GATHER(k_data, k_units)
GATHER(v_data, v_units)
GATHER(do_data, do_units)

#if BWD_PASS == 1
// Owned rows: query rows (X = Q, Y = dO); staged: keys (X = K, Y = V).
#define OWN_X(b, h, i, u) unit_q_data(q_at(b, h, i), p.q_sd, u)
#define OWN_Y(b, h, i, u) unit_do_data(do_at(b, h, i), p.do_sd, u)
#define STEP_X(b, h, j, u) unit_k_data(k_at(b, h, j), p.k_sd, u)
#define STEP_Y(b, h, j, u) unit_v_data(v_at(b, h, j), p.v_sd, u)
#else
// Owned rows: keys (X = K, Y = V); staged: query rows (X = Q, Y = dO).
#define OWN_X(b, h, j, u) unit_k_data(k_at(b, h, j), p.k_sd, u)
#define OWN_Y(b, h, j, u) unit_v_data(v_at(b, h, j), p.v_sd, u)
#define STEP_X(b, h, i, u) unit_q_data(q_at(b, h, i), p.q_sd, u)
#define STEP_Y(b, h, i, u) unit_do_data(do_at(b, h, i), p.do_sd, u)
#endif
