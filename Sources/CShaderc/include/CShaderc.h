#ifndef VKFLEX_CSHADERC_H
#define VKFLEX_CSHADERC_H
#include <stddef.h>
#include <shaderc/shaderc.h>

/// A table of include files (name -> GLSL text) that `#include "name"` resolves against.
typedef struct vkflex_include_table vkflex_include_table;

/// Copies `count` names and contents into a new table.
vkflex_include_table *vkflex_include_table_create(const char *const *names, const char *const *contents, size_t count);
void vkflex_include_table_destroy(vkflex_include_table *table);
/// Makes `options` resolve includes from `table` (which must outlive every compile using `options`).
void vkflex_shaderc_use_includes(shaderc_compile_options_t options, vkflex_include_table *table);
/// The SPIR-V version libshaderc emits by default.
unsigned int vkflex_shaderc_version(void);
#endif
