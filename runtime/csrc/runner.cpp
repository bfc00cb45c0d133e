#include "runner.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include <chrono>
#include <cmath>
#include <sstream>

#ifdef FLOWTURBO_WITH_CUDA
// c10/cuda and ATen/cuda/CUDAGraph.h need only the CUDA runtime's headers; ATen/cuda/CUDAEvent.h (via
// ATen/cuda/CUDAContext.h) would also need the cuBLAS / cuSPARSE / cuSOLVER headers (see CMakeLists.txt).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#if __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>
#define FLOWTURBO_NVTX 1
#endif
#endif

namespace flowturbo {
namespace {

using Clock = std::chrono::steady_clock;

double elapsed_ms(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since).count();
}

at::ScalarType dtype_of_precision(const std::string& precision) {
  if (precision == "fp32") return at::kFloat;
  if (precision == "fp16") return at::kHalf;
  if (precision == "bf16") return at::kBFloat16;
  throw RunnerError(RunnerError::Kind::kCheckpoint, "unknown precision '" + precision + "' in the manifest");
}

std::string time_text(double t) { return python_float_repr(t); }

// The first line of an exception message (CUDA / c10 messages append long C++ backtraces).
std::string first_line(const char* text) {
  const std::string message(text == nullptr ? "" : text);
  return message.substr(0, message.find('\n'));
}

#ifdef FLOWTURBO_WITH_CUDA
// Ends a capture that failed part-way, before anything else touches the stream: a stream left capturing
// fails every later call on it ("operation not permitted when stream is capturing"), which would poison
// every later batch. CUDAGraph::capture_end() releases the allocator's capture pool and ends the stream's
// capture even when the capture was invalidated (it then throws, as expected here); whatever is still
// capturing after that is ended by hand and its partial graph dropped.
void abort_capture(std::unique_ptr<at::cuda::CUDAGraph>& graph, const c10::cuda::CUDAStream& stream) {
  auto capturing = [&stream]() {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    return cudaStreamIsCapturing(stream.stream(), &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
  };
  if (graph && capturing()) {
    try {
      graph->capture_end();
    } catch (const std::exception&) {
      // expected: the capture was invalidated by the failure being handled
    }
  }
  if (capturing()) {
    cudaGraph_t partial = nullptr;
    if (cudaStreamEndCapture(stream.stream(), &partial) == cudaSuccess && partial != nullptr) {
      cudaGraphDestroy(partial);
    }
  }
  (void)cudaGetLastError();  // clear the capture's error so the step-by-step run starts clean
  graph.reset();
}
#endif

// An NVTX range per step on CUDA (no-op elsewhere).
struct StepRange {
  explicit StepRange(const std::string& name, bool on) : on_(on) {
#ifdef FLOWTURBO_NVTX
    if (on_) nvtxRangePushA(name.c_str());
#else
    (void)name;
#endif
  }
  ~StepRange() {
#ifdef FLOWTURBO_NVTX
    if (on_) nvtxRangePop();
#endif
  }
  bool on_;
};

// Hands out one cached set of output buffers per batch size, overwritten by every call (see
// RunnerOptions::reuse_engine_buffers): the TensorRT engine's contract, on any engine.
class BufferReusingEngine final : public ModuleEngine {
 public:
  explicit BufferReusingEngine(std::unique_ptr<ModuleEngine> inner) : inner_(std::move(inner)) {}
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) override {
    std::vector<at::Tensor> fresh = inner_->run(inputs);
    auto& cached = buffers_[fresh.at(0).size(0)];
    if (cached.empty()) {
      for (const auto& t : fresh) cached.push_back(at::empty_like(t));
    }
    for (size_t j = 0; j < fresh.size(); ++j) cached[j].copy_(fresh[j]);
    return cached;
  }
  bool capturable() const override { return inner_->capturable(); }
  bool returns_fresh_outputs() const override { return false; }
  std::string describe() const override { return inner_->describe() + " (reused output buffers)"; }

 private:
  std::unique_ptr<ModuleEngine> inner_;
  std::map<int64_t, std::vector<at::Tensor>> buffers_;
};

}  // namespace

bool built_with_cuda() {
#ifdef FLOWTURBO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_tensorrt() {
#ifdef FLOWTURBO_TENSORRT
  return true;
#else
  return false;
#endif
}

// ----------------------------------------------------------------------------------------- engines
// No folded dt: the key of every predictor graph and of a refiner graph without dt conditioning (a real dt >= 0).
constexpr double kNoDt = -1.0;

// The predictor's or the refiner's graphs: one time-input graph (key {-1, kNoDt}) or per-step graphs keyed by the
// index of their folded time in the schedule's grid and, for a dt-conditioned refiner, their folded velocity age
// dt; each with its input names in spec order.
struct StepEngines {
  struct Graph {
    std::unique_ptr<ModuleEngine> engine;
    std::vector<std::string> inputs;
  };
  using Key = std::pair<int, double>;
  const char* role;
  std::map<Key, Graph> by_key;

