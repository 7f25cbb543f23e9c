#pragma once
// Error messages of the native kernels, built without iostreams: LASS_CHECK(cond, parts...) is
// TORCH_CHECK with the message concatenated here (numbers by std::to_string / snprintf, dtypes by
// name, sizes as "[a, b]"), so TORCH_CHECK receives one string and formats nothing. Seen on the
// lent GPU machine (torch 2.11, gcc 13): an extension built there segfaulted inside
// std::ostream::operator<<(long) while wording a TORCH_CHECK, so no number may go through an
// ostream in our code.
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace lass_sparse_entry {
namespace msg {
inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, char v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void put(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }
inline void put(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void put(std::string& s, T v) {
  s += std::to_string(v);
}
template <class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
void put(std::string& s, T v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  s += buf;
}
}  // namespace msg

template <class... Args>
std::string cat(const Args&... args) {
  std::string s;
  (msg::put(s, args), ...);
  return s;
}
}  // namespace lass_sparse_entry

#define LASS_CHECK(cond, ...) TORCH_CHECK(cond, ::lass_sparse_entry::cat(__VA_ARGS__))
