#include "adaskip/detokenizer.h"

#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

namespace adaskip {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr uintmax_t kMaxTokenizerBytes = 64u << 20;  // tokenizer.json files of real models are a few MB

// Length of the valid UTF-8 character at s[i], 0 when none starts there.
size_t utf8_char_len(const std::string& s, size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  size_t n = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 0;
  }
  return n;
}

// Bytes that are not valid UTF-8 become U+FFFD, one per maximal invalid subpart (a lone byte, or the valid start of
// a character cut short), as Rust's String::from_utf8_lossy in Hugging Face tokenizers does.
std::string lossy_utf8(const std::string& bytes) {
  std::string out;
  size_t i = 0;
  while (i < bytes.size()) {
    const auto b = static_cast<unsigned char>(bytes[i]);
    size_t need = b < 0x80                 ? 1
                  : (b >= 0xC2 && b <= 0xDF) ? 2
                  : (b >= 0xE0 && b <= 0xEF) ? 3
                  : (b >= 0xF0 && b <= 0xF4) ? 4
                                             : 0;
    if (need == 0) {  // a continuation byte or a byte no character starts with
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    size_t k = 1;
    for (; k < need && i + k < bytes.size(); ++k) {
      const auto c = static_cast<unsigned char>(bytes[i + k]);
      unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range is narrower after some lead bytes
      if (k == 1 && b == 0xE0) lo = 0xA0;
      if (k == 1 && b == 0xED) hi = 0x9F;
      if (k == 1 && b == 0xF0) lo = 0x90;
      if (k == 1 && b == 0xF4) hi = 0x8F;
      if (c < lo || c > hi) break;
    }
    if (k == need) {
      out.append(bytes, i, need);
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += k;
  }
  return out;
}

// GPT-2's byte-level alphabet, inverted: the code point each byte is written as -> that byte.
const std::map<uint32_t, unsigned char>& byte_level_inverse() {
  static const std::map<uint32_t, unsigned char> inverse = [] {
    std::map<uint32_t, unsigned char> m;
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      m[printable ? b : next++] = static_cast<unsigned char>(b);
    }
    return m;
  }();
  return inverse;
}

std::string byte_level_decode(const std::string& text) {
  std::string bytes;
  for (size_t i = 0; i < text.size();) {
    size_t n = utf8_char_len(text, i);
    if (n == 0) n = 1;
    uint32_t cp = static_cast<unsigned char>(text[i]);
    if (n > 1) {
      cp &= (0xFF >> (n + 1));
      for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3F);
    }
    auto it = byte_level_inverse().find(cp);
    if (it != byte_level_inverse().end()) {
      bytes += static_cast<char>(it->second);
    } else {
      bytes.append(text, i, n);  // not of the alphabet (an added token's text): as it is
    }
    i += n;
  }
  return lossy_utf8(bytes);
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  for (size_t pos = 0; (pos = s.find(from, pos)) != std::string::npos; pos += to.size()) {
    s.replace(pos, from.size(), to);
  }
}

// "<0x41>" -> 'A'; false when the token is not a byte token.
bool byte_token(const std::string& t, char& out) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return false;
  try {
    size_t used = 0;
    int v = std::stoi(t.substr(3, 2), &used, 16);
    if (used != 2) return false;
    out = static_cast<char>(v);
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

Detokenizer::Step parse_step(const json& d) {
  Detokenizer::Step step;
  step.type = d.value("type", "");
  if (step.type == "Replace") {
    const json& pattern = d.value("pattern", json::object());
    if (!pattern.contains("String")) {
      throw EngineDirError("tokenizer.json: a Replace decoder with a regex is not supported");
    }
    step.pattern = pattern["String"].get<std::string>();
    step.content = d.value("content", "");
  } else if (step.type == "Strip") {
    step.content = d.value("content", " ");
    step.start = d.value("start", 0);
    step.stop = d.value("stop", 0);
  } else if (step.type == "Metaspace") {
    step.content = d.value("replacement", "\xE2\x96\x81");
    const std::string scheme = d.value("add_prefix_space", true) ? "always" : "never";  // older files
    step.strip_first = d.value("prepend_scheme", scheme) != "never";
  } else if (step.type != "ByteLevel" && step.type != "ByteFallback" && step.type != "Fuse") {
    throw EngineDirError("tokenizer.json's decoder step '" + step.type + "' is not supported by the C++ detokenizer");
  }
  return step;
}

std::vector<std::string> apply(const Detokenizer::Step& step, std::vector<std::string> tokens) {
  if (step.type == "ByteLevel") {
    std::string joined;
    for (const auto& t : tokens) joined += t;
    return {byte_level_decode(joined)};
  }
  if (step.type == "Fuse") {
    std::string joined;
    for (const auto& t : tokens) joined += t;
    return {joined};
  }
  if (step.type == "ByteFallback") {  // runs of <0xNN> tokens become the text their bytes spell
    std::vector<std::string> out;
    std::string bytes;
    auto flush = [&] {
      if (!bytes.empty()) out.push_back(lossy_utf8(bytes));
      bytes.clear();
    };
    for (const auto& t : tokens) {
      char b;
      if (byte_token(t, b)) {
        bytes += b;
      } else {
        flush();
        out.push_back(t);
      }
    }
    flush();
    return out;
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    std::string& t = tokens[i];
    if (step.type == "Replace") {
      replace_all(t, step.pattern, step.content);
    } else if (step.type == "Metaspace") {
      replace_all(t, step.content, " ");
      if (i == 0 && step.strip_first && !t.empty() && t[0] == ' ') t.erase(0, 1);
    } else if (step.type == "Strip") {
      for (int k = 0; k < step.start && t.compare(0, step.content.size(), step.content) == 0; ++k) {
        t.erase(0, step.content.size());
      }
      for (int k = 0; k < step.stop && t.size() >= step.content.size() &&
                      t.compare(t.size() - step.content.size(), step.content.size(), step.content) == 0; ++k) {
        t.erase(t.size() - step.content.size());
      }
    }
  }
  return tokens;
}

}  // namespace