  const Graph& at(int time_index, double dt, const Schedule& schedule) const {
    const Key time_input{-1, kNoDt};
    auto found = by_key.find(by_key.count(time_input) ? time_input : Key{time_index, dt});
    if (found == by_key.end()) {
      throw RunnerError(RunnerError::Kind::kCheckpoint,
                        std::string("the export has no ") + role + " graph for t=" +
                            time_text(schedule.timesteps[time_index]) + (dt == kNoDt ? "" : ", dt=" + time_text(dt)) +
                            "; it was built for another schedule");
    }
    return found->second;
  }
};

// For each step k, the grid index of the time the velocity carried into it estimates the flow at (-1: nothing
// carried): an H or P step carries d' = v(x~, t_{k+1}) (index k + 1), an R step carries d = v + r(x, t_k, v), an
// estimate at t_k (index k), E carries nothing. A refiner call at t_j gets the age dt = t_j - t_v of its velocity
// (flowturbo.integrator, "The refiner's dt"): the one rule, used by the loop and by the per-batch dt buffers.
std::vector<int> carried_time_indices(const Schedule& schedule) {
  std::vector<int> out;
  int carried = -1;
  for (int k = 0; k < schedule.num_steps(); ++k) {
    out.push_back(carried);
    const StepKind kind = schedule.steps[k];
    carried = kind == StepKind::Euler ? -1 : (kind == StepKind::Refiner ? k : k + 1);
  }
  return out;
}

struct ScheduleRunner::Engines {
  StepEngines predictor{"predictor", {}}, refiner{"refiner", {}};
  std::unique_ptr<ModuleEngine> decoder, unrolled;
  std::vector<std::string> descriptions;
};

struct ScheduleRunner::BatchState {
  int64_t batch = 0;
  at::Tensor labels;                  // (b,) int64 on the device
  // A text-to-image export's predictor inputs besides latents and t (prompt embeddings, ...), (b, ...) on the device;
  // its refiner graph takes the ones it needs (pooled_prompt_embeds) from these too.
  std::map<std::string, at::Tensor> conditioning;
  std::vector<at::Tensor> times;      // per grid index: (b,) float32 filled with t_k (time-input graphs)
  // Per refiner call (grid index of t, grid index of t_v): (b,) float32 filled with dt = t - t_v, the input of a
  // dt-conditioned refiner's time-input graph (values fixed by the schedule: CUDA-graph capture stays valid).
  std::map<std::pair<int, int>, at::Tensor> ages;
  // Solver state: the latents, the predicted point x + h d and a scratch for h d and the update, (b, C, H, W);
  // two buffers for the predictor's d / d' and two for a refiner step's d (ping-pong: the carried velocity
  // must survive the step that replaces it), (b, C, H, W) or (b, 2C, H, W) in the per-CFG-half layout
  // (flowturbo.integrator; x moves with the first C channels). Engine outputs are copied into these because
  // an engine may hand out its own buffers, which its next call overwrites (TensorRT).
  at::Tensor x, x_pred, scratch, velocity_a, velocity_b, refined_a, refined_b;
#ifdef FLOWTURBO_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  at::Tensor static_noise;                 // graph input (labels: `labels` above)
  std::vector<at::Tensor> graph_outputs;   // {images, latents} inside the graph's pool
#endif
};

