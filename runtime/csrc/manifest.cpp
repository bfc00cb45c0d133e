#include "manifest.hpp"

#include "sha256.hpp"

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace flowturbo {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

const char* kReexport = "re-export with `flowturbo export --overwrite`";

// The seal (flowturbo.fileio.sealed_json_bytes): the file is "{\n  \"manifest_sha256\": \"<64 hex>\",\n" followed
// by the canonical body (json_text of the manifest: sorted keys, 2-space indent, ASCII) without its first two
// bytes "{\n". The digest is the SHA-256 of "{\n" + those bytes. Both readers check the bytes, so neither has to
// reproduce the other's JSON serialisation.
const std::string kSealHead = "{\n  \"manifest_sha256\": \"";
const std::string kSealTail = "\",\n";
constexpr size_t kSealDigits = 64;

// The body of a sealed manifest, or ManifestError naming the problem (unsealed, or edited after export).
std::string unseal(const std::string& raw, const std::string& path) {
  const size_t head_end = kSealHead.size() + kSealDigits;
  bool sealed = raw.size() >= head_end + kSealTail.size() && raw.compare(0, kSealHead.size(), kSealHead) == 0 &&
                raw.compare(head_end, kSealTail.size(), kSealTail) == 0;
  const std::string digest = sealed ? raw.substr(kSealHead.size(), kSealDigits) : std::string();
  for (char c : digest) sealed = sealed && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  if (!sealed) {
    throw ManifestError(path + " carries no manifest_sha256 seal on its first member (written by an older flowturbo, "
                        "or edited / reformatted by hand), so its content cannot be trusted; " + kReexport);
  }
  std::string body = "{\n" + raw.substr(head_end + kSealTail.size());
  if (sha256_hex(body) != digest) {
    throw ManifestError(path + " was modified after it was written: its content no longer matches its "
                        "manifest_sha256 seal (a hand edit of a value such as the batch range or precision, or a "
                        "removed entry, is refused); " + kReexport);
  }
  return body;
}

// The graphs (roles) every format of a variant must have; the refiner only when the schedule has R steps.
std::vector<std::string> required_roles(const std::string& variant, bool uses_refiner, const std::string& path) {
  if (variant == "unrolled") return {"unrolled"};
  if (variant == "time-input" || variant == "per-step") {
    std::vector<std::string> roles{"predictor"};
    if (uses_refiner) roles.push_back("refiner");
    roles.push_back("decoder");
    return roles;
  }
  throw ManifestError(path + ": unknown variant '" + variant + "'; " + kReexport);
}

std::vector<TensorInfo> read_tensors(const json& list) {
  std::vector<TensorInfo> out;
  for (const auto& t : list) {
    TensorInfo info;
    info.name = t.at("name").get<std::string>();
    info.dtype = t.at("dtype").get<std::string>();
    const auto& shape = t.at("shape");
    for (size_t axis = 0; axis < shape.size(); ++axis) {
      if (shape[axis].is_string()) {
        if (axis != 0) throw ManifestError("tensor " + info.name + ": only axis 0 may be symbolic");
        continue;  // the batch axis
      }
      info.shape.push_back(shape[axis].get<int64_t>());
    }
    info.batched = !shape.empty() && shape[0].is_string();
    out.push_back(std::move(info));
  }
  return out;
}

}  // namespace

std::vector<ArtifactInfo> Manifest::of_format(const std::string& format) const {
  std::vector<ArtifactInfo> found;
  std::set<std::string> have;
  for (const auto& a : artifacts) {
    have.insert(a.format);
    if (a.format == format) found.push_back(a);
  }
  if (found.empty()) {
    std::string list;
    for (const auto& f : have) list += (list.empty() ? "" : ", ") + f;
    throw ManifestError(root + " has no " + format + " artifacts (it has " + list +
                        "); re-export with `flowturbo export --format " + format + "`");
  }
  return found;
}

