#pragma once
#include <cstdint>

namespace lass_sparse_cpu {
inline int64_t num_words(int64_t k) { return (k + 31) / 32; }
}  // namespace lass_sparse_cpu
