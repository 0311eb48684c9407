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

// The bounds of adaskip/engine_dir.py's MANIFEST_SCHEMA: beyond them sizes derived from the spec could overflow or
// ask for absurd buffers.
int spec_int(const json& spec, const fs::path& root, const char* key, long long maximum) {
  auto it = spec.find(key);
  long long x = 0;
  if (it == spec.end() || !it->is_number_integer() || !as_int64(*it, x) || x < 1 || x > maximum) {
    fail(root, std::string("manifest is malformed at model/spec/") + key + ": " +
                   (it == spec.end() ? std::string("missing") : brief(*it)) + " is not an integer in 1.." +
                   std::to_string(maximum));
  }
  return static_cast<int>(x);
}

// A manifest path: relative, '/'-separated names of [A-Za-z0-9_.+-] not starting with '.' (no '..', no absolute
// path, no backslash), as in the Python schema; and reached through no symlink.
void check_confined(const fs::path& root, const std::string& rel) {
  bool ok = !rel.empty() && rel.size() <= 1024;
  size_t start = 0;
  int parts = 0;
  while (ok && start <= rel.size()) {
    size_t end = rel.find('/', start);
    if (end == std::string::npos) end = rel.size();
    const std::string part = rel.substr(start, end - start);
    ok = !part.empty() && part.size() <= 128 && part[0] != '.' && part[0] != '-' && part[0] != '+' && ++parts <= 4;
    for (char ch : part) {
      ok = ok && ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_' ||
                  ch == '.' || ch == '+' || ch == '-');
    }
    start = end + 1;
  }
  if (!ok) fail(root, "manifest is malformed at files: '" + rel.substr(0, 80) + "' is not a path inside the engine dir");
  fs::path p = root;
  std::error_code ec;
  for (const auto& part : fs::path(rel)) {
    p /= part;
    if (fs::is_symlink(fs::symlink_status(p, ec))) {
      fail(root, rel + " is reached through a symbolic link; engine files must lie inside the engine dir");
    }
  }
}

void verify_files(const fs::path& root, const json& manifest, bool verify_large_files) {
  auto files = manifest.find("files");
  bool ok = files != manifest.end() && files->is_object();
  if (ok) {
    for (const auto& entry : files->items()) {
      const json& e = entry.value();
      long long bytes = -1;
      ok = ok && e.is_object() && e.contains("sha256") && e["sha256"].is_string() && e.contains("bytes") &&
           e["bytes"].is_number_integer() && as_int64(e["bytes"], bytes) && bytes >= 0;
    }
  }
  if (!ok) fail(root, "manifest is malformed: bad 'files' table");
  if (!files->contains("plan.json")) fail(root, "manifest is malformed: it does not list plan.json");
  for (const auto& entry : files->items()) {
    const std::string& rel = entry.key();
    check_confined(root, rel);
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
      long long i = -1;
      if (x.is_number_integer() && as_int64(x, i) && i >= 0 && i < (1 << 24)) out.push_back(static_cast<int>(i));
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

EngineDir open_checked(const fs::path& path, json manifest, bool verify_large_files);

EngineDir open_engine_dir(const fs::path& path, bool verify_large_files) {
  const fs::path manifest_path = path / "manifest.json";
  std::error_code ec;
  if (!fs::exists(path, ec)) throw EngineDirError(path.string() + " does not exist (build one with adaskip-build)");
  if (!fs::is_regular_file(manifest_path, ec)) {
    std::string hint = fs::is_directory(path, ec) ? " (an interrupted build leaves no engine: rerun adaskip-build)" : "";
    throw EngineDirError(path.string() + " is not an adaskip engine directory: no manifest.json" + hint);
  }
  if (fs::file_size(manifest_path, ec) > kMaxManifestBytes) {
    fail(path, "manifest.json is larger than " + std::to_string(kMaxManifestBytes) + " bytes");
  }
  json manifest;
  try {
    std::ifstream in(manifest_path, std::ios::binary);
    std::stringstream buf;
    buf << in.rdbuf();
    manifest = parse_bounded<EngineDirError>(buf.str(), manifest_path.string());
  } catch (const json::exception& e) {
    throw EngineDirError(manifest_path.string() + " is corrupt: " + e.what());
  }
  if (!manifest.is_object() || manifest.value("format", json()) != kEngineFormat) {
    fail(path, "not an adaskip engine manifest");
  }
  if (manifest.value("format_version", json()) != kEngineVersion) {
    fail(path, "engine format version " + brief(manifest.value("format_version", json())) +
                   " is not supported (this adaskip reads " + std::to_string(kEngineVersion) + "); rebuild it");
  }
  try {
    return open_checked(path, std::move(manifest), verify_large_files);
  } catch (const json::exception& e) {  // a type_error on a shape the checks missed: a malformed manifest
    fail(path, std::string("manifest is malformed: ") + e.what());
  }
}

EngineDir open_checked(const fs::path& path, json manifest, bool verify_large_files) {
  EngineDir ed;
  ed.root = path;
  std::error_code ec;
  verify_files(path, manifest, verify_large_files);

  try {
    const json& spec = manifest.at("model").at("spec");
    ed.fingerprint = manifest.at("model").at("fingerprint").get<std::string>();
    ed.backend = manifest.at("backend").get<std::string>();
    ed.model.name = spec.value("name", std::string());
    ed.model.num_layers = spec_int(spec, path, "num_layers", 1024);
    ed.model.num_kv_heads = spec_int(spec, path, "num_kv_heads", 1024);
    ed.model.head_dim = spec_int(spec, path, "head_dim", 4096);
    ed.model.vocab_size = spec_int(spec, path, "vocab_size", 1 << 24);
    ed.model.context_len = spec_int(spec, path, "max_position_embeddings", 1 << 24);
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
    fail(path, "graph interface " + (graph.is_object() ? brief(graph.value("interface", json())) : "null") +
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
  if (file.empty() || !manifest["files"].contains(file)) {
    fail(path, "the graph file '" + file.substr(0, 80) + "' is not in the manifest's file table");
  }
  ed.graph_file = path / file;
  if (graph.contains("decode_kernels_file")) {
    const json& decode = graph["decode_kernels_file"];
    if (!decode.is_string() || !manifest["files"].contains(decode.get<std::string>())) {
      fail(path, "the decode kernels' graph file " + brief(decode) + " is not in the manifest's file table");
    }
    ed.decode_graph_file = path / decode.get<std::string>();
  }
  ed.manifest_kv_layers = int_list(graph.value("kv_layers", json::array()));
  return ed;
}

}  // namespace adaskip::detail
