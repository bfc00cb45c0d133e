// One compiled module (predictor step, refiner step, decoder or the unrolled schedule) behind one
// interface, so the schedule runner does not care whether AOTInductor or TensorRT executes it.
#pragma once

#include <ATen/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace flowturbo {

// A runner-side error (bad manifest, missing file, unavailable engine, NaN in a step). The bindings map
// it to flowturbo.errors.SamplingError / CheckpointError by `kind`.
class RunnerError : public std::runtime_error {
 public:
  enum class Kind { kSampling, kCheckpoint, kUnavailable };
  RunnerError(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

// What an engine is told about the module it runs (from the manifest's spec).
struct EngineSpec {
  std::string module;                     // e.g. "predictor_step" or "predictor_step@0.25"
  std::string file;                       // absolute path of the artifact
  std::vector<std::string> input_names;   // spec order
  std::vector<std::string> output_names;  // spec order
  // Output shapes without the batch axis, e.g. {4, 8, 8} for latents; one per output.
  std::vector<std::vector<int64_t>> output_shapes;
  std::vector<std::string> output_dtypes;  // "float32" | "float16" | "bfloat16"
};

class ModuleEngine {
 public:
  virtual ~ModuleEngine() = default;
  // Runs the module on `inputs` (spec order, on the engine's device, batch = inputs[0].size(0)).
  // Returns the outputs in spec order. Engines may return views of internal buffers that stay valid
  // until the next call of run() on the same engine.
  virtual std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) = 0;
  // Whether run() may be recorded into a CUDA graph (same buffers, no host sync, no allocation
  // outside the capture's private pool).
  virtual bool capturable() const = 0;
  // False when run() returns the engine's own buffers (overwritten by its next run, e.g. TensorRT's
  // preallocated outputs); the runner then copies what must outlive the next call.
  virtual bool returns_fresh_outputs() const { return true; }
  virtual std::string describe() const = 0;
};

// Engines this build can create: "aoti" always (when the runner is built at all), "tensorrt" when
// compiled with FLOWTURBO_TENSORRT.
std::unique_ptr<ModuleEngine> make_aoti_engine(const EngineSpec& spec, const c10::Device& device);
#ifdef FLOWTURBO_TENSORRT
std::unique_ptr<ModuleEngine> make_tensorrt_engine(const EngineSpec& spec, const c10::Device& device);
#endif

}  // namespace flowturbo
