// Token ids back to text with an engine dir's tokenizer/tokenizer.json (the Hugging Face tokenizers format), for
// display. Runs the file's decoder pipeline: ByteLevel (GPT-2 / Llama-3 / SmolLM style byte-level BPE) and the
// SentencePiece-style steps (Replace, ByteFallback, Fuse, Strip, Metaspace: Llama-2 / Gemma style). Special tokens
// are left out, as Python's decode(..., skip_special_tokens=True) does. Encoding is not offered: prompts come as
// ids (tokenize with Hugging Face tokenizers), so the C++ side never has to match a pre-tokenizer.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "adaskip/errors.h"

namespace adaskip {

class Detokenizer {
 public:
  // Reads tokenizer.json; throws EngineDirError when it is missing, malformed or uses a decoder step not listed above.
  explicit Detokenizer(const std::filesystem::path& tokenizer_json);

  // UTF-8 text of `ids` (ids outside the vocabulary are an InputError). A byte sequence that is not valid UTF-8
  // becomes U+FFFD, as in Hugging Face tokenizers.
  std::string decode(const std::vector<int64_t>& ids) const;

  struct Step {
    std::string type;
    std::string pattern, content;  // Replace: pattern -> content; Strip: the character; Metaspace: the replacement
    int start = 0, stop = 0;       // Strip
    bool strip_first = false;      // Metaspace: drop the space it prepended to the first word
  };

 private:
  std::vector<std::string> pieces_;  // id -> token string
  std::vector<bool> special_;
  std::vector<Step> steps_;
};

// Length of the longest prefix of `text` that does not end inside a UTF-8 character (for streaming text).
size_t complete_utf8_prefix(const std::string& text);

}  // namespace adaskip
