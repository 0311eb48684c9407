// Prompt checks of Generator._check_prompts for one request: empty, outside the vocabulary, over the context
// (an error, or the middle cut out with Truncate::Middle, keeping the beginning and the end as the reference does).
#pragma once

#include <cstdint>
#include <vector>

#include "adaskip/runtime.h"

namespace adaskip::detail {

struct CheckedPrompt {
  std::vector<int64_t> ids;
  bool truncated = false;
};

CheckedPrompt check_prompt(const std::vector<int64_t>& ids, const SamplingOptions& options, int context_len,
                           int vocab_size);

}  // namespace adaskip::detail
