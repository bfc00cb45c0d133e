// AOTInductor packages (.pt2) through libtorch's AOTIModelPackageLoader, on CPU or CUDA.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <sstream>

#include "engine.hpp"

#ifdef FLOWTURBO_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace flowturbo {
namespace {

class AotiEngine final : public ModuleEngine {
 public:
  AotiEngine(const EngineSpec& spec, const c10::Device& device) : spec_(spec), device_(device) {
    try {
      // run_single_threaded: one model instance, no per-call CUDA-event bookkeeping between calls. The
      // default (false) queries a CUDA event on every call after the first, which is illegal inside a
      // CUDA-graph capture (torch documents run_single_threaded for graphs), and with one instance each call
      // also waits on the host for the previous one. The runner calls an engine from one thread only.
      loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
          spec.file, "model", /*run_single_threaded=*/true, /*num_runners=*/1,
          device.is_cuda() ? device.index() : static_cast<c10::DeviceIndex>(-1));
    } catch (const std::exception& exc) {
      throw RunnerError(RunnerError::Kind::kCheckpoint,
                        "cannot load AOTInductor package " + spec.file + ": " + exc.what() +
                            "; re-export it with `flowturbo export --format aoti` for this torch version and device");
    }
  }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) override {
    if (inputs.size() != spec_.input_names.size()) {
      std::ostringstream msg;
      msg << spec_.module << " takes " << spec_.input_names.size() << " inputs, got " << inputs.size();
      throw RunnerError(RunnerError::Kind::kSampling, msg.str());
    }
    void* stream = nullptr;
#ifdef FLOWTURBO_WITH_CUDA
    if (device_.is_cuda()) stream = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
#endif
    std::vector<at::Tensor> outputs = loader_->run(inputs, stream);
    if (outputs.size() != spec_.output_names.size()) {
      std::ostringstream msg;
      msg << spec_.file << " returned " << outputs.size() << " outputs, its spec names " << spec_.output_names.size()
          << "; re-export it";
      throw RunnerError(RunnerError::Kind::kCheckpoint, msg.str());
    }
    return outputs;
  }

  // AOTInductor launches on the stream it is given and allocates through the caching allocator, which
  // CUDA-graph capture redirects to the graph's private pool.
  bool capturable() const override { return true; }

  std::string describe() const override { return "aoti " + spec_.file; }

 private:
  EngineSpec spec_;
  c10::Device device_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

}  // namespace

std::unique_ptr<ModuleEngine> make_aoti_engine(const EngineSpec& spec, const c10::Device& device) {
  return std::make_unique<AotiEngine>(spec, device);
}

}  // namespace flowturbo
