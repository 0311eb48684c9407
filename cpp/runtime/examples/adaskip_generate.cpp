// adaskip_generate: generate token ids with an adaskip engine directory from C++ (example CLI of the runtime).
//
//   adaskip_generate --engine DIR --ids 1,2,3 --max-new-tokens 32 [--temperature T --top-k K --top-p P --seed S]
//                    [--stop-ids 2,3 | --stop-ids ""] [--truncate error|middle] [--threads N] [--stream] [--json]
//                    [--text]
//
// Prints the new token ids (space separated; the text with --text) and a statistics line on stderr, or one JSON
// object with --json.
// User errors print "adaskip_generate: error: ..." and exit with status 2, as the Python CLIs do.
#include <algorithm>
#include <cerrno>
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
    "                        [--threads N] [--stream] [--json] [--text]\n"
    "  --ids LIST        prompt token ids, comma separated\n"
    "  --ids-file FILE   prompt token ids, separated by commas or whitespace\n"
    "  --max-new-tokens  default 128\n"
    "  --temperature     0 = greedy (default)\n"
    "  --stop-ids LIST   stop token ids (default: the engine's end-of-sequence tokens; \"\" = none)\n"
    "  --stream          print each token as it is generated\n"
    "  --json            print the result and skip statistics as one JSON object\n"
    "  --text            print the generated text (the engine dir's tokenizer.json) instead of token ids;\n"
    "                    with --json, add it under \"text\"\n";

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

int parse_small_int(const std::string& flag, const std::string& s) {
  long long v = parse_int(flag, s);
  if (v < -(1LL << 30) || v > (1LL << 30)) throw UsageError(flag + " is out of range: " + s);
  return static_cast<int>(v);
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

int run(int argc, char** argv) {
  std::string engine;
  std::vector<int64_t> ids;
  bool have_ids = false, json = false, stream = false, text = false;
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
    if (flag == "--stream") {
      stream = true;
      continue;
    }
    if (i + 1 >= argc) throw UsageError(flag + (flag.rfind("--", 0) == 0 ? " needs a value" : ": unknown argument"));
    const std::string value = argv[++i];
    if (flag == "--engine") {
      engine = value;
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
      if (value != "error" && value != "middle") throw UsageError("--truncate must be error or middle; got " + value);
      opts.truncate = value == "middle" ? adaskip::Truncate::Middle : adaskip::Truncate::Error;
    } else if (flag == "--threads") {
      rt_opts.threads = parse_small_int(flag, value);
      if (rt_opts.threads < 1) throw UsageError("--threads must be >= 1");
    } else {
      throw UsageError("unknown argument " + flag);
    }
  }
  if (engine.empty()) throw UsageError("--engine DIR is required");
  if (!have_ids) throw UsageError("give the prompt as --ids 1,2,3 or --ids-file FILE");
  adaskip::validate(opts);  // before the (slow) engine load
  if (ids.empty()) throw adaskip::InputError("prompt is empty");

  adaskip::Runtime runtime(engine, rt_opts);
  std::optional<adaskip::Detokenizer> detok;
  if (text) detok.emplace(runtime.engine_dir() / "tokenizer" / "tokenizer.json");
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
    if (!detok) {
      std::cout << adaskip::to_json(r) << '\n';
    } else {
      nlohmann::ordered_json j = nlohmann::ordered_json::parse(adaskip::to_json(r));
      j["text"] = detok->decode(r.tokens);
      std::cout << j.dump() << '\n';
    }
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