ScheduleRunner::ScheduleRunner(const std::string& artifacts_dir, const RunnerOptions& options)
    : options_(options), device_(c10::kCPU), dtype_(at::kFloat), engines_(std::make_unique<Engines>()) {
  try {
    manifest_ = load_manifest(artifacts_dir, options.verify_files);
  } catch (const ManifestError& exc) {
    throw RunnerError(RunnerError::Kind::kCheckpoint, exc.what());
  }
  dtype_ = dtype_of_precision(manifest_.precision);
  const std::string wanted = options.device.empty() ? (manifest_.exported_on_cuda() ? "cuda" : "cpu") : options.device;
  try {
    device_ = c10::Device(wanted);
  } catch (const std::exception&) {
    throw RunnerError(RunnerError::Kind::kSampling, "unknown device '" + wanted + "'; use cpu or cuda[:N]");
  }
  if (!device_.is_cpu() && !device_.is_cuda()) {
    throw RunnerError(RunnerError::Kind::kSampling, "the runner supports cpu and cuda devices, not " + wanted);
  }
  if (device_.is_cuda() && !built_with_cuda()) {
    throw RunnerError(RunnerError::Kind::kUnavailable,
                      "this build of flowturbo._runner has no CUDA support (libtorch without CUDA at build time); "
                      "run on --device cpu or rebuild against a CUDA torch");
  }
  if (options.format == "aoti" && device_.is_cuda() != manifest_.exported_on_cuda()) {
    throw RunnerError(RunnerError::Kind::kSampling,
                      "the AOTInductor packages in " + manifest_.root + " were compiled for '" + manifest_.device +
                          "' and cannot run on " + wanted + "; re-export with `flowturbo export --device " +
                          (device_.is_cuda() ? "cuda" : "cpu") + " --format aoti`");
  }
  if (options.format != "aoti" && options.format != "tensorrt") {
    throw RunnerError(RunnerError::Kind::kSampling, "unknown engine format '" + options.format + "'; use aoti or tensorrt");
  }
  if (options.format == "tensorrt" && !built_with_tensorrt()) {
    throw RunnerError(RunnerError::Kind::kUnavailable,
                      "this build of flowturbo._runner has no TensorRT engines: it was built without "
                      "-DFLOWTURBO_TENSORRT=ON (needs the TensorRT SDK: set TensorRT_ROOT and reinstall)");
  }
  std::vector<ArtifactInfo> artifacts;
  try {
    artifacts = manifest_.of_format(options.format);
  } catch (const ManifestError& exc) {
    throw RunnerError(RunnerError::Kind::kCheckpoint, exc.what());
  }
  check_step_graph_inputs(artifacts);
  const auto& grid = manifest_.schedule.timesteps;
  for (const auto& a : artifacts) {
    if (a.role == "encoder") continue;  // images -> latents for inpainting / editing, which run in Python
    EngineSpec spec;
    spec.module = a.module;
    spec.file = a.file;
    for (const auto& t : a.inputs) spec.input_names.push_back(t.name);
    for (const auto& t : a.outputs) {
      spec.output_names.push_back(t.name);
      spec.output_shapes.push_back(t.shape);
      spec.output_dtypes.push_back(t.dtype);
    }
    std::unique_ptr<ModuleEngine> engine;
#ifdef FLOWTURBO_TENSORRT
    if (options.format == "tensorrt") engine = make_tensorrt_engine(spec, device_);
#endif
    if (!engine) engine = make_aoti_engine(spec, device_);
    if (options.reuse_engine_buffers) engine = std::make_unique<BufferReusingEngine>(std::move(engine));
    engines_->descriptions.push_back(a.role + ": " + engine->describe());
    int index = -1;
    if (a.time.has_value()) {
      index = -2;
      for (size_t k = 0; k < grid.size(); ++k) {
        if (grid[k] == *a.time) index = static_cast<int>(k);
      }
      if (index < 0) {
        throw RunnerError(RunnerError::Kind::kCheckpoint, a.file + " is folded at t=" + time_text(*a.time) +
                                                              ", which is not on the schedule's grid; re-export");
      }
    }
    const StepEngines::Key key{index, a.dt.value_or(kNoDt)};
    if (a.role == "predictor") {
      engines_->predictor.by_key[key] = {std::move(engine), spec.input_names};
    } else if (a.role == "refiner") {
      engines_->refiner.by_key[key] = {std::move(engine), spec.input_names};
    } else if (a.role == "decoder") {
      engines_->decoder = std::move(engine);
    } else if (a.role == "unrolled") {
      engines_->unrolled = std::move(engine);
    } else {
      throw RunnerError(RunnerError::Kind::kCheckpoint, a.file + ": unknown artifact role '" + a.role + "'");
    }
  }
  // The velocity layout comes from the step graphs' specs: (b, C, H, W), or (b, 2C, H, W) per CFG half
  // (flowturbo.integrator). A schedule that needs the per-half carry refuses graphs without it.
  const int64_t channels = manifest_.latent_shape.at(0);
  velocity_channels_ = channels;
  bool has_step_graphs = false;
  for (const auto& a : artifacts) {
    if ((a.role != "predictor" && a.role != "refiner") || a.outputs.empty() || a.outputs[0].shape.size() != 3) continue;
    has_step_graphs = true;
    const int64_t width = a.outputs[0].shape[0];
    if (width != channels && width != 2 * channels) {
      throw RunnerError(RunnerError::Kind::kCheckpoint, a.file + " returns velocities with " + std::to_string(width) +
                                                            " channels for " + std::to_string(channels) +
                                                            "-channel latents; re-export");
    }
    velocity_channels_ = width;
  }
  if (has_step_graphs && manifest_.schedule.carries_halves(static_cast<int>(channels)) &&
      velocity_channels_ != 2 * channels) {
    throw RunnerError(RunnerError::Kind::kCheckpoint,
                      "schedule " + manifest_.schedule.notation() +
                          " carries its velocity per CFG half (partial guidance with R steps), but the step graphs "
                          "return one half: they were exported by an older flowturbo; re-export");
  }
  if (!engines_->unrolled) {
    if (!engines_->decoder) throw RunnerError(RunnerError::Kind::kCheckpoint, manifest_.root + " has no decoder; re-export");
    if (engines_->predictor.by_key.empty()) {
      throw RunnerError(RunnerError::Kind::kCheckpoint, manifest_.root + " has no predictor graph; re-export");
    }
    if (manifest_.schedule.uses_refiner() && engines_->refiner.by_key.empty()) {
      throw RunnerError(RunnerError::Kind::kCheckpoint,
                        "schedule " + manifest_.schedule.notation() + " has R steps but " + manifest_.root +
                            " has no refiner graph; re-export");
    }
  }
  if (device_.is_cuda()) {
    if (!options.cuda_graph) {
      graph_fallback_reason_ = "CUDA-graph capture disabled by the caller";
    } else {
      bool all = true;
      for (const auto* table : {&engines_->predictor, &engines_->refiner}) {
        for (const auto& [_, graph] : table->by_key) all = all && graph.engine->capturable();
      }
      if (engines_->decoder) all = all && engines_->decoder->capturable();
      if (engines_->unrolled) all = all && engines_->unrolled->capturable();
      if (!all) graph_fallback_reason_ = "an engine cannot be captured into a CUDA graph; running step by step";
    }
  }
}

