// SHA-256 as lower-case hex (OpenSSL): of a string (schedule ids) and of a file's bytes (artifact checksums).
#pragma once

#include <string>

namespace flowturbo {

std::string sha256_hex(const std::string& data);
std::string sha256_file(const std::string& path);  // throws std::runtime_error when the file cannot be read

}  // namespace flowturbo
