// adaskip_generate: generate token ids with an adaskip engine directory from C++ (example CLI of the runtime).
//
//   adaskip_generate --engine DIR --ids 1,2,3 --max-new-tokens 32 [--temperature T --top-k K --top-p P --seed S]
//                    [--stop-ids 2,3 | --stop-ids ""] [--truncate error|middle] [--threads N] [--stream] [--json]
//                    [--text]
//   adaskip_generate --engine DIR --jsonl [sampling flags as defaults] [--threads N] [--text]
//
// Prints the new token ids (space separated; the text with --text) and a statistics line on stderr, or one JSON
// object with --json. --jsonl keeps the engine loaded and answers one request per stdin line with one JSON line.
// User errors print "adaskip_generate: error: ..." and exit with status 2, as the Python CLIs do.
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "adaskip/detokenizer.h"
#include "adaskip/runtime.h"

namespace {

const char* kUsage =
    "usage: adaskip_generate --engine DIR (--ids 1,2,3 | --ids-file FILE) [--max-new-tokens N] [--temperature T]\n"
    "                        [--top-k K] [--top-p P] [--seed S] [--stop-ids LIST] [--truncate error|middle]\n"
    "                        [--threads N] [--spinning] [--decode-kernels LIB] [--stream] [--json] [--text]\n"
    "       adaskip_generate --engine DIR --jsonl [sampling flags] [--threads N] [--spinning] [--decode-kernels LIB]\n"
    "                        [--text]\n"
    "  --ids LIST        prompt token ids, comma separated\n"
    "  --ids-file FILE   prompt token ids, separated by commas or whitespace\n"
    "  --max-new-tokens  default 128\n"
    "  --temperature     0 = greedy (default)\n"
    "  --stop-ids LIST   stop token ids (default: the engine's end-of-sequence tokens; \"\" = none)\n"
    "  --spinning        ONNX Runtime's intra-op threads spin between kernels instead of sleeping (faster decode\n"
    "                    on cores of its own; default: $ADASKIP_SPINNING, else off)\n"
    "  --decode-kernels LIB  cpp/ortops's library (build/lib/libadaskip_ortops.so): decode steps run their attention\n"
    "                    on its kernel (default: $ADASKIP_DECODE_KERNELS, else ONNX Runtime's kernels only)\n"
    "  --stream          print each token as it is generated\n"
    "  --json            print the result and skip statistics as one JSON object\n"
    "  --text            print the generated text (the engine dir's tokenizer.json) instead of token ids;\n"
    "                    with --json, add it under \"text\"\n"
    "  --jsonl           serve requests from stdin, one JSON object per line ({\"ids\": [..]} and any of\n"
    "                    max_new_tokens, temperature, top_k, top_p, seed, stop_ids, truncate; the flags give the\n"
    "                    defaults); answers one line each: the --json object, or {\"error\": \"...\"} for a bad\n"
    "                    request, after which the next line is served\n";

// One --jsonl request line at most (a 128k-token prompt is ~1 MB of ids): longer lines are refused, not buffered.
constexpr size_t kMaxLineBytes = 16 << 20;

struct UsageError : adaskip::InputError {
  using adaskip::InputError::InputError;
};

long long parse_int(const std::string& flag, const std::string& s) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno == ERANGE) throw UsageError(flag + " needs an integer; got '" + s + "'");
  return v;
}

double parse_float(const std::string& flag, const std::string& s) {
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || errno == ERANGE) throw UsageError(flag + " needs a number; got '" + s + "'");
  return v;
}

// Counts and sizes given as flags or request keys: anything beyond is a mistake, and an int holds it.
constexpr int64_t kSmallIntLimit = int64_t{1} << 30;

int parse_small_int(const std::string& flag, const std::string& s) {
  long long v = parse_int(flag, s);
  if (v < -kSmallIntLimit || v > kSmallIntLimit) throw UsageError(flag + " is out of range: " + s);
  return static_cast<int>(v);
}

