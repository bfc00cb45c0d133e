// ScheduleRunner: runs a whole FlowTurbo schedule (DESIGN.md §2) from an export directory in C++, with
// no Python in the loop: manifest + schedule + engines (AOTInductor, TensorRT when built with it),
// per-batch input buffers, the E/H/P/R loop with CFG inside the engines, decode, optional CUDA-graph
// capture of schedule + decode per batch size, and per-step timing.
#pragma once

#include <ATen/Tensor.h>
#include <c10/core/Device.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine.hpp"
#include "manifest.hpp"

namespace flowturbo {

struct RunnerOptions {
  std::string device;            // "" -> where the artifacts were exported ("cpu" or "cuda")
  std::string format = "aoti";   // which artifacts of the directory to run: "aoti" | "tensorrt"
  bool cuda_graph = true;        // capture schedule + decode once per batch size on CUDA
  bool verify_files = true;      // SHA-256 of every file before loading
  // Testing aid: wrap every engine so that run() hands out buffers its next call overwrites (TensorRT's
  // contract), to check on CPU that the runner copies whatever must outlive an engine call.
  bool reuse_engine_buffers = false;
};

struct StepRecord {
  int index = 0;
  char kind = 'H';
  double t_start = 0, t_end = 0;
  int predictor_calls = 0, refiner_calls = 0;
  double ms = 0;
};

struct BatchOutput {
  at::Tensor images;   // (b, C_img, H_img, W_img) in [-1, 1], on the runner's device
  at::Tensor latents;  // (b, C, H, W) at t = 1
  double sample_ms = 0, decode_ms = 0, total_ms = 0;
  std::vector<StepRecord> steps;  // one per schedule step when profiled
  bool graph_replayed = false;
};

class ScheduleRunner {
 public:
  ScheduleRunner(const std::string& artifacts_dir, const RunnerOptions& options);
  ~ScheduleRunner();
  ScheduleRunner(const ScheduleRunner&) = delete;
  ScheduleRunner& operator=(const ScheduleRunner&) = delete;

  const Manifest& manifest() const { return manifest_; }
  const c10::Device& device() const { return device_; }
  at::ScalarType dtype() const { return dtype_; }
  std::vector<std::string> engine_descriptions() const;
  // Why CUDA-graph capture is not used (empty when it is, or on CPU where it does not apply).
  const std::string& graph_fallback_reason() const { return graph_fallback_reason_; }

  // x_0 for images first_index .. first_index + n - 1, shape (n, C, H, W): image i is drawn alone, (C, H, W)
  // in float32 by torch's CPU generator seeded with seed + i (mod 2^64), then cast to the artifacts' dtype:
  // bit for bit the draw of flowturbo.noise.make_noise (the one per-image noise rule). On CPU.
  at::Tensor make_noise(int64_t n, uint64_t seed, uint64_t first_index = 0) const;

  // One batch: noise (b, C, H, W) and labels (b,) int64 (any device; copied to the runner's). With
  // `profile`, each step is timed (no CUDA graph then). Throws RunnerError on bad input or NaN/Inf,
  // naming the first step that produced it.
  BatchOutput run_batch(const at::Tensor& noise, const at::Tensor& labels, bool profile);
  // The same for a text-to-image export: `conditioning` maps the predictor graph's other inputs
  // (prompt_embeds (b, L, D), pooled_prompt_embeds (b, P), the negative prompt's for CFG, guidance (b,)) to
  // tensors of b rows (any device; copied to the runner's); the refiner graph of an export with R steps takes the
  // ones it needs (pooled_prompt_embeds) from the same tensors. Every input the predictor graph takes must be given,
  // with its shape; a class-conditional export refuses it (and a text export refuses labels).
  BatchOutput run_batch(const at::Tensor& noise, const at::Tensor& labels,
                        const std::map<std::string, at::Tensor>& conditioning, bool profile);

 private:
  struct BatchState;
  struct Engines;

  BatchState& state_for(int64_t batch);
  // The loop; records per-step times into `steps` when non-null; checks finiteness after every step when
  // `check_each_step` (used to name the step after a non-finite output).
  at::Tensor integrate(const at::Tensor& noise, BatchState& state, std::vector<StepRecord>* steps,
                       bool check_each_step);
  std::vector<at::Tensor> forward(const at::Tensor& noise, BatchState& state);  // {images, latents}
  at::Tensor decode(const at::Tensor& latents);  // images the caller may keep
  at::Tensor velocity(const at::Tensor& x, int time_index, BatchState& state);
  // The refiner at grid time `time_index` for the velocity carried from grid time `velocity_index` (its age
  // t - t_v is the dt input / folded dt of a dt-conditioned refiner's graphs).
  at::Tensor offset(const at::Tensor& x, const at::Tensor& v, int time_index, int velocity_index, BatchState& state);
  void locate_non_finite(const at::Tensor& noise, BatchState& state);
  // Fills conditioning_inputs_ (a text export) and refuses a step graph taking an input the loop cannot feed.
  void check_step_graph_inputs(const std::vector<ArtifactInfo>& artifacts);
  void synchronize() const;
  bool graph_enabled() const;

  Manifest manifest_;
  RunnerOptions options_;
  c10::Device device_;
  at::ScalarType dtype_;
  std::unique_ptr<Engines> engines_;
  std::map<int64_t, std::unique_ptr<BatchState>> states_;
  std::string graph_fallback_reason_;
  // A text export's conditioning inputs (the predictor graph's inputs besides latents and t: prompt embeddings, the
  // negative prompt's, guidance), by name; the refiner graph takes those it needs (pooled_prompt_embeds) from the
  // same per-batch buffers. Empty for a class export.
  std::map<std::string, TensorInfo> conditioning_inputs_;
  int64_t velocity_channels_ = 0;  // C, or 2C when the schedule carries the velocity per CFG half
};

// "cuda" / "tensorrt" support compiled into this build.
bool built_with_cuda();
bool built_with_tensorrt();

}  // namespace flowturbo
