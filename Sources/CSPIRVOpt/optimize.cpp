#include "CSPIRVOpt.h"

#include <spirv-tools/optimizer.hpp>
#define SPV_ENABLE_UTILITY_CODE
#include <spirv/unified1/spirv.hpp>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

extern "C" int vkflex_spirv_optimize(const uint32_t *words, size_t count, const char *const *flags, size_t flag_count,
                                     uint32_t **out, size_t *out_count, char *error, size_t error_length) {
    std::string messages;
    try {
        spvtools::Optimizer optimizer(SPV_ENV_VULKAN_1_2);
        optimizer.SetMessageConsumer([&messages](spv_message_level_t level, const char *, const spv_position_t &position,
                                                 const char *message) {
            if (level <= SPV_MSG_ERROR) {
                messages += "at word " + std::to_string(position.index) + ": " + message + "\n";
            }
        });
        std::vector<std::string> list(flags, flags + flag_count);
        if (!optimizer.RegisterPassesFromFlags(list)) {
            messages += "unknown optimizer pass in the list\n";
        } else {
            spvtools::OptimizerOptions options;
            options.set_run_validator(false);   // shaderc's output; the driver validates what it needs
            std::vector<uint32_t> result;
            if (optimizer.Run(words, count, &result, options)) {
                uint32_t *copy = static_cast<uint32_t *>(std::malloc(result.size() * sizeof(uint32_t)));
                if (copy == nullptr) {
                    messages += "out of memory\n";
                } else {
                    std::memcpy(copy, result.data(), result.size() * sizeof(uint32_t));
                    *out = copy;
                    *out_count = result.size();
                    return 0;
                }
            } else if (messages.empty()) {
                messages += "the optimizer failed without a message\n";
            }
        }
    } catch (const std::exception &e) {
        messages += e.what();
    }
    if (error != nullptr && error_length > 0) {
        std::strncpy(error, messages.c_str(), error_length - 1);
        error[error_length - 1] = '\0';
    }
    return 1;
}

extern "C" void vkflex_spirv_free(uint32_t *words) { std::free(words); }

extern "C" void vkflex_spirv_has_result(uint32_t opcode, int *has_result, int *has_result_type) {
    bool result = false, type = false;
    spv::HasResultAndType(static_cast<spv::Op>(opcode), &result, &type);
    *has_result = result ? 1 : 0;
    *has_result_type = type ? 1 : 0;
}