ScheduleRunner::~ScheduleRunner() = default;

namespace {

std::string shape_text(const TensorInfo& t) {
  std::string out = "(" + std::string(t.batched ? "b" : "");
  for (size_t i = 0; i < t.shape.size(); ++i) out += (i == 0 && !t.batched ? "" : ", ") + std::to_string(t.shape[i]);
  return out + ") " + t.dtype;
}

}  // namespace

void ScheduleRunner::check_step_graph_inputs(const std::vector<ArtifactInfo>& artifacts) {
  const std::string reexport = "; the export and this runner come from different flowturbo versions: re-export "
                               "with `flowturbo export --overwrite`";
  // A text export's conditioning: the predictor graph's inputs besides latents and t, given per batch by the caller.
  if (manifest_.takes_prompts) {
    for (const auto& a : artifacts) {
      if (a.role != "predictor") continue;
      for (const auto& input : a.inputs) {
        if (input.name == "latents" || input.name == "t") continue;
        if (input.name == "labels") {
          throw RunnerError(RunnerError::Kind::kCheckpoint, a.file + ": the predictor graph of a text-to-image "
                                                                "export takes class ids (labels)" + reexport);
        }
        const auto [known, inserted] = conditioning_inputs_.emplace(input.name, input);
        if (!inserted && (known->second.shape != input.shape || known->second.dtype != input.dtype)) {
          throw RunnerError(RunnerError::Kind::kCheckpoint, a.file + ": the predictor graphs disagree on " +
                                                                input.name + reexport);
        }
      }
    }
  }
  // Every step-graph input must be one the loop feeds: latents and t, the refiner's v and dt, a class export's labels,
  // or one of a text export's conditioning inputs; the refiner's graph shares the ones it takes (the pooled prompt
  // embeddings) with the predictor's by name, so with the same shape and dtype. Refused here, before any engine loads.
  for (const auto& a : artifacts) {
    if (a.role != "predictor" && a.role != "refiner") continue;
    const bool refiner = a.role == "refiner";
    for (const auto& input : a.inputs) {
      if (input.name == "latents" || input.name == "t") continue;
      if (refiner && (input.name == "v" || input.name == "dt")) continue;
      if (!manifest_.takes_prompts && input.name == "labels") continue;
      const auto shared = conditioning_inputs_.find(input.name);
      if (shared == conditioning_inputs_.end()) {
        throw RunnerError(RunnerError::Kind::kCheckpoint,
                          a.file + ": the " + a.role + " graph takes an input '" + input.name +
                              "' the runner does not know (it feeds latents, t" + (refiner ? ", v, dt" : "") +
                              (manifest_.takes_prompts ? " and the predictor graph's prompt inputs" : " and labels") +
                              ")" + reexport);
      }
      if (shared->second.shape != input.shape || shared->second.dtype != input.dtype ||
          shared->second.batched != input.batched) {
        throw RunnerError(RunnerError::Kind::kCheckpoint,
                          a.file + ": the " + a.role + " graph takes " + input.name + " " + shape_text(input) +
                              " but the predictor graph takes it " + shape_text(shared->second) +
                              " (the runner feeds both from one buffer)" + reexport);
      }
    }
  }
}

std::vector<std::string> ScheduleRunner::engine_descriptions() const { return engines_->descriptions; }

