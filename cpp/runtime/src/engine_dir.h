// Read and verify an engine directory written by adaskip-build (port of adaskip/engine_dir.py open_engine_dir plus
// the ORT checks of adaskip/runtime/loader.py).
#pragma once

#include <filesystem>
#include <string>

#include "adaskip/plan.h"
#include "adaskip/runtime.h"

namespace adaskip::detail {

struct EngineDir {
  std::filesystem::path root;
  std::string backend;
  std::string fingerprint;
  ModelInfo model;
  SkipPlan plan;
  std::filesystem::path graph_file;  // model.onnx (weights beside it as external data)
  std::filesystem::path decode_graph_file;  // the same graph with cpp/ortops's attention op; empty: none was built
  std::string graph_variant;
  std::vector<int> manifest_kv_layers;
};

inline constexpr long long kLargeFile = 64LL << 20;  // larger files are size-checked only, unless asked
inline constexpr std::uintmax_t kMaxManifestBytes = 16u << 20;  // as MAX_MANIFEST_BYTES in adaskip/engine_dir.py

// Throws EngineDirError (PlanError problems are reported as EngineDirError naming the dir, as in Python).
EngineDir open_engine_dir(const std::filesystem::path& path, bool verify_large_files);

std::string sha256_file(const std::filesystem::path& path);  // "sha256:<hex>"

}  // namespace adaskip::detail