Detokenizer::Detokenizer(const fs::path& tokenizer_json) {
  std::error_code ec;
  if (!fs::is_regular_file(tokenizer_json, ec)) throw EngineDirError(tokenizer_json.string() + " does not exist");
  if (fs::file_size(tokenizer_json, ec) > kMaxTokenizerBytes) {
    throw EngineDirError(tokenizer_json.string() + " is over 64 MB: not a tokenizer file");
  }
  std::ifstream in(tokenizer_json, std::ios::binary);
  json t = json::parse(in, nullptr, false);
  if (t.is_discarded() || !t.is_object()) throw EngineDirError(tokenizer_json.string() + " is not valid JSON");
  try {
    const json& vocab = t.at("model").at("vocab");
    auto place = [&](int64_t id, const std::string& piece, bool special) {
      if (id < 0 || id > (1 << 24)) throw EngineDirError(tokenizer_json.string() + ": token id out of range");
      if (static_cast<size_t>(id) >= pieces_.size()) {
        pieces_.resize(id + 1);
        special_.resize(id + 1, false);
      }
      pieces_[id] = piece;
      special_[id] = special;
    };
    if (vocab.is_object()) {  // BPE / WordPiece: piece -> id
      for (const auto& [piece, id] : vocab.items()) place(id.get<int64_t>(), piece, false);
    } else {  // Unigram: [[piece, score], ...] in id order
      for (size_t id = 0; id < vocab.size(); ++id) {
        place(static_cast<int64_t>(id), vocab[id].at(0).get<std::string>(), false);
      }
    }
    for (const auto& added : t.value("added_tokens", json::array())) {
      place(added.at("id").get<int64_t>(), added.at("content").get<std::string>(), added.value("special", false));
    }
    const json& decoder = t.value("decoder", json());
    if (decoder.is_null()) throw EngineDirError(tokenizer_json.string() + " has no decoder");
    if (decoder.value("type", "") == "Sequence") {
      for (const auto& d : decoder.at("decoders")) steps_.push_back(parse_step(d));
    } else {
      steps_.push_back(parse_step(decoder));
    }
  } catch (const json::exception& e) {
    throw EngineDirError(tokenizer_json.string() + ": unexpected layout (" + e.what() + ")");
  }
}

std::string Detokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<std::string> tokens;
  for (int64_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= pieces_.size()) {
      throw InputError("token id " + std::to_string(id) + " is outside the tokenizer's vocabulary");
    }
    if (!special_[id]) tokens.push_back(pieces_[id]);
  }
  for (const auto& step : steps_) tokens = apply(step, std::move(tokens));
  std::string text;
  for (const auto& t : tokens) text += t;
  return text;
}

size_t complete_utf8_prefix(const std::string& text) {
  // step back over at most 3 continuation bytes to the last lead byte; keep it only if its character is complete
  size_t i = text.size();
  for (size_t back = 0; back < 4 && i > 0; ++back) {
    const auto b = static_cast<unsigned char>(text[i - 1]);
    if ((b & 0xC0) != 0x80) {  // a lead byte (or ASCII)
      size_t need = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 1;
      return (text.size() - (i - 1) >= need) ? text.size() : i - 1;
    }
    --i;
  }
  return text.size();
}

}  // namespace adaskip
