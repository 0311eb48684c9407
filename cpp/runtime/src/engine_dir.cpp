#include "engine_dir.h"

#include <fstream>
#include <sstream>

#include <openssl/evp.h>

#include "adaskip/errors.h"
#include "json_util.h"

namespace adaskip::detail {
namespace fs = std::filesystem;

namespace {

[[noreturn]] void fail(const fs::path& root, const std::string& what) {
  throw EngineDirError(root.string() + ": " + what);
}

int spec_int(const json& spec, const fs::path& root, const char* key) {
  auto it = spec.find(key);
  if (it == spec.end() || !it->is_number_integer() || it->get<long long>() < 1 || it->get<long long>() > (1 << 30)) {
    fail(root, std::string("manifest is malformed: model spec has no valid '") + key + "'");
  }
  return it->get<int>();
}

void verify_files(const fs::path& root, const json& manifest, bool verify_large_files) {
  auto files = manifest.find("files");
  bool ok = files != manifest.end() && files->is_object();
  if (ok) {
    for (const auto& entry : files->items()) {
      const json& e = entry.value();
      ok = ok && e.is_object() && e.contains("sha256") && e["sha256"].is_string() && e.contains("bytes") &&
           e["bytes"].is_number_integer();
    }
  }
  if (!ok) fail(root, "manifest is malformed: bad 'files' table");
  if (!files->contains("plan.json")) fail(root, "manifest is malformed: it does not list plan.json");
  for (const auto& entry : files->items()) {
    const std::string& rel = entry.key();
    fs::path f = root / rel;
    std::error_code ec;
    if (!fs::is_regular_file(f, ec)) fail(root, "file " + rel + " listed in the manifest is missing");
    auto size = static_cast<long long>(fs::file_size(f, ec));
    long long expected = entry.value()["bytes"].get<long long>();
    if (ec || size != expected) {
      fail(root, rel + " has " + std::to_string(size) + " bytes, the manifest says " + std::to_string(expected) +
                     " (truncated or replaced)");
    }
    if (size <= kLargeFile || verify_large_files) {
      if (sha256_file(f) != entry.value()["sha256"].get<std::string>()) {
        fail(root, rel + " does not match its digest in the manifest (corrupt or edited)");
      }
    }
  }
}

std::vector<int> int_list(const json& v) {
  std::vector<int> out;
  if (v.is_array()) {
    for (const auto& x : v) {
      if (x.is_number_integer()) out.push_back(x.get<int>());
    }
  }
  return out;
}

}  // namespace

std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw EngineDirError("cannot read " + path.string());
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (ctx == nullptr || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) {
    EVP_MD_CTX_free(ctx);
    throw Error("OpenSSL cannot compute SHA-256");
  }
  std::vector<char> buf(1 << 22);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(in.gcount()));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, digest, &len);
  EVP_MD_CTX_free(ctx);
  static const char* hex = "0123456789abcdef";
  std::string out = "sha256:";
  for (unsigned int i = 0; i < len; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

EngineDir open_engine_dir(const fs::path& path, bool verify_large_files) {
  EngineDir ed;
  ed.root = path;
  const fs::path manifest_path = path / "manifest.json";
  std::error_code ec;
  if (!fs::is_regular_file(manifest_path, ec)) {
    std::string hint = fs::is_directory(path, ec) ? " (an interrupted build leaves no engine: rerun adaskip-build)"
                                                  : (fs::exists(path, ec) ? "" : " (it does not exist)");
    throw EngineDirError(path.string() + " is not an adaskip engine directory: no manifest.json" + hint);
  }
  json manifest;
  try {
    std::ifstream in(manifest_path, std::ios::binary);
    std::stringstream buf;
    buf << in.rdbuf();
    manifest = json::parse(buf.str());
  } catch (const json::exception& e) {
    throw EngineDirError(manifest_path.string() + " is corrupt: " + e.what());
  }
  if (!manifest.is_object() || manifest.value("format", json()) != kEngineFormat) {
    fail(path, "not an adaskip engine manifest");
  }
  if (manifest.value("format_version", json()) != kEngineVersion) {
    fail(path, "engine format version " + manifest.value("format_version", json()).dump() +
                   " is not supported (this adaskip reads " + std::to_string(kEngineVersion) + "); rebuild it");
  }
  verify_files(path, manifest, verify_large_files);

  try {
    const json& spec = manifest.at("model").at("spec");
    ed.fingerprint = manifest.at("model").at("fingerprint").get<std::string>();
    ed.backend = manifest.at("backend").get<std::string>();
    ed.model.name = spec.value("name", std::string());
    ed.model.num_layers = spec_int(spec, path, "num_layers");
    ed.model.num_kv_heads = spec_int(spec, path, "num_kv_heads");
    ed.model.head_dim = spec_int(spec, path, "head_dim");
    ed.model.vocab_size = spec_int(spec, path, "vocab_size");
    ed.model.context_len = spec_int(spec, path, "max_position_embeddings");
    for (int64_t id : int_list(manifest.value("tokenizer", json::object()).value("eos_token_ids", json::array()))) {
      ed.model.eos_token_ids.push_back(id);
    }
  } catch (const json::exception& e) {
    fail(path, std::string("manifest is malformed: ") + e.what());
  }
  try {
    ed.plan = SkipPlan::load(path / "plan.json");
    ed.plan.check_model(ed.fingerprint, ed.model.num_layers);
  } catch (const PlanError& e) {
    fail(path, e.what());
  }

  // what this runtime executes: the ONNX Runtime backend's "ort" graph variant of the current interface
  if (ed.backend != "ort") {
    fail(path, "backend '" + ed.backend + "' is not supported by the C++ runtime, which runs ONNX Runtime engines; "
               "rebuild with adaskip-build --backend ort");
  }
  json graph = manifest.value("build", json::object()).value("graph", json::object());
  if (!graph.is_object() || graph.value("interface", json()) != kGraphInterface) {
    fail(path, "graph interface " + (graph.is_object() ? graph.value("interface", json()).dump() : "null") +
                   " is not the one this runtime runs (" + std::to_string(kGraphInterface) +
                   "); rebuild the engine with adaskip-build");
  }
  ed.graph_variant = graph.value("variant", std::string());
  if (ed.graph_variant != "ort") {
    fail(path, "graph variant '" + ed.graph_variant + "' is not supported by the C++ runtime, which runs the 'ort' "
               "variant (fused GroupQueryAttention); rebuild with adaskip-build --graph-variant ort (plans whose "
               "cached attention is conditional, such as SkipDecode in decode mode, need the Python runtime)");
  }
  std::string file = graph.value("file", std::string());
  if (file.empty() || !fs::is_regular_file(path / file, ec)) fail(path, "graph file '" + file + "' is missing");
  ed.graph_file = path / file;
  ed.manifest_kv_layers = int_list(graph.value("kv_layers", json::array()));
  return ed;
}

}  // namespace adaskip::detail
