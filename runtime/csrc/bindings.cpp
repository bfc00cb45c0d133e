// The one bindings file of flowturbo._C.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "schedule.hpp"

namespace py = pybind11;
using flowturbo::Schedule;

PYBIND11_MODULE(_C, m) {
  m.doc() = "flowturbo C++ extension: the schedule struct (and, when built with libtorch, the runner)";
  // C++ schedule errors surface as flowturbo.errors.ScheduleError, the same type Python raises.
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const flowturbo::ScheduleError& exc) {
      py::object schedule_error = py::module_::import("flowturbo.errors").attr("ScheduleError");
      PyErr_SetString(schedule_error.ptr(), exc.what());
    }
  });

  py::class_<Schedule>(m, "Schedule", "C++ mirror of flowturbo.schedule.SamplingSchedule")
      .def_static("parse", &Schedule::parse, py::arg("spec"), py::arg("guidance_scale") = 1.0,
                  py::arg("guidance_channels") = py::none(), py::arg("timesteps") = py::none())
      .def_static("from_json", &Schedule::from_json, py::arg("text"))
      .def_property_readonly("step_string", &Schedule::step_string)
      .def_property_readonly("notation", &Schedule::notation)
      .def_property_readonly("num_steps", &Schedule::num_steps)
      .def_property_readonly("timesteps", [](const Schedule& s) { return s.timesteps; })
      .def_property_readonly("guidance_scale", [](const Schedule& s) { return s.guidance_scale; })
      .def_property_readonly("guidance_channels", [](const Schedule& s) { return s.guidance_channels; })
      .def_property_readonly("predictor_calls", &Schedule::predictor_calls)
      .def_property_readonly("refiner_calls", &Schedule::refiner_calls)
      .def_property_readonly("id", &Schedule::id)
      .def("step_calls",
           [](const Schedule& s) {
             std::vector<std::pair<int, int>> out;
             for (const auto& c : s.step_calls()) out.emplace_back(c.predictor, c.refiner);
             return out;
           })
      .def("canonical_json", &Schedule::canonical_json)
      .def("describe_json", &Schedule::describe_json);
  m.def("python_float_repr", &flowturbo::python_float_repr, py::arg("value"));
}