at::Tensor ScheduleRunner::make_noise(int64_t n, uint64_t seed, uint64_t first_index) const {
  if (n < 1) throw RunnerError(RunnerError::Kind::kSampling, "need at least one image, got " + std::to_string(n));
  c10::InferenceMode normal_tensors(false);
  const std::vector<int64_t> image_shape(manifest_.latent_shape.begin(), manifest_.latent_shape.end());
  std::vector<int64_t> shape{n};
  shape.insert(shape.end(), image_shape.begin(), image_shape.end());
  at::Tensor noise = at::empty(shape, at::TensorOptions().dtype(at::kFloat));  // (n, C, H, W)
  for (int64_t i = 0; i < n; ++i) {
    // Unsigned arithmetic wraps mod 2^64, as flowturbo.noise.image_seed does.
    auto generator = at::make_generator<at::CPUGeneratorImpl>(seed + first_index + static_cast<uint64_t>(i));
    noise[i].copy_(at::randn(image_shape, generator, at::TensorOptions().dtype(at::kFloat)));  // (C, H, W)
  }
  return noise.to(dtype_);
}

bool ScheduleRunner::graph_enabled() const { return device_.is_cuda() && graph_fallback_reason_.empty(); }

void ScheduleRunner::synchronize() const {
#ifdef FLOWTURBO_WITH_CUDA
  if (device_.is_cuda()) c10::cuda::getCurrentCUDAStream(device_.index()).synchronize();
#endif
}

ScheduleRunner::BatchState& ScheduleRunner::state_for(int64_t batch) {
  auto found = states_.find(batch);
  if (found != states_.end()) return *found->second;
  auto state = std::make_unique<BatchState>();
  state->batch = batch;
  state->labels = at::empty({batch}, at::TensorOptions().dtype(at::kLong).device(device_));
  for (const auto& [name, input] : conditioning_inputs_) {  // a text export's: the predictor's and the refiner's
    std::vector<int64_t> shape{batch};
    shape.insert(shape.end(), input.shape.begin(), input.shape.end());
    const auto type = input.dtype == "float32" ? at::kFloat : dtype_of_precision(manifest_.precision);
    state->conditioning[name] = at::empty(shape, at::TensorOptions().dtype(type).device(device_));
  }
  const auto float_options = at::TensorOptions().dtype(at::kFloat).device(device_);
  const auto& grid = manifest_.schedule.timesteps;
  for (double t : grid) state->times.push_back(at::full({batch}, t, float_options));
  const auto carried = carried_time_indices(manifest_.schedule);
  for (int k = 0; k < manifest_.schedule.num_steps(); ++k) {
    if (manifest_.schedule.steps[k] != StepKind::Refiner) continue;
    for (int j : {k, k + 1}) state->ages[{j, carried[k]}] = at::full({batch}, grid[j] - grid[carried[k]], float_options);
  }
  std::vector<int64_t> latent{batch};
  latent.insert(latent.end(), manifest_.latent_shape.begin(), manifest_.latent_shape.end());
  const auto latent_options = at::TensorOptions().dtype(dtype_).device(device_);
  for (at::Tensor* buffer : {&state->x, &state->x_pred, &state->scratch}) *buffer = at::empty(latent, latent_options);
  std::vector<int64_t> velocity = latent;
  velocity[1] = velocity_channels_;
  for (at::Tensor* buffer : {&state->velocity_a, &state->velocity_b, &state->refined_a, &state->refined_b}) {
    *buffer = at::empty(velocity, latent_options);
  }
  auto& ref = *state;
  states_.emplace(batch, std::move(state));
  return ref;
}

namespace {

at::Tensor call_engine(ModuleEngine& engine, const std::vector<std::string>& names, const at::Tensor& x,
                       const at::Tensor* v, const at::Tensor& t, const at::Tensor* dt, const at::Tensor& labels,
                       const std::map<std::string, at::Tensor>& conditioning) {
  std::vector<at::Tensor> inputs;
  inputs.reserve(names.size());
  for (const auto& name : names) {
    if (name == "latents") inputs.push_back(x);
    else if (name == "v" && v != nullptr) inputs.push_back(*v);
    else if (name == "t") inputs.push_back(t);
    else if (name == "dt" && dt != nullptr) inputs.push_back(*dt);
    else if (name == "labels") inputs.push_back(labels);
    else if (conditioning.count(name)) inputs.push_back(conditioning.at(name));
    else throw RunnerError(RunnerError::Kind::kCheckpoint, "an engine takes an unknown input '" + name + "'");
  }
  return engine.run(inputs).at(0);
}

}  // namespace

at::Tensor ScheduleRunner::velocity(const at::Tensor& x, int time_index, BatchState& state) {
  const auto& graph = engines_->predictor.at(time_index, kNoDt, manifest_.schedule);
  return call_engine(*graph.engine, graph.inputs, x, nullptr, state.times[time_index], nullptr, state.labels,
                     state.conditioning);
}

