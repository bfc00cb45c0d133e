// The TensorRT engine behind ModuleEngine (engine.hpp): one deserialized .engine file + one execution
// context, run with the TensorRT 10 tensor API (setInputShape / setTensorAddress / enqueueV3; none of the
// bindings-index API that TensorRT 10 removed). Compiled only with -DFLOWTURBO_TENSORRT (CMake option
// FLOWTURBO_TENSORRT + TensorRT_ROOT; links nvinfer, the CUDA runtime and libtorch).
//
// The engine file was already checked against its metadata (TensorRT version, GPU, schedule, batch profile,
// precision, checksum) by the runner before it gets here; this file checks what only the deserialized engine
// knows: its IO tensor names and dtypes against the spec, and every input at run time.
#ifdef FLOWTURBO_TENSORRT

#include <ATen/ATen.h>
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the same getCurrentCUDAStream (ATen re-exports
// it), without CUDAContext.h's cuBLAS/cuSPARSE/cuSOLVER headers, which a CUDA runtime-only toolkit lacks.
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <NvInferRuntime.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine.hpp"

namespace flowturbo {
namespace {

using Kind = RunnerError::Kind;
const char* const kRebuild = "; rebuild it with `flowturbo export --format tensorrt`";

// TensorRT's warnings and errors go to stderr; info/verbose are dropped.
class StderrLogger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity > Severity::kWARNING) return;
    const char* level = severity == Severity::kWARNING ? "warning" : "error";
    std::cerr << "[TensorRT " << level << "] " << msg << std::endl;
  }
};

// TensorRT treats the logger as process-wide: every runtime shares this one.
StderrLogger& trt_logger() {
  static StderrLogger logger;
  return logger;
}

std::string join(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + items[i];
  return out + "]";
}

std::string join(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + ")";
}

at::ScalarType scalar_type_of(nvinfer1::DataType type, const std::string& where) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return at::kFloat;
    case nvinfer1::DataType::kHALF: return at::kHalf;
    case nvinfer1::DataType::kBF16: return at::kBFloat16;
    case nvinfer1::DataType::kINT64: return at::kLong;
    case nvinfer1::DataType::kINT32: return at::kInt;
    default: throw RunnerError(Kind::kCheckpoint, where + " has a TensorRT data type flowturbo does not bind" + kRebuild);
  }
}

