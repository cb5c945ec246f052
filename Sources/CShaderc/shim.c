#include "CShaderc.h"
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

struct vkflex_include_table {
    size_t count;
    char **names;
    char **contents;
};

vkflex_include_table *vkflex_include_table_create(const char *const *names, const char *const *contents, size_t count) {
    vkflex_include_table *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->count = count;
    t->names = calloc(count ? count : 1, sizeof(char *));
    t->contents = calloc(count ? count : 1, sizeof(char *));
    for (size_t i = 0; i < count; ++i) {
        t->names[i] = strdup(names[i]);
        t->contents[i] = strdup(contents[i]);
    }
    return t;
}

void vkflex_include_table_destroy(vkflex_include_table *t) {
    if (!t) return;
    for (size_t i = 0; i < t->count; ++i) { free(t->names[i]); free(t->contents[i]); }
    free(t->names);
    free(t->contents);
    free(t);
}

static shaderc_include_result *make_result(const char *name, const char *content) {
    shaderc_include_result *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    char *n = strdup(name), *c = strdup(content);
    r->source_name = n;
    r->source_name_length = strlen(n);
    r->content = c;
    r->content_length = strlen(c);
    return r;
}

static shaderc_include_result *resolve(void *user_data, const char *requested, int type,
                                       const char *requesting, size_t depth) {
    (void)type; (void)requesting;
    vkflex_include_table *t = user_data;
    const char *want = requested;
    while (want[0] == '.' && want[1] == '/') want += 2;
    if (depth > 32) return make_result("", "#include nested more than 32 levels deep");
    for (size_t i = 0; t && i < t->count; ++i) {
        if (strcmp(t->names[i], want) == 0) return make_result(t->names[i], t->contents[i]);
    }
    char message[512];
    snprintf(message, sizeof message, "no shader include named \"%s\" (embedded from Shaders/)", requested);
    return make_result("", message);
}

static void release(void *user_data, shaderc_include_result *r) {
    (void)user_data;
    if (!r) return;
    free((void *)r->source_name);
    free((void *)r->content);
    free(r);
}

void vkflex_shaderc_use_includes(shaderc_compile_options_t options, vkflex_include_table *table) {
    shaderc_compile_options_set_include_callbacks(options, resolve, release, table);
}

unsigned int vkflex_shaderc_version(void) {
    unsigned int version = 0, revision = 0;
    shaderc_get_spv_version(&version, &revision);
    return version;
}
