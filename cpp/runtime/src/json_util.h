// Small typed accessors over nlohmann::json that raise adaskip errors naming the offending path.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace adaskip::detail {

using json = nlohmann::json;

// Throws E("<prefix> at <path>: <what>").
template <class E>
[[noreturn]] void fail_at(const std::string& prefix, const std::string& path, const std::string& what) {
  throw E(prefix + " at " + (path.empty() ? "(top level)" : path) + ": " + what);
}

inline bool is_integer(const json& v) {
  if (v.is_number_integer()) return true;
  // JSON Schema's "integer" also accepts 3.0
  return v.is_number_float() && std::isfinite(v.get<double>()) && v.get<double>() == std::floor(v.get<double>());
}

// An integral JSON number as int64, false when it is not one or does not fit (2^64-1 stays unsigned in nlohmann,
// 1e300 is integral but no int64: casting either is undefined or wraps, so it is refused instead).
inline bool as_int64(const json& v, long long& out) {
  if (v.is_number_unsigned()) {
    if (v.get<unsigned long long>() > static_cast<unsigned long long>(LLONG_MAX)) return false;
    out = static_cast<long long>(v.get<unsigned long long>());
    return true;
  }
  if (v.is_number_integer()) {
    out = v.get<long long>();
    return true;
  }
  if (!is_integer(v) || std::fabs(v.get<double>()) > 9007199254740992.0) return false;  // 2^53: exact in a double
  out = static_cast<long long>(v.get<double>());
  return true;
}

// Deeper nesting than any manifest or plan has is refused while parsing: copying, dumping or comparing a
// 200,000-deep value recurses and overflows the stack. (Python's json refuses such input with a RecursionError.)
inline constexpr int kMaxJsonDepth = 512;

// json::parse, throwing E(prefix + ...) for text nested deeper than kMaxJsonDepth; parse errors propagate.
template <class E>
json parse_bounded(const std::string& text, const std::string& prefix) {
  struct TooDeep {};
  try {
    return json::parse(text, [](int depth, json::parse_event_t, json&) {
      if (depth > kMaxJsonDepth) throw TooDeep{};
      return true;
    });
  } catch (const TooDeep&) {
    throw E(prefix + " is nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  }
}

// An untrusted value for an error message: a scalar as (at most 80 characters of) JSON, a container by its type
// only. dump() recurses, and a 200,000-deep array overflows the stack.
inline std::string brief(const json& v) {
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  std::string s = v.dump();
  return s.size() > 80 ? s.substr(0, 80) + "..." : s;
}

// a * b for sizes derived from an engine dir; throws instead of wrapping.
template <class E>
int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) throw E(what + " overflows 64 bits");
  return r;
}

inline std::string join_path(const std::string& path, const std::string& key) {
  return path.empty() ? key : path + "/" + key;
}

}  // namespace adaskip::detail