// --truncate's and a request's "truncate" value; nullopt for anything else (the caller says which it was).
std::optional<adaskip::Truncate> parse_truncate(const std::string& value) {
  if (value == "error") return adaskip::Truncate::Error;
  if (value == "middle") return adaskip::Truncate::Middle;
  return std::nullopt;
}

std::vector<int64_t> parse_ids(const std::string& flag, std::string text) {
  for (char& c : text) {
    if (c == ',' || c == '\n' || c == '\t' || c == '\r') c = ' ';
  }
  std::istringstream in(text);
  std::vector<int64_t> ids;
  for (std::string tok; in >> tok;) ids.push_back(parse_int(flag, tok));
  return ids;
}

// Reads the next line of `in` into `line` (false at the end of input); a line over kMaxLineBytes is consumed to its
// end and comes back as `too_long` instead of being held in memory.
bool read_line(std::istream& in, std::string& line, bool& too_long) {
  line.clear();
  too_long = false;
  int c;
  while ((c = in.get()) != EOF && c != '\n') {
    if (line.size() < kMaxLineBytes) {
      line.push_back(static_cast<char>(c));
    } else {
      too_long = true;
    }
  }
  if (too_long) line.clear();
  return c != EOF || !line.empty() || too_long;
}

// A request's value as an error message quotes it: a scalar, cut short; an array or object only by its type (its
// nesting may be deeper than dump() can recurse, and its size up to a whole line).
std::string quote(const nlohmann::json& value) {
  if (value.is_structured()) return std::string("an ") + value.type_name();
  std::string text = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return text.size() > 80 ? text.substr(0, 77) + "..." : text;
}

// A request's integer in [lo, hi]: JSON's 1.5 or 1e300 is refused, not rounded or wrapped into range.
int64_t json_int(const std::string& key, const nlohmann::json& value, int64_t lo, int64_t hi) {
  if (!value.is_number_integer()) throw adaskip::InputError(key + " must be an integer; got " + quote(value));
  // nlohmann keeps every non-negative integer as unsigned: compare in the type it holds
  const bool in_range = value.is_number_unsigned()
                            ? value.get<uint64_t>() <= static_cast<uint64_t>(hi) &&
                                  (lo <= 0 || value.get<uint64_t>() >= static_cast<uint64_t>(lo))
                            : value.get<int64_t>() >= lo && value.get<int64_t>() <= hi;
  if (!in_range) throw adaskip::InputError(key + " is out of range: " + quote(value));
  return value.is_number_unsigned() ? static_cast<int64_t>(value.get<uint64_t>()) : value.get<int64_t>();
}

std::vector<int64_t> json_ids(const std::string& key, const nlohmann::json& value) {
  if (!value.is_array()) throw adaskip::InputError(key + " must be a list of token ids");
  std::vector<int64_t> ids;
  ids.reserve(value.size());
  for (const auto& v : value) ids.push_back(json_int(key, v, INT64_MIN, INT64_MAX));  // range: check_prompt's job
  return ids;
}

double json_number(const std::string& key, const nlohmann::json& value) {
  if (!value.is_number()) throw adaskip::InputError(key + " must be a number; got " + quote(value));
  return value.get<double>();
}

// The sampling options of one --jsonl request: the command line's, overridden by the request's keys.
adaskip::SamplingOptions request_options(const nlohmann::json& req, adaskip::SamplingOptions opts) {
  for (const auto& [key, value] : req.items()) {
    if (key == "ids") continue;
    if (key == "max_new_tokens") {
      opts.max_new_tokens = static_cast<int>(json_int(key, value, -kSmallIntLimit, kSmallIntLimit));
    } else if (key == "temperature") {
      opts.temperature = json_number(key, value);
    } else if (key == "top_k") {
      opts.top_k = static_cast<int>(json_int(key, value, -kSmallIntLimit, kSmallIntLimit));
    } else if (key == "top_p") {
      opts.top_p = json_number(key, value);
    } else if (key == "seed") {
      opts.seed = static_cast<uint64_t>(json_int(key, value, 0, INT64_MAX));
    } else if (key == "stop_ids") {
      opts.stop_token_ids = json_ids(key, value);
    } else if (key == "truncate") {
      const auto truncate = value.is_string() ? parse_truncate(value.get<std::string>()) : std::nullopt;
      if (!truncate) throw adaskip::InputError("truncate must be error or middle; got " + quote(value));
      opts.truncate = *truncate;
    } else {
      throw adaskip::InputError("unknown request key '" + key + "'");
    }
  }
  adaskip::validate(opts);
  return opts;
}

