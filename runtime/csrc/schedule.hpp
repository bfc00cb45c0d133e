// The sampling schedule in C++: a 1:1 mirror of flowturbo/schedule.py (DESIGN.md §4).
//
// Parses the same notation ("H1P5R3", "HPPPPPRRR", "E8") and the same JSON, validates with the same
// rules and messages, and writes the byte-identical canonical JSON, so both sides compute the same id.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace flowturbo {

// A schedule that cannot be parsed or executed (maps to flowturbo.errors.ScheduleError in Python).
class ScheduleError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

enum class StepKind : char { Euler = 'E', Heun = 'H', Pseudo = 'P', Refiner = 'R' };

inline constexpr const char* kScheduleFormat = "flowturbo.schedule/1";
inline constexpr int kMaxSteps = 4096;

struct StepCalls {
  int predictor = 0;
  int refiner = 0;
};

struct Schedule {
  std::vector<StepKind> steps;
  std::vector<double> timesteps;  // N + 1 values, 0 .. 1, strictly increasing
  double guidance_scale = 1.0;
  std::optional<int> guidance_channels;  // nullopt: guide all channels

  // Build from notation with a uniform grid; throws ScheduleError.
  static Schedule parse(const std::string& spec, double guidance_scale = 1.0,
                        std::optional<int> guidance_channels = std::nullopt,
                        const std::optional<std::vector<double>>& timesteps = std::nullopt);
  // Inverse of describe_json() / canonical_json(); derived fields, when present, must agree.
  static Schedule from_json(const std::string& text);

  // Validates every field (the constructor path of the Python dataclass).
  void validate() const;

  int num_steps() const { return static_cast<int>(steps.size()); }
  std::string step_string() const;
  std::string notation() const;
  std::vector<StepCalls> step_calls() const;
  int predictor_calls() const;
  int refiner_calls() const;
  bool uses_refiner() const;
  // Mirror of flowturbo.integrator.carries_halves: the carried velocity is (B, 2C, H, W) per CFG half
  // (guidance on, only some of the C latent channels guided, R steps present).
  bool carries_halves(int latent_channels) const;

  std::string canonical_json() const;  // what the id hashes
  std::string id() const;              // first 16 hex digits of SHA-256(canonical_json)
  std::string describe_json() const;   // canonical content + notation, counts, id (sorted keys)
};

std::vector<StepKind> parse_steps(const std::string& spec);
std::vector<double> uniform_timesteps(int num_steps);
// Python's repr() of a float (shortest round-trip digits, Python's choice of fixed vs exponent form).
std::string python_float_repr(double value);

}  // namespace flowturbo