at::ScalarType scalar_type_of(const std::string& dtype) {
  if (dtype == "float32") return at::kFloat;
  if (dtype == "float16") return at::kHalf;
  if (dtype == "bfloat16") return at::kBFloat16;
  if (dtype == "int64") return at::kLong;
  throw RunnerError(Kind::kCheckpoint, "unknown spec dtype '" + dtype + "'");
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw RunnerError(Kind::kCheckpoint, "cannot open TensorRT engine " + path + kRebuild);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

class TensorRTEngine final : public ModuleEngine {
 public:
  TensorRTEngine(const EngineSpec& spec, const c10::Device& device) : spec_(spec), device_(device) {
    if (!device_.is_cuda())
      throw RunnerError(Kind::kUnavailable, "TensorRT engines run on a CUDA device, not " + device_.str());
    if (!device_.has_index()) device_ = c10::Device(c10::kCUDA, c10::cuda::current_device());
    if (spec_.output_shapes.size() != spec_.output_names.size() || spec_.output_dtypes.size() != spec_.output_names.size())
      throw RunnerError(Kind::kCheckpoint, spec_.module + ": spec has mismatched output names/shapes/dtypes");
    c10::cuda::CUDAGuard guard(device_);  // the engine's weights and context memory live on device_
    const std::string blob = read_file(spec_.file);
    runtime_.reset(nvinfer1::createInferRuntime(trt_logger()));
    if (!runtime_) throw RunnerError(Kind::kUnavailable, "TensorRT createInferRuntime failed (see its log)");
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_)
      throw RunnerError(Kind::kCheckpoint, "TensorRT could not deserialize " + spec_.file +
                                               " (built by another TensorRT version or for another GPU?)" + kRebuild);
    check_io();
    context_.reset(engine_->createExecutionContext());
    if (!context_)
      throw RunnerError(Kind::kUnavailable, "TensorRT could not create an execution context for " + spec_.file +
                                                " (out of GPU memory?)");
  }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) override {
    if (inputs.size() != spec_.input_names.size())
      throw RunnerError(Kind::kSampling, spec_.module + " takes " + std::to_string(spec_.input_names.size()) +
                                             " inputs " + join(spec_.input_names) + ", got " + std::to_string(inputs.size()));
    c10::cuda::CUDAGuard guard(device_);
    const int64_t batch = inputs.empty() || !inputs[0].defined() || inputs[0].dim() == 0 ? -1 : inputs[0].size(0);
    for (size_t i = 0; i < inputs.size(); ++i) {
      const at::Tensor& t = inputs[i];
      const std::string& name = spec_.input_names[i];
      const std::string where = spec_.module + " input " + name;
      if (!t.defined() || !t.is_cuda() || t.device() != device_ || !t.is_contiguous())
        throw RunnerError(Kind::kSampling, where + " must be a contiguous tensor on " + device_.str() +
                                               (t.defined() ? ", got one on " + t.device().str() +
                                                                  (t.is_contiguous() ? "" : " (non-contiguous)")
                                                            : ", got an undefined tensor"));
      if (t.scalar_type() != input_types_[i])
        throw RunnerError(Kind::kSampling, where + " must be " + c10::toString(input_types_[i]) + ", got " +
                                               c10::toString(t.scalar_type()));
      if (t.dim() == 0 || t.size(0) != batch || t.dim() > nvinfer1::Dims::MAX_DIMS)
        throw RunnerError(Kind::kSampling, where + " has shape " + join(t.sizes()) + "; every input needs the batch " +
                                               std::to_string(batch) + " as its leading axis (and at most " +
                                               std::to_string(nvinfer1::Dims::MAX_DIMS) + " axes)");
      nvinfer1::Dims dims{};
      dims.nbDims = static_cast<int32_t>(t.dim());
      for (int64_t d = 0; d < t.dim(); ++d) dims.d[d] = t.size(d);
      if (!context_->setInputShape(name.c_str(), dims))
        throw RunnerError(Kind::kSampling, where + " of shape " + join(t.sizes()) +
                                               " does not fit the engine (its optimization profile or static axes); re-export "
                                               "with a --batch profile that covers " + std::to_string(batch));
      if (!context_->setTensorAddress(name.c_str(), t.data_ptr()))
        throw RunnerError(Kind::kSampling, where + ": TensorRT refused its address (see its log)");
    }
    std::vector<at::Tensor>& outputs = buffers(batch);
    for (size_t j = 0; j < outputs.size(); ++j) {
      const char* name = spec_.output_names[j].c_str();
      const nvinfer1::Dims dims = context_->getTensorShape(name);  // known once every input shape is set
      const bool same = dims.nbDims == outputs[j].dim() &&
                        std::equal(dims.d, dims.d + dims.nbDims, outputs[j].sizes().begin());
      if (!same)
        throw RunnerError(Kind::kCheckpoint, spec_.module + " output " + spec_.output_names[j] +
                                                 ": the engine computes another shape than the spec's " +
                                                 join(outputs[j].sizes()) + kRebuild);
      if (!context_->setTensorAddress(name, outputs[j].data_ptr()))
        throw RunnerError(Kind::kSampling, spec_.module + ": TensorRT refused the address of output " + spec_.output_names[j]);
    }
    // Torch's current stream: ordered after the kernels that produced the inputs, and what a CUDA graph
    // capture of the runner records.
    if (!context_->enqueueV3(c10::cuda::getCurrentCUDAStream(device_.index()).stream()))
      throw RunnerError(Kind::kSampling, "TensorRT failed to run " + spec_.module + " at batch " + std::to_string(batch) +
                                             " (see its log)");
    return outputs;  // the cached buffers: valid until the next run() (engine.hpp)
  }

  // enqueueV3 may be recorded with CUDA stream capture once the context has run one enqueueV3 outside the
  // capture with the same input shapes and addresses (TensorRT Developer Guide, "CUDA Graphs": the first
  // enqueue after a shape change does deferred, non-capturable work). The runner's warm-up run is that call,
  // and it also allocates this batch's output buffers, so the captured run allocates nothing.
  bool capturable() const override { return true; }
  bool returns_fresh_outputs() const override { return false; }  // the cached buffers of buffers()

  std::string describe() const override { return "tensorrt " + spec_.file; }

 private:
  void check_io() {
    std::vector<std::string> ins, outs;
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* name = engine_->getIOTensorName(i);
      const nvinfer1::TensorIOMode mode = engine_->getTensorIOMode(name);
      if (mode == nvinfer1::TensorIOMode::kINPUT) ins.emplace_back(name);
      if (mode == nvinfer1::TensorIOMode::kOUTPUT) outs.emplace_back(name);
    }
    auto sorted = [](std::vector<std::string> v) { std::sort(v.begin(), v.end()); return v; };
    if (sorted(ins) != sorted(spec_.input_names) || sorted(outs) != sorted(spec_.output_names))
      throw RunnerError(Kind::kCheckpoint, "TensorRT engine " + spec_.file + " has inputs " + join(ins) + " and outputs " +
                                               join(outs) + ", but the spec of " + spec_.module + " has inputs " +
                                               join(spec_.input_names) + " and outputs " + join(spec_.output_names) + kRebuild);
    for (const std::string& name : spec_.input_names)
      input_types_.push_back(scalar_type_of(engine_->getTensorDataType(name.c_str()), spec_.file + " input " + name));
    for (size_t j = 0; j < spec_.output_names.size(); ++j) {
      const std::string& name = spec_.output_names[j];
      const at::ScalarType have = scalar_type_of(engine_->getTensorDataType(name.c_str()), spec_.file + " output " + name);
      if (have != scalar_type_of(spec_.output_dtypes[j]))
        throw RunnerError(Kind::kCheckpoint, spec_.file + " output " + name + " is " + c10::toString(have) +
                                                 " but the spec says " + spec_.output_dtypes[j] + kRebuild);
    }
  }

  // Output buffers for `batch` images, allocated once per batch size on device_ (stable addresses).
  std::vector<at::Tensor>& buffers(int64_t batch) {
    auto found = buffers_.find(batch);
    if (found != buffers_.end()) return found->second;
    std::vector<at::Tensor> outs;
    for (size_t j = 0; j < spec_.output_names.size(); ++j) {
      std::vector<int64_t> shape{batch};
      shape.insert(shape.end(), spec_.output_shapes[j].begin(), spec_.output_shapes[j].end());
      outs.push_back(at::empty(shape, at::TensorOptions().dtype(scalar_type_of(spec_.output_dtypes[j])).device(device_)));
    }
    return buffers_.emplace(batch, std::move(outs)).first->second;
  }

  EngineSpec spec_;
  c10::Device device_;
  // Destroyed in reverse order: context, then engine, then runtime (TensorRT 10 objects are deleted with delete).
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  std::vector<at::ScalarType> input_types_;
  std::map<int64_t, std::vector<at::Tensor>> buffers_;
};

}  // namespace

std::unique_ptr<ModuleEngine> make_tensorrt_engine(const EngineSpec& spec, const c10::Device& device) {
  return std::make_unique<TensorRTEngine>(spec, device);
}

}  // namespace flowturbo

#endif  // FLOWTURBO_TENSORRT
