// Element types of the attention inputs and outputs, and their conversions to and from float —
// the one place a kernel learns a dtype. Define IN_F16 / IN_BF16 and OUT_F16 / OUT_BF16 (0/1;
// neither: float32) before including; it defines IN_T, OUT_T, IN_FLOAT(x), OUT_VALUE(x), and
// for 16-byte loads UNIT (elements per uvec4/vec4) with unit_floats(w, f).
//
// bfloat16 is the high half of a float32: widening is a shift (exact); narrowing rounds to nearest
// even as PyTorch's `.to(torch.bfloat16)` does (NaN stays a quiet NaN, overflow gives ±inf). It
// needs 16-bit storage only, no 16-bit arithmetic.
#ifndef IN_F16
#define IN_F16 0
#endif
#ifndef IN_BF16
#define IN_BF16 0
#endif
#ifndef OUT_F16
#define OUT_F16 0
#endif
#ifndef OUT_BF16
#define OUT_BF16 0
#endif
#if IN_F16 || OUT_F16 || IN_BF16 || OUT_BF16
#extension GL_EXT_shader_16bit_storage : require
#endif
#if IN_F16 || OUT_F16
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#endif

#if IN_F16
#define IN_T float16_t
#define IN_FLOAT(x) float(x)
#elif IN_BF16
#define IN_T uint16_t
#define IN_FLOAT(x) uintBitsToFloat(uint(x) << 16)
#else
#define IN_T float
#define IN_FLOAT(x) float(x)
#endif

#if IN_BF16 || OUT_BF16
// The bits of the nearest bfloat16 (ties to even); a NaN keeps its sign and becomes quiet.
uint vkf_bf16_bits(float x) {
    const uint u = floatBitsToUint(x);
    return isnan(x) ? (u >> 16) | 0x40u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
#endif

#if OUT_F16
#define OUT_T float16_t
#define OUT_VALUE(x) OUT_T(x)
#elif OUT_BF16
#define OUT_T uint16_t
// The narrowing to 16 bits happens in the store (a 16-bit value anywhere else needs Int16 arithmetic).
#define OUT_VALUE(x) uint16_t(vkf_bf16_bits(x))
#else
#define OUT_T float
#define OUT_VALUE(x) OUT_T(x)
#endif

// PAIR(x, y): two 16-bit input elements as one word, x in the low half (a 16-byte unit's order);
// OUT_LO(w) / OUT_HI(w): the two 16-bit output elements of a word; OUT_ROUND(x): x rounded to the
// output's precision and still a float (bfloat16: exactly what OUT_VALUE would store, so that a
// later conversion to bfloat16, whose rounding the driver picks, is exact).
#if IN_BF16
#define PAIR(x, y) (uint(x) | (uint(y) << 16))
#elif IN_F16
#define PAIR(x, y) packFloat2x16(f16vec2(x, y))
#endif
#if OUT_BF16
#define OUT_LO(w) uint16_t((w) & 0xFFFFu)
#define OUT_HI(w) uint16_t((w) >> 16)
#define OUT_ROUND(x) uintBitsToFloat(vkf_bf16_bits(x) << 16)
#elif OUT_F16
#define OUT_LO(w) unpackFloat2x16(w).x
#define OUT_HI(w) unpackFloat2x16(w).y
#define OUT_ROUND(x) (x)
#endif

// 16-byte loads: UNIT elements per word group, unit_floats widens them.
#if IN_F16 || IN_BF16
#define UNIT 8
#define UNIT_T uvec4
#else
#define UNIT 4
#define UNIT_T vec4
#endif
void unit_floats(UNIT_T w, out float f[UNIT]) {
#if IN_F16
    for (int i = 0; i < 4; ++i) { const vec2 h = vec2(unpackFloat2x16(w[i])); f[2 * i] = h.x; f[2 * i + 1] = h.y; }
#elif IN_BF16
    for (int i = 0; i < 4; ++i) { f[2 * i] = uintBitsToFloat(w[i] << 16); f[2 * i + 1] = uintBitsToFloat(w[i] & 0xFFFF0000u); }
#else
    for (int i = 0; i < 4; ++i) f[i] = w[i];
#endif
}
