#include "schedule.hpp"

#include "sha256.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace flowturbo {
namespace {

using json = nlohmann::json;

const char* kLetterHelp = "E (Euler), H (Heun), P (pseudo corrector), R (refiner)";

bool is_step_letter(char c) { return c == 'E' || c == 'H' || c == 'P' || c == 'R'; }

std::string strip(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  const auto begin = s.find_first_not_of(ws);
  if (begin == std::string::npos) return "";
  const auto end = s.find_last_not_of(ws);
  return s.substr(begin, end - begin + 1);
}

// Python's repr() of a str holding printable ASCII (enough for error messages about schedules).
std::string py_str_repr(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos;
  const bool has_double = s.find('"') != std::string::npos;
  const char quote = (has_single && !has_double) ? '"' : '\'';
  std::string out(1, quote);
  for (char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == quote) { out += '\\'; out += c; }
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else out += c;
  }
  out += quote;
  return out;
}

void validate_steps(const std::vector<StepKind>& steps) {
  bool carried = false;
  for (size_t index = 0; index < steps.size(); ++index) {
    if (steps[index] == StepKind::Refiner && !carried) {
      const std::string previous = index == 0 ? "it is the first step"
                                              : "the step before it is E (Euler), which carries none";
      throw ScheduleError("step " + std::to_string(index + 1) +
                          " is R (refiner) but no velocity is carried into it (" + previous +
                          "); a refiner step corrects the velocity carried from a preceding H or P step: "
                          "start with H or P, e.g. 'H1P5R3'");
    }
    carried = steps[index] != StepKind::Euler;
  }
}

std::string json_string(const std::string& s) { return json(s).dump(); }

}  // namespace

std::string python_float_repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  if (value == 0.0) return std::signbit(value) ? "-0.0" : "0.0";
  char buf[64];
  auto result = std::to_chars(buf, buf + sizeof(buf), value, std::chars_format::scientific);
  std::string sci(buf, result.ptr);  // "-d.ddde+XX", shortest round-trip digits
  std::string sign;
  if (sci[0] == '-') { sign = "-"; sci = sci.substr(1); }
  const auto e_pos = sci.find('e');
  std::string mantissa = sci.substr(0, e_pos);
  const int exponent = std::atoi(sci.c_str() + e_pos + 1);
  std::string digits;
  for (char c : mantissa) if (c != '.') digits += c;
  const int decpt = exponent + 1;  // value = 0.DIGITS * 10^decpt
  std::string out;
  if (decpt <= -4 || decpt > 16) {  // Python's float_repr_style 'r' rule
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp_buf[16];
    std::snprintf(exp_buf, sizeof(exp_buf), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += exp_buf;
  } else if (decpt <= 0) {
    out = "0." + std::string(-decpt, '0') + digits;
  } else if (static_cast<size_t>(decpt) >= digits.size()) {
    out = digits + std::string(decpt - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, decpt) + "." + digits.substr(decpt);
  }
  return sign + out;
}

std::vector<StepKind> parse_steps(const std::string& spec) {
  const std::string stripped = strip(spec);
  std::string text = stripped;
  for (auto& c : text) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (text.empty()) {
    throw ScheduleError("empty schedule spec: write step letters with optional counts, e.g. 'H1P5R3'");
  }
  std::vector<StepKind> steps;
  size_t pos = 0;
  while (pos < text.size()) {
    const char letter = text[pos];
    if (!is_step_letter(letter)) {
      throw ScheduleError("unknown step letter " + py_str_repr(std::string(1, stripped[pos])) + " at position " +
                          std::to_string(pos) + " of schedule " + py_str_repr(spec) + "; use " + kLetterHelp +
                          ", each optionally followed by a count, e.g. 'H1P5R3' or 'HPPPPPRRR'");
    }
    ++pos;
    const size_t start = pos;
    long long count = 0;
    while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) {
      if (count <= kMaxSteps) count = count * 10 + (text[pos] - '0');
      ++pos;
    }
    if (pos == start) count = 1;
    if (static_cast<long long>(steps.size()) + count > kMaxSteps) {
      throw ScheduleError("schedule " + py_str_repr(spec) + " has more than " + std::to_string(kMaxSteps) +
                          " steps");
    }
    steps.insert(steps.end(), static_cast<size_t>(count), static_cast<StepKind>(letter));
  }
  if (steps.empty()) {
    throw ScheduleError("schedule " + py_str_repr(spec) + " has zero steps; give at least one step, e.g. 'H8'");
  }
  return steps;
}