at::Tensor ScheduleRunner::offset(const at::Tensor& x, const at::Tensor& v, int time_index, int velocity_index,
                                  BatchState& state) {
  // dt = t - t_v: the same double subtraction as the Python loop's, so a folded dt matches bit for bit.
  const auto& grid = manifest_.schedule.timesteps;
  const double dt = manifest_.refiner_dt_conditioning ? grid[time_index] - grid[velocity_index] : kNoDt;
  const auto& graph = engines_->refiner.at(time_index, dt, manifest_.schedule);
  return call_engine(*graph.engine, graph.inputs, x, &v, state.times[time_index],
                     &state.ages.at({time_index, velocity_index}), state.labels, state.conditioning);
}

at::Tensor ScheduleRunner::integrate(const at::Tensor& noise, BatchState& state, std::vector<StepRecord>* steps,
                                     bool check_each_step) {
  const Schedule& schedule = manifest_.schedule;
  const auto& times = schedule.timesteps;
  const auto calls = schedule.step_calls();
  // Every update writes into the batch's preallocated buffers with the same ops, in the same order, as the
  // Python loop (h * d first, then the add), so both give the same bits on the same engines. Engine outputs
  // are fresh tensors from the engine (AOTInductor allocates them; TensorRT hands out its own buffers).
  at::Tensor& x = state.x;  // (b, C, H, W)
  at::Tensor& x_pred = state.x_pred;
  at::Tensor& scratch = state.scratch;
  const int64_t channels = manifest_.latent_shape.at(0);
  // The conditional half of a velocity (all of it outside the per-half layout): what moves x.
  auto first = [channels](const at::Tensor& v) { return v.size(1) == channels ? v : v.narrow(1, 0, channels); };
  x.copy_(noise);
  at::Tensor carried;  // undefined: nothing carried
  const std::vector<int> carried_time = carried_time_indices(schedule);  // grid index of t_v per step
#ifdef FLOWTURBO_WITH_CUDA
  // Timing events: default-constructed CUDA events have timing disabled (cudaEventDisableTiming), and
  // elapsed_time() on them throws.
  std::vector<c10::cuda::CUDAEvent> events;
  const bool cuda_events = steps != nullptr && device_.is_cuda();
  if (cuda_events) {
    events.reserve(schedule.steps.size() + 1);
    for (size_t k = 0; k <= schedule.steps.size(); ++k) events.emplace_back(cudaEventDefault);
    events[0].record();
  }
#endif
  for (int k = 0; k < schedule.num_steps(); ++k) {
    const StepKind kind = schedule.steps[k];
    const double t0 = times[k], t1 = times[k + 1], h = t1 - t0;
    StepRange range("step " + std::to_string(k) + " " + static_cast<char>(kind), device_.is_cuda());
    const auto started = Clock::now();
    if (kind == StepKind::Euler) {
      at::mul_out(scratch, first(velocity(x, k, state)), h);  // x <- x + h v   (v used before any other engine call)
      x.add_(scratch);
      carried = at::Tensor();
    } else if (kind == StepKind::Refiner) {
      const at::Tensor v = carried;  // one of our buffers; schedule validation guarantees it exists
      at::Tensor& d = v.is_same(state.refined_a) ? state.refined_b : state.refined_a;
      at::add_out(d, v, offset(x, v, k, carried_time[k], state));  // d = v + r(x, t_k, v, t_k - t_v)
      at::mul_out(scratch, first(d), h);
      at::add_out(x_pred, x, scratch);  // x + h d
      at::Tensor d_next = offset(x_pred, v, k + 1, carried_time[k], state);  // r(x + h d, t_k+1, v, t_k+1 - t_v)
      at::add_out(scratch, first(d), first(d_next.add_(d)));  // d' = d + r(x + h d, t_k+1, v)  (a + b == b + a)
      scratch.mul_(0.5 * h);
      x.add_(scratch);  // x <- x + h/2 (d + d')
      carried = d;
    } else {
      at::Tensor d;
      if (kind == StepKind::Pseudo && carried.defined()) {
        d = carried;
      } else {
        d = carried.defined() && carried.is_same(state.velocity_a) ? state.velocity_b : state.velocity_a;
        d.copy_(velocity(x, k, state));
      }
      at::mul_out(scratch, first(d), h);
      at::add_out(x_pred, x, scratch);  // x + h d
      at::Tensor& d_next = d.is_same(state.velocity_a) ? state.velocity_b : state.velocity_a;
      d_next.copy_(velocity(x_pred, k + 1, state));
      at::add_out(scratch, first(d), first(d_next));
      scratch.mul_(0.5 * h);
      x.add_(scratch);  // x <- x + h/2 (d + d')
      carried = d_next;
    }
    if (check_each_step && !at::isfinite(x).all().item<bool>()) {
      std::ostringstream msg;
      msg << "NaN/Inf in the latents after step " << k << " (" << static_cast<char>(kind) << ", t " << time_text(t0)
          << " -> " << time_text(t1) << ") of " << schedule.notation()
          << "; try the fp32 export or a lower guidance scale";
      throw RunnerError(RunnerError::Kind::kSampling, msg.str());
    }
    if (steps != nullptr) {
      StepRecord record;
      record.index = k;
      record.kind = static_cast<char>(kind);
      record.t_start = t0;
      record.t_end = t1;
      record.predictor_calls = calls[k].predictor;
      record.refiner_calls = calls[k].refiner;
#ifdef FLOWTURBO_WITH_CUDA
      if (cuda_events) {
        events[k + 1].record();
      } else {
        record.ms = elapsed_ms(started);
      }
#else
      record.ms = elapsed_ms(started);
#endif
      steps->push_back(record);
    }
  }
#ifdef FLOWTURBO_WITH_CUDA
  if (cuda_events) {
    events.back().synchronize();
    for (size_t k = 0; k < steps->size(); ++k) (*steps)[k].ms = events[k].elapsed_time(events[k + 1]);
  }
#endif
  return x.clone();  // the caller keeps the latents; the state buffer is reused by the next batch
}

