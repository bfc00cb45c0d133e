// The one bindings file of flowturbo._runner: the libtorch-linked C++ schedule runner.
//
// Tensors cross the boundary as DLPack capsules (zero copy, CPU or CUDA), so this module does not depend on
// torch's Python bindings or on the pybind11 version torch was built with; Python wraps them with
// torch.from_dlpack (flowturbo/runtime/cpp_backend.py).
#include <ATen/DLConvertor.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "runner.hpp"

namespace py = pybind11;
using flowturbo::RunnerError;
using flowturbo::RunnerOptions;
using flowturbo::ScheduleRunner;

namespace {

constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";

void delete_unused_capsule(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, kCapsuleName)) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, kCapsuleName));
    if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
  }
}

py::object to_capsule(const at::Tensor& tensor) {
  DLManagedTensor* managed = at::toDLPack(tensor);
  PyObject* capsule = PyCapsule_New(managed, kCapsuleName, delete_unused_capsule);
  if (capsule == nullptr) {
    managed->deleter(managed);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

at::Tensor from_capsule(const py::object& object, const char* what) {
  PyObject* capsule = object.ptr();
  if (!PyCapsule_IsValid(capsule, kCapsuleName)) {
    throw std::invalid_argument(std::string(what) + " must be an unused DLPack capsule (tensor.__dlpack__())");
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, kCapsuleName));
  PyCapsule_SetName(capsule, kUsedCapsuleName);  // the tensor below owns it now
  return at::fromDLPack(managed);
}

py::dict step_dict(const flowturbo::StepRecord& s) {
  py::dict d;
  d["index"] = s.index;
  d["kind"] = std::string(1, s.kind);
  d["t_start"] = s.t_start;
  d["t_end"] = s.t_end;
  d["predictor_calls"] = s.predictor_calls;
  d["refiner_calls"] = s.refiner_calls;
  d["ms"] = s.ms;
  return d;
}

void raise_as(const char* error_type, const char* message) {
  py::object type = py::module_::import("flowturbo.errors").attr(error_type);
  PyErr_SetString(type.ptr(), message);
}

}  // namespace

PYBIND11_MODULE(_runner, m) {
  m.doc() = "flowturbo C++ schedule runner (libtorch): whole schedules from an export directory, no Python per step";
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const RunnerError& exc) {
      switch (exc.kind()) {
        case RunnerError::Kind::kCheckpoint: raise_as("CheckpointError", exc.what()); break;
        case RunnerError::Kind::kUnavailable: raise_as("FlowTurboError", exc.what()); break;
        default: raise_as("SamplingError", exc.what());
      }
    } catch (const flowturbo::ManifestError& exc) {
      raise_as("CheckpointError", exc.what());
    } catch (const flowturbo::ScheduleError& exc) {
      raise_as("ScheduleError", exc.what());
    }
  });

  m.def("build_info", [] {
    py::dict info;
    info["cuda"] = flowturbo::built_with_cuda();
    info["tensorrt"] = flowturbo::built_with_tensorrt();
    info["torch_version"] = std::string(FLOWTURBO_TORCH_VERSION);
    return info;
  });

  py::class_<ScheduleRunner>(m, "ScheduleRunner")
      .def(py::init([](const std::string& artifacts, const std::string& device, const std::string& format,
                       bool cuda_graph, bool verify_files, bool reuse_engine_buffers) {
             RunnerOptions options;
             options.device = device;
             options.format = format;
             options.cuda_graph = cuda_graph;
             options.verify_files = verify_files;
             options.reuse_engine_buffers = reuse_engine_buffers;
             py::gil_scoped_release release;
             return std::make_unique<ScheduleRunner>(artifacts, options);
           }),
           py::arg("artifacts"), py::arg("device") = "", py::arg("format") = "aoti", py::arg("cuda_graph") = true,
           py::arg("verify_files") = true, py::arg("reuse_engine_buffers") = false)
      .def_property_readonly("device", [](const ScheduleRunner& r) { return r.device().str(); })
      .def_property_readonly("schedule_json", [](const ScheduleRunner& r) { return r.manifest().schedule.describe_json(); })
      .def_property_readonly("schedule_id", [](const ScheduleRunner& r) { return r.manifest().schedule_id; })
      .def_property_readonly("variant", [](const ScheduleRunner& r) { return r.manifest().variant; })
      .def_property_readonly("precision", [](const ScheduleRunner& r) { return r.manifest().precision; })
      .def_property_readonly("num_classes", [](const ScheduleRunner& r) { return r.manifest().num_classes; })
      .def_property_readonly("latent_shape", [](const ScheduleRunner& r) { return r.manifest().latent_shape; })
      .def_property_readonly("batch_profile", [](const ScheduleRunner& r) {
        const auto& m = r.manifest();
        return std::vector<int64_t>{m.batch_min, m.batch_opt, m.batch_max};
      })
      .def_property_readonly("engines", &ScheduleRunner::engine_descriptions)
      .def_property_readonly("graph_fallback_reason", &ScheduleRunner::graph_fallback_reason)
      .def("make_noise",
           [](const ScheduleRunner& r, int64_t n, uint64_t seed, uint64_t first_index) {
             return to_capsule(r.make_noise(n, seed, first_index));
           },
           py::arg("n"), py::arg("seed"), py::arg("first_index") = 0,
           "x_0 for images first_index..first_index+n-1 as a DLPack capsule: image i from seed + i (the draw of "
           "flowturbo.noise.make_noise)")
      .def(
          "run_batch",
          [](ScheduleRunner& r, const py::object& noise, const py::object& labels, bool profile,
             const py::dict& conditioning) {
            at::Tensor noise_t = from_capsule(noise, "noise");
            at::Tensor labels_t = labels.is_none() ? at::Tensor() : from_capsule(labels, "labels");
            std::map<std::string, at::Tensor> inputs;
            for (const auto& item : conditioning) {
              const auto name = item.first.cast<std::string>();
              inputs[name] = from_capsule(py::reinterpret_borrow<py::object>(item.second), name.c_str());
            }
            flowturbo::BatchOutput out;
            {
              py::gil_scoped_release release;
              out = r.run_batch(noise_t, labels_t, inputs, profile);
            }
            py::dict d;
            d["images"] = to_capsule(out.images);
            d["latents"] = to_capsule(out.latents);
            d["sample_ms"] = out.sample_ms;
            d["decode_ms"] = out.decode_ms;
            d["total_ms"] = out.total_ms;
            d["graph_replayed"] = out.graph_replayed;
            py::list steps;
            for (const auto& s : out.steps) steps.append(step_dict(s));
            d["steps"] = steps;
            return d;
          },
          py::arg("noise"), py::arg("labels"), py::arg("profile") = false, py::arg("conditioning") = py::dict(),
          "One batch: noise (b,C,H,W) and labels (b,) as DLPack capsules (a text-to-image export: labels None and "
          "conditioning {input name: capsule} with its prompt embeddings) -> dict with images/latents capsules, "
          "sample_ms, decode_ms, total_ms, steps (when profiled) and graph_replayed");
}