// The result line of one request: the --json object (with "text" when a detokenizer is given).
std::string result_json(const adaskip::GenerationResult& r, const adaskip::Detokenizer* detok) {
  if (!detok) return adaskip::to_json(r);
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(adaskip::to_json(r));
  j["text"] = detok->decode(r.tokens);
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);  // a cut character becomes U+FFFD
}

// {"error": message}: a message may quote the request's bytes, which need not be UTF-8 (replaced, not thrown on).
std::string error_json(const std::string& message) {
  return nlohmann::json{{"error", message}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// --jsonl: one request per stdin line, one answer per stdout line (flushed), until the end of input. A bad request
// is answered with its error and costs nothing else: the engine stays loaded for the next line.
void serve_lines(const adaskip::Runtime& runtime, const adaskip::SamplingOptions& defaults,
                 const adaskip::Detokenizer* detok) {
  std::string line;
  bool too_long = false;
  while (read_line(std::cin, line, too_long)) {
    std::string answer;
    try {
      if (too_long) throw adaskip::InputError("request line longer than " + std::to_string(kMaxLineBytes) + " bytes");
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines are not requests
      const nlohmann::json req = nlohmann::json::parse(line);
      if (!req.is_object() || !req.contains("ids")) {
        throw adaskip::InputError("a request is a JSON object with \"ids\": [token ids]");
      }
      const std::vector<int64_t> ids = json_ids("ids", req.at("ids"));
      if (ids.empty()) throw adaskip::InputError("prompt is empty");
      answer = result_json(runtime.generate(ids, request_options(req, defaults)), detok);
    } catch (const adaskip::Error& e) {
      answer = error_json(e.what());
    } catch (const nlohmann::json::exception& e) {  // not JSON, or a key of the wrong type
      answer = error_json(std::string("bad request: ") + e.what());
    } catch (const std::exception& e) {  // ONNX Runtime's own failures: this request's, not the next one's
      answer = error_json(std::string("internal error: ") + e.what());
    }
    std::cout << answer << '\n' << std::flush;
  }
}

int run(int argc, char** argv) {
  std::string engine;
  std::vector<int64_t> ids;
  bool have_ids = false, json = false, stream = false, text = false, jsonl = false;
  adaskip::SamplingOptions opts;
  adaskip::RuntimeOptions rt_opts;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (flag == "--json") {
      json = true;
      continue;
    }
    if (flag == "--text") {
      text = true;
      continue;
    }
    if (flag == "--jsonl") {
      jsonl = true;
      continue;
    }
    if (flag == "--stream") {
      stream = true;
      continue;
    }
    if (flag == "--spinning") {
      rt_opts.spinning = 1;
      continue;
    }
    if (i + 1 >= argc) throw UsageError(flag + (flag.rfind("--", 0) == 0 ? " needs a value" : ": unknown argument"));
    const std::string value = argv[++i];
    if (flag == "--engine") {
      engine = value;
    } else if (flag == "--decode-kernels") {
      rt_opts.decode_kernels = value;
    } else if (flag == "--ids") {
      ids = parse_ids(flag, value);
      have_ids = true;
    } else if (flag == "--ids-file") {
      std::ifstream in(value);
      if (!in) throw adaskip::InputError("cannot read --ids-file " + value);
      std::stringstream buf;
      buf << in.rdbuf();
      ids = parse_ids(flag, buf.str());
      have_ids = true;
    } else if (flag == "--max-new-tokens") {
      opts.max_new_tokens = parse_small_int(flag, value);
    } else if (flag == "--temperature") {
      opts.temperature = parse_float(flag, value);
    } else if (flag == "--top-k") {
      opts.top_k = parse_small_int(flag, value);
    } else if (flag == "--top-p") {
      opts.top_p = parse_float(flag, value);
    } else if (flag == "--seed") {
      opts.seed = static_cast<uint64_t>(parse_int(flag, value));
    } else if (flag == "--stop-ids") {
      opts.stop_token_ids = parse_ids(flag, value);
    } else if (flag == "--truncate") {
      const auto truncate = parse_truncate(value);
      if (!truncate) throw UsageError("--truncate must be error or middle; got " + value);
      opts.truncate = *truncate;
    } else if (flag == "--threads") {
      rt_opts.threads = parse_small_int(flag, value);
      if (rt_opts.threads < 1) throw UsageError("--threads must be >= 1");
    } else {
      throw UsageError("unknown argument " + flag);
    }
  }
  if (engine.empty()) throw UsageError("--engine DIR is required");
  if (jsonl && (have_ids || stream || json)) throw UsageError("--jsonl reads its prompts from stdin and answers JSON: "
                                                             "no --ids, --ids-file, --stream or --json with it");
  if (!have_ids && !jsonl) throw UsageError("give the prompt as --ids 1,2,3 or --ids-file FILE");
  adaskip::validate(opts);  // before the (slow) engine load
  if (ids.empty() && !jsonl) throw adaskip::InputError("prompt is empty");

  adaskip::Runtime runtime(engine, rt_opts);
  std::optional<adaskip::Detokenizer> detok;
  if (text) detok.emplace(runtime.engine_dir() / "tokenizer" / "tokenizer.json");
  if (jsonl) {
    serve_lines(runtime, opts, detok ? &*detok : nullptr);
    return 0;
  }
  adaskip::TokenCallback print_token;
  std::vector<int64_t> streamed;
  size_t printed = 0;  // bytes of the streamed text already printed
  if (stream && !json) {
    print_token = [&](int64_t token) {
      if (!detok) {
        std::cout << token << ' ' << std::flush;
        return true;
      }
      streamed.push_back(token);
      std::string so_far = detok->decode(streamed);
      size_t ready = adaskip::complete_utf8_prefix(so_far);  // hold back half a character
      if (ready > printed) std::cout << so_far.substr(printed, ready - printed) << std::flush;
      printed = std::max(printed, ready);
      return true;
    };
  }
  adaskip::GenerationResult r = runtime.generate(ids, opts, print_token);
  if (json) {
    std::cout << result_json(r, detok ? &*detok : nullptr) << '\n';
    return 0;
  }
  if (detok) {
    std::string all = detok->decode(r.tokens);
    std::cout << (printed <= all.size() ? all.substr(printed) : std::string());
  } else if (!stream) {
    for (size_t i = 0; i < r.tokens.size(); ++i) std::cout << (i ? " " : "") << r.tokens[i];
  }
  std::cout << '\n';
  const auto& s = r.skips;
  // the Python CLI's summary line, number for number (adaskip-run)
  std::cerr << std::fixed << "[adaskip] TTFT " << std::setprecision(0) << r.ttft_s * 1000 << " ms | decode "
            << std::setprecision(1) << r.decode_tokens_per_s() << " tok/s | prompt " << r.prompt_tokens << " + "
            << r.tokens.size() << " new (" << r.finish_reason << ") | skipped: prefill " << s.prefill_skipped.size()
            << ", decode " << s.decode_skipped_offline.size() << " offline + " << s.decode_skipped_online.size()
            << " online | KV saved " << s.kv_bytes_saved() / double(1 << 20) << " MiB of "
            << s.kv_bytes_full / double(1 << 20) << " MiB\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "adaskip_generate: error: " << e.what() << " (see adaskip_generate --help)\n";
    return 2;
  } catch (const adaskip::Error& e) {
    std::cerr << "adaskip_generate: error: " << e.what() << '\n';
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "adaskip_generate: internal error: " << e.what() << '\n';
    return 1;
  }
}