std::vector<at::Tensor> ScheduleRunner::forward(const at::Tensor& noise, BatchState& state) {
  if (engines_->unrolled) {
    std::vector<at::Tensor> outputs = engines_->unrolled->run({noise, state.labels});
    if (!engines_->unrolled->returns_fresh_outputs()) {
      for (auto& t : outputs) t = t.clone();  // the caller keeps them past the engine's next call
    }
    return outputs;
  }
  at::Tensor latents = integrate(noise, state, nullptr, false);
  at::Tensor images = decode(latents);
  return {images, latents};
}

at::Tensor ScheduleRunner::decode(const at::Tensor& latents) {
  at::Tensor images = engines_->decoder->run({latents}).at(0);
  return engines_->decoder->returns_fresh_outputs() ? images : images.clone();  // the caller keeps the images
}

void ScheduleRunner::locate_non_finite(const at::Tensor& noise, BatchState& state) {
  if (!engines_->unrolled) {
    at::Tensor latents = integrate(noise, state, nullptr, /*check_each_step=*/true);  // throws naming the step
    (void)latents;
    throw RunnerError(RunnerError::Kind::kSampling,
                      "NaN/Inf in the decoded images (the latents were finite): the decoder overflowed; try the "
                      "fp32 export");
  }
  throw RunnerError(RunnerError::Kind::kSampling,
                    "NaN/Inf in the output of the unrolled graph; export the time-input variant to find the step, "
                    "or try the fp32 export / a lower guidance scale");
}

BatchOutput ScheduleRunner::run_batch(const at::Tensor& noise_in, const at::Tensor& labels_in, bool profile) {
  return run_batch(noise_in, labels_in, {}, profile);
}