std::vector<double> uniform_timesteps(int num_steps) {
  if (num_steps < 1) {
    throw ScheduleError("a schedule needs at least one step, got " + std::to_string(num_steps));
  }
  std::vector<double> grid(num_steps + 1);
  for (int k = 0; k <= num_steps; ++k) grid[k] = static_cast<double>(k) / static_cast<double>(num_steps);
  return grid;
}

void Schedule::validate() const {
  if (steps.empty()) throw ScheduleError("a schedule needs at least one step");
  if (static_cast<int>(steps.size()) > kMaxSteps) {
    throw ScheduleError("a schedule has at most " + std::to_string(kMaxSteps) + " steps, got " +
                        std::to_string(steps.size()));
  }
  validate_steps(steps);
  const int n = num_steps();
  if (static_cast<int>(timesteps.size()) != n + 1) {
    throw ScheduleError("a schedule of " + std::to_string(n) + " steps needs " + std::to_string(n + 1) +
                        " timesteps (both ends included), got " + std::to_string(timesteps.size()));
  }
  for (double t : timesteps) {
    if (!std::isfinite(t)) throw ScheduleError("timesteps must be finite numbers");
  }
  if (timesteps.front() != 0.0 || timesteps.back() != 1.0) {
    throw ScheduleError("timesteps must start at 0 and end at 1 exactly, got " + python_float_repr(timesteps.front()) +
                        " ... " + python_float_repr(timesteps.back()));
  }
  for (int k = 0; k < n; ++k) {
    if (!(timesteps[k + 1] > timesteps[k])) {
      throw ScheduleError("timesteps must be strictly increasing: t[" + std::to_string(k) + "] = " +
                          python_float_repr(timesteps[k]) + " >= t[" + std::to_string(k + 1) + "] = " +
                          python_float_repr(timesteps[k + 1]));
    }
  }
  if (!std::isfinite(guidance_scale) || guidance_scale < 0) {
    throw ScheduleError("guidance_scale must be a finite number >= 0, got " + python_float_repr(guidance_scale));
  }
  if (guidance_channels && *guidance_channels < 1) {
    throw ScheduleError("guidance_channels must be a positive integer or None (all), got " +
                        std::to_string(*guidance_channels));
  }
}

Schedule Schedule::parse(const std::string& spec, double guidance_scale, std::optional<int> guidance_channels,
                         const std::optional<std::vector<double>>& timesteps) {
  Schedule schedule;
  schedule.steps = parse_steps(spec);
  schedule.timesteps = timesteps ? *timesteps : uniform_timesteps(schedule.num_steps());
  schedule.guidance_scale = guidance_scale;
  schedule.guidance_channels = guidance_channels;
  schedule.validate();
  return schedule;
}

std::string Schedule::step_string() const {
  std::string out;
  for (StepKind kind : steps) out += static_cast<char>(kind);
  return out;
}

std::string Schedule::notation() const {
  std::string out;
  size_t i = 0;
  while (i < steps.size()) {
    size_t j = i;
    while (j < steps.size() && steps[j] == steps[i]) ++j;
    out += static_cast<char>(steps[i]);
    out += std::to_string(j - i);
    i = j;
  }
  return out;
}

std::vector<StepCalls> Schedule::step_calls() const {
  std::vector<StepCalls> calls;
  bool carried = false;
  for (StepKind kind : steps) {
    switch (kind) {
      case StepKind::Euler: calls.push_back({1, 0}); break;
      case StepKind::Heun: calls.push_back({2, 0}); break;
      case StepKind::Pseudo: calls.push_back({carried ? 1 : 2, 0}); break;
      case StepKind::Refiner: calls.push_back({0, 2}); break;
    }
    carried = kind != StepKind::Euler;
  }
  return calls;
}

int Schedule::predictor_calls() const {
  int total = 0;
  for (const auto& c : step_calls()) total += c.predictor;
  return total;
}

int Schedule::refiner_calls() const {
  int total = 0;
  for (const auto& c : step_calls()) total += c.refiner;
  return total;
}

bool Schedule::uses_refiner() const {
  for (StepKind kind : steps) if (kind == StepKind::Refiner) return true;
  return false;
}

bool Schedule::carries_halves(int latent_channels) const {
  return guidance_scale != 1.0 && guidance_channels.has_value() && *guidance_channels < latent_channels &&
         uses_refiner();
}

std::string Schedule::canonical_json() const {
  // Keys sorted, no whitespace, floats as Python repr: identical to json.dumps(sort_keys=True,
  // separators=(",", ":")) in flowturbo/schedule.py.
  std::ostringstream out;
  out << "{\"format\":" << json_string(kScheduleFormat) << ",\"guidance_channels\":"
      << (guidance_channels ? std::to_string(*guidance_channels) : std::string("null"))
      << ",\"guidance_scale\":" << python_float_repr(guidance_scale) << ",\"steps\":" << json_string(step_string())
      << ",\"timesteps\":[";
  for (size_t k = 0; k < timesteps.size(); ++k) out << (k ? "," : "") << python_float_repr(timesteps[k]);
  out << "]}";
  return out.str();
}

