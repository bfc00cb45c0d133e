// The export directory as the C++ runner sees it: manifest.json (format flowturbo.export/1, written by
// flowturbo.export) parsed into plain structs, with every listed file's size and SHA-256 verified. The manifest
// is sealed (its first member is the SHA-256 of its canonical body, see flowturbo.fileio.sealed_json_bytes): a
// hand-edited one is refused, and the files it must list follow from its variant and formats.
// No torch here: this is shared by the runner and testable on its own.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "schedule.hpp"

namespace flowturbo {

inline constexpr const char* kExportFormat = "flowturbo.export/1";

// A manifest that cannot be used (maps to flowturbo.errors.CheckpointError in Python).
class ManifestError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct TensorInfo {
  std::string name;
  std::string dtype;            // "float32" | "float16" | "bfloat16" | "int64"
  std::vector<int64_t> shape;   // without the leading batch axis
  bool batched = true;
};

struct ArtifactInfo {
  std::string module;  // file stem, e.g. "predictor_step" or "predictor_step_t003"
  std::string role;    // "predictor" | "refiner" | "decoder" | "unrolled"
  std::string format;  // "onnx" | "aoti" | "tensorrt"
  std::string file;    // absolute path
  std::optional<double> time;  // folded time of a per-step graph
  std::optional<double> dt;    // folded velocity age of a dt-conditioned refiner's per-step graph
  std::vector<TensorInfo> inputs;
  std::vector<TensorInfo> outputs;
};

struct Manifest {
  std::string root;
  std::string key;
  Schedule schedule;
  std::string schedule_id;
  std::string variant;    // "time-input" | "per-step" | "unrolled"
  std::string precision;  // "fp32" | "fp16" | "bf16"
  int64_t batch_min = 1, batch_opt = 1, batch_max = 1;
  int64_t num_classes = 0;
  // A text-to-image export (flowturbo export --pipeline): the predictor graph takes prompt embeddings (and the
  // negative prompt's, a guidance value) instead of class ids; the runner's caller passes them per batch.
  bool takes_prompts = false;
  std::vector<int64_t> latent_shape;  // (C, H, W)
  std::vector<int64_t> image_shape;   // (C, H, W)
  bool has_refiner = false;
  // The refiner graphs take (time-input) or fold (per-step, unrolled) the velocity age dt; load_manifest refuses
  // refiner graphs that disagree (runtime/artifacts.check_refiner_dt).
  bool refiner_dt_conditioning = false;
  std::string weights_sha256;
  std::string device;  // as recorded: "cpu (x86_64)" or "cuda: <GPU name>"
  std::vector<ArtifactInfo> artifacts;

  bool exported_on_cuda() const { return device.rfind("cuda", 0) == 0; }
  // Artifacts of one format; throws ManifestError naming the formats present when there are none.
  std::vector<ArtifactInfo> of_format(const std::string& format) const;
  // Throws ManifestError (message as the Python runtime's) when batch is outside the profile.
  void check_batch(int64_t batch) const;
};

// Reads <root>/manifest.json; verifies every listed file (size + SHA-256) when verify_files.
Manifest load_manifest(const std::string& root, bool verify_files = true);

}  // namespace flowturbo