void Manifest::check_batch(int64_t batch) const {
  if (batch < batch_min || batch > batch_max) {
    std::ostringstream msg;
    msg << "batch of " << batch << " images is outside the exported profile " << batch_min << ":" << batch_opt
        << ":" << batch_max << " of " << root << "; use --batch between " << batch_min << " and " << batch_max
        << ", or re-export with --batch " << std::min(batch_min, batch) << ":" << batch_opt << ":"
        << std::max(batch_max, batch);
    throw ManifestError(msg.str());
  }
}

Manifest load_manifest(const std::string& root_text, bool verify_files) {
  const fs::path root(root_text);
  if (!fs::is_directory(root)) {
    throw ManifestError("artifact directory not found: " + root_text + "; create one with `flowturbo export --out " +
                        root_text + "`");
  }
  const fs::path path = root / "manifest.json";
  if (!fs::is_regular_file(path)) {
    throw ManifestError(root_text + " has no manifest.json: it is not an export directory, or its export did not "
                        "finish; re-run `flowturbo export`");
  }
  std::string raw;
  {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream buffer;
    buffer << in.rdbuf();
    if (!in.good() && !in.eof()) throw ManifestError("cannot read " + path.string() + "; " + kReexport);
    raw = buffer.str();
  }
  json doc;
  try {
    doc = json::parse(unseal(raw, path.string()));
  } catch (const json::exception& exc) {
    throw ManifestError(path.string() + " is not valid JSON (" + exc.what() + "); re-export the directory");
  }
  if (!doc.is_object() || doc.value("format", std::string()) != kExportFormat) {
    throw ManifestError(path.string() + " is not a " + std::string(kExportFormat) + " manifest; this runner reads " +
                        kExportFormat);
  }
  Manifest m;
  m.root = root_text;
  try {
    m.key = doc.value("key", std::string());
    m.schedule = Schedule::from_json(doc.at("schedule").dump());
    m.schedule_id = doc.at("schedule_id").get<std::string>();
    m.variant = doc.at("variant").get<std::string>();
    m.precision = doc.at("precision").get<std::string>();
    const auto& batch = doc.at("batch");
    m.batch_min = batch.at("min").get<int64_t>();
    m.batch_opt = batch.at("opt").get<int64_t>();
    m.batch_max = batch.at("max").get<int64_t>();
    const auto& model = doc.at("model");
    m.takes_prompts = model.value("conditioning", std::string()) == "prompts";  // a text-to-image export
    m.num_classes = m.takes_prompts ? 0 : model.at("num_classes").get<int64_t>();
    m.latent_shape = model.at("latent_shape").get<std::vector<int64_t>>();
    m.image_shape = model.at("image_shape").get<std::vector<int64_t>>();
    m.has_refiner = model.value("has_refiner", false);
    m.refiner_dt_conditioning = model.value("refiner_dt_conditioning", false);
    if (model.contains("weights_sha256") && model["weights_sha256"].is_string()) {
      m.weights_sha256 = model["weights_sha256"].get<std::string>();
    }
    m.device = doc.value("device", std::string("cpu"));
    for (const auto& a : doc.at("artifacts")) {
      ArtifactInfo info;
      info.module = a.at("module").get<std::string>();
      info.role = a.at("role").get<std::string>();
      info.format = a.at("format").get<std::string>();
      info.file = (root / a.at("file").get<std::string>()).string();
      if (a.contains("time") && a["time"].is_number()) info.time = a["time"].get<double>();
      if (a.contains("dt") && a["dt"].is_number()) info.dt = a["dt"].get<double>();
      info.inputs = read_tensors(a.at("spec").at("inputs"));
      info.outputs = read_tensors(a.at("spec").at("outputs"));
      m.artifacts.push_back(std::move(info));
    }
  } catch (const json::exception& exc) {
    throw ManifestError(path.string() + " lacks a field or has a wrong type (" + exc.what() + "); " + kReexport);
  }
  if (m.schedule.id() != m.schedule_id) {
    throw ManifestError(path.string() + ": schedule and schedule_id disagree (edited by hand?); " + kReexport);
  }
  // A dt-conditioned refiner's time-input graph takes a "dt" input, its per-step graphs fold a dt; a refiner
  // without dt conditioning has neither (runtime/artifacts.check_refiner_dt: the same rule).
  for (const auto& a : m.artifacts) {
    if (a.role != "refiner") continue;
    bool time_input = false, dt_input = false;
    for (const auto& t : a.inputs) {
      time_input = time_input || t.name == "t";
      dt_input = dt_input || t.name == "dt";
    }
    const bool has_dt = time_input ? dt_input : a.dt.has_value();
    if (has_dt != m.refiner_dt_conditioning) {
      throw ManifestError(path.string() + ": the refiner graph " + a.file +
                          (m.refiner_dt_conditioning ? " has no dt input (time-input) / folded dt (per-step)"
                                                     : " takes a dt its refiner does not have") +
                          ", but the manifest says the refiner is " + (m.refiner_dt_conditioning ? "" : "not ") +
                          "dt-conditioned: the graphs and the manifest come from different exports or an older "
                          "flowturbo; " + kReexport);
    }
  }
  const auto& files = doc.contains("files") ? doc["files"] : json::object();
  if (!files.is_object() || files.empty()) throw ManifestError(path.string() + " lists no files; " + kReexport);
  // The files the directory must hold follow from its variant and formats (runtime/artifacts.required_files).
  try {
    bool uses_refiner = false;
    for (auto kind : m.schedule.steps) uses_refiner = uses_refiner || kind == StepKind::Refiner;
    const auto roles = required_roles(m.variant, uses_refiner, path.string());
    const auto& formats = doc.at("formats");
    if (!formats.is_array() || formats.empty()) throw ManifestError(path.string() + ": no formats listed; " + kReexport);
    for (const auto& fmt : formats) {
      const auto format = fmt.get<std::string>();
      for (const auto& role : roles) {
        bool found = false;
        for (const auto& a : m.artifacts) found = found || (a.format == format && a.role == role);
        if (!found) {
          throw ManifestError(path.string() + ": a " + m.variant + " export needs a " + format + " graph for the " +
                              role + ", but lists none; " + kReexport);
        }
      }
    }
    for (const auto& a : doc.at("artifacts")) {
      std::vector<std::string> needed{a.at("file").get<std::string>()};
      if (a.value("format", std::string()) == "onnx" && a.contains("external_data") && a["external_data"].is_boolean() &&
          a["external_data"].get<bool>()) {
        needed.push_back(needed.front() + ".data");
      }
      for (const auto& rel : needed) {
        if (!files.contains(rel)) {
          throw ManifestError(path.string() + " does not list " + rel + " with its size and SHA-256; " + kReexport);
        }
      }
    }
  } catch (const json::exception& exc) {
    throw ManifestError(path.string() + " lacks a field or has a wrong type (" + exc.what() + "); " + kReexport);
  }
  for (auto it = files.begin(); it != files.end(); ++it) {
    const fs::path file = root / it.key();
    if (!fs::is_regular_file(file)) {
      throw ManifestError(file.string() + " is missing (listed in the manifest); " + kReexport);
    }
    if (!verify_files) continue;
    const auto size = static_cast<int64_t>(fs::file_size(file));
    const auto want_size = it.value().value("bytes", int64_t{-1});
    if (size != want_size) {
      throw ManifestError(file.string() + " has " + std::to_string(size) + " bytes but the manifest records " +
                          std::to_string(want_size) + " (truncated or replaced); " + kReexport);
    }
    std::string digest;
    try {
      digest = sha256_file(file.string());
    } catch (const std::runtime_error& exc) {
      throw ManifestError(exc.what());
    }
    if (digest != it.value().value("sha256", std::string())) {
      throw ManifestError(file.string() + " does not match its SHA-256 in the manifest (corrupted or modified); " +
                          kReexport);
    }
  }
  return m;
}

}  // namespace flowturbo