std::string Schedule::id() const { return sha256_hex(canonical_json()).substr(0, 16); }

std::string Schedule::describe_json() const {
  // Same key order and separators as json.dumps(describe(), sort_keys=True) in Python (", " and ": ").
  std::ostringstream out;
  out << "{\"format\": " << json_string(kScheduleFormat) << ", \"guidance_channels\": "
      << (guidance_channels ? std::to_string(*guidance_channels) : std::string("null"))
      << ", \"guidance_scale\": " << python_float_repr(guidance_scale) << ", \"id\": " << json_string(id())
      << ", \"notation\": " << json_string(notation()) << ", \"num_steps\": " << num_steps()
      << ", \"predictor_calls\": " << predictor_calls() << ", \"refiner_calls\": " << refiner_calls()
      << ", \"steps\": " << json_string(step_string()) << ", \"timesteps\": [";
  for (size_t k = 0; k < timesteps.size(); ++k) out << (k ? ", " : "") << python_float_repr(timesteps[k]);
  out << "]}";
  return out.str();
}

Schedule Schedule::from_json(const std::string& text) {
  json data;
  try {
    data = json::parse(text);
  } catch (const json::parse_error& exc) {
    throw ScheduleError(std::string("schedule JSON does not parse: ") + exc.what());
  }
  if (!data.is_object()) throw ScheduleError("a schedule JSON must be an object");
  if (data.contains("format") && data["format"] != kScheduleFormat) {
    throw ScheduleError("unsupported schedule format " + data["format"].dump() + "; this flowturbo reads '" +
                        kScheduleFormat + "'");
  }
  static const std::set<std::string> known = {"format", "steps", "timesteps", "guidance_scale",
                                              "guidance_channels", "notation", "num_steps",
                                              "predictor_calls", "refiner_calls", "id"};
  std::vector<std::string> unknown;
  for (auto it = data.begin(); it != data.end(); ++it) {
    if (!known.count(it.key())) unknown.push_back(it.key());
  }
  if (!unknown.empty()) {
    std::string list;
    for (size_t i = 0; i < unknown.size(); ++i) list += (i ? ", " : "") + py_str_repr(unknown[i]);
    throw ScheduleError("unknown keys in schedule JSON: [" + list + "]");
  }
  if (!data.contains("steps")) throw ScheduleError("schedule JSON has no 'steps'");
  if (!data["steps"].is_string()) {
    throw ScheduleError("schedule spec must be a string like 'H1P5R3'");
  }
  Schedule schedule;
  schedule.steps = parse_steps(data["steps"].get<std::string>());
  if (data.contains("timesteps") && !data["timesteps"].is_null()) {
    if (!data["timesteps"].is_array()) throw ScheduleError("timesteps must be a sequence of numbers");
    for (const auto& t : data["timesteps"]) {
      if (!t.is_number()) throw ScheduleError("timesteps must be a sequence of numbers");
      schedule.timesteps.push_back(t.get<double>());
    }
  } else {
    schedule.timesteps = uniform_timesteps(schedule.num_steps());
  }
  if (data.contains("guidance_scale")) {
    if (!data["guidance_scale"].is_number()) {
      throw ScheduleError("guidance_scale must be a finite number >= 0, got " + data["guidance_scale"].dump());
    }
    schedule.guidance_scale = data["guidance_scale"].get<double>();
  }
  if (data.contains("guidance_channels") && !data["guidance_channels"].is_null()) {
    const auto& c = data["guidance_channels"];
    if (!c.is_number_integer()) {
      throw ScheduleError("guidance_channels must be a positive integer or None (all), got " + c.dump());
    }
    schedule.guidance_channels = c.get<int>();
  }
  schedule.validate();
  const auto check = [&](const char* key, const json& derived) {
    if (data.contains(key) && data[key] != derived) {
      throw ScheduleError(std::string("schedule JSON says ") + key + "=" + data[key].dump() +
                          " but its steps/timesteps give " + derived.dump() +
                          "; the file was edited inconsistently");
    }
  };
  check("notation", schedule.notation());
  check("num_steps", schedule.num_steps());
  check("predictor_calls", schedule.predictor_calls());
  check("refiner_calls", schedule.refiner_calls());
  check("id", schedule.id());
  return schedule;
}

}  // namespace flowturbo
