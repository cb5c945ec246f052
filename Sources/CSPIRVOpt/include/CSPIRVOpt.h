#ifndef CSPIRVOPT_H
#define CSPIRVOPT_H
// A C entry point to SPIRV-Tools' optimizer with an explicit pass list (shaderc only offers its
// fixed "performance" and "size" recipes).
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Runs the passes named by `flags` (spirv-opt's command-line spellings, e.g. "--ssa-rewrite")
/// over `words`. On success returns 0 and sets `*out` (free it with vkflex_spirv_free) and
/// `*out_count`; on failure returns nonzero and writes the optimizer's messages into `error`.
int vkflex_spirv_optimize(const uint32_t *words, size_t count, const char *const *flags, size_t flag_count,
                          uint32_t **out, size_t *out_count, char *error, size_t error_length);
void vkflex_spirv_free(uint32_t *words);

/// Whether instructions of `opcode` have a result id and a result type (from the SPIR-V headers'
/// grammar). Unknown opcodes report neither.
void vkflex_spirv_has_result(uint32_t opcode, int *has_result, int *has_result_type);

#ifdef __cplusplus
}
#endif
#endif