BatchOutput ScheduleRunner::run_batch(const at::Tensor& noise_in, const at::Tensor& labels_in,
                                      const std::map<std::string, at::Tensor>& conditioning, bool profile) {
  // Normal (not inference) tensors whatever mode the caller is in: the per-batch buffers outlive this call and
  // are updated in place by later calls, which an inference tensor forbids outside inference mode.
  c10::InferenceMode normal_tensors(false);
  c10::NoGradGuard no_grad;
  const int64_t batch = noise_in.dim() == 4 ? noise_in.size(0) : -1;
  std::vector<int64_t> want{batch};
  want.insert(want.end(), manifest_.latent_shape.begin(), manifest_.latent_shape.end());
  if (noise_in.sizes().vec() != want) {
    std::ostringstream msg;
    msg << "noise must have shape (b";
    for (auto d : manifest_.latent_shape) msg << ", " << d;
    msg << "), got " << noise_in.sizes();
    throw RunnerError(RunnerError::Kind::kSampling, msg.str());
  }
  if (manifest_.takes_prompts != !conditioning.empty()) {
    throw RunnerError(RunnerError::Kind::kSampling,
                      manifest_.takes_prompts ? "this is a text-to-image export: pass the prompt embeddings "
                                                "(conditioning), not class ids"
                                              : "this export is conditioned on class ids, not prompt embeddings");
  }
  if (!manifest_.takes_prompts && (labels_in.dim() != 1 || labels_in.size(0) != batch)) {
    throw RunnerError(RunnerError::Kind::kSampling, "labels must be a vector with one class id per image");
  }
  try {
    manifest_.check_batch(batch);
  } catch (const ManifestError& exc) {
    throw RunnerError(RunnerError::Kind::kSampling, exc.what());
  }
  // A text export has no class ids: a placeholder of zeros (its engines take none; the class check is skipped).
  const at::Tensor labels_cpu =
      manifest_.takes_prompts ? at::zeros({batch}, at::kLong) : labels_in.to(at::kCPU, at::kLong);
  const int64_t low = labels_cpu.min().item<int64_t>(), high = labels_cpu.max().item<int64_t>();
  if (!manifest_.takes_prompts && (low < 0 || high >= manifest_.num_classes)) {
    throw RunnerError(RunnerError::Kind::kSampling,
                      "class ids must be in [0, " + std::to_string(manifest_.num_classes) + "), got " +
                          std::to_string(low < 0 ? low : high) + "; this model has " +
                          std::to_string(manifest_.num_classes) + " classes");
  }
  if (profile && engines_->unrolled) {
    throw RunnerError(RunnerError::Kind::kSampling,
                      "per-step times need the time-input or per-step variant: the unrolled graph runs the whole "
                      "schedule as one call (re-export with --variant time-input)");
  }
  BatchState& state = state_for(batch);
  for (const auto& [name, buffer] : state.conditioning) {  // a text export's inputs: every one, with its shape
    const auto given = conditioning.find(name);
    if (given == conditioning.end() || given->second.sizes() != buffer.sizes()) {
      std::ostringstream msg;
      msg << "the text-to-image export takes " << name << " of shape " << buffer.sizes() << ", got "
          << (given == conditioning.end() ? std::string("none") : c10::str(given->second.sizes()));
      throw RunnerError(RunnerError::Kind::kSampling, msg.str());
    }
  }
  if (conditioning.size() != state.conditioning.size()) {
    throw RunnerError(RunnerError::Kind::kSampling, "an input the text-to-image export does not take was given");
  }
  for (auto& [name, buffer] : state.conditioning) buffer.copy_(conditioning.at(name));
  const at::Tensor noise = noise_in.to(device_, dtype_).contiguous();
  BatchOutput out;
  synchronize();
  const auto started = Clock::now();
  state.labels.copy_(labels_cpu);
  std::vector<at::Tensor> result;
  if (profile) {
    out.latents = integrate(noise, state, &out.steps, false);
    synchronize();
    out.sample_ms = elapsed_ms(started);
    const auto decode_started = Clock::now();
    out.images = decode(out.latents);
    synchronize();
    out.decode_ms = elapsed_ms(decode_started);
  } else if (graph_enabled()) {
#ifdef FLOWTURBO_WITH_CUDA
    c10::cuda::CUDAGuard guard(device_);
    if (!state.graph) {
      state.static_noise = noise.clone();
      // Warm up on a side stream (first calls allocate workspaces), then capture.
      // Once per batch size, so plain synchronisation orders the side stream after the labels' copy.
      synchronize();
      auto side = c10::cuda::getStreamFromPool(false, device_.index());
      {
        c10::cuda::CUDAStreamGuard stream_guard(side);
        forward(state.static_noise, state);
        side.synchronize();
        try {
          state.graph = std::make_unique<at::cuda::CUDAGraph>();
          state.graph->capture_begin();
          state.graph_outputs = forward(state.static_noise, state);
          state.graph->capture_end();
        } catch (const std::exception& exc) {
          graph_fallback_reason_ = std::string("CUDA-graph capture failed (") + first_line(exc.what()) +
                                   "); running step by step";
          abort_capture(state.graph, side);
          state.graph_outputs.clear();
        }
        side.synchronize();
      }
    }
    if (state.graph) {
      state.static_noise.copy_(noise);
      state.graph->replay();
      out.images = state.graph_outputs[0].clone();
      out.latents = state.graph_outputs[1].clone();
      out.graph_replayed = true;
    }
#endif
    if (!out.graph_replayed) {
      result = forward(noise, state);
      out.images = result[0];
      out.latents = result[1];
    }
    synchronize();
    out.sample_ms = elapsed_ms(started);
  } else {
    if (engines_->unrolled) {
      result = forward(noise, state);
      out.images = result[0];
      out.latents = result[1];
      synchronize();
      out.sample_ms = elapsed_ms(started);
    } else {
      out.latents = integrate(noise, state, nullptr, false);
      synchronize();
      out.sample_ms = elapsed_ms(started);
      const auto decode_started = Clock::now();
      out.images = decode(out.latents);
      synchronize();
      out.decode_ms = elapsed_ms(decode_started);
    }
  }
  out.total_ms = elapsed_ms(started);
  if (!at::isfinite(out.images).all().item<bool>()) locate_non_finite(noise, state);
  return out;
}

}  // namespace flowturbo
