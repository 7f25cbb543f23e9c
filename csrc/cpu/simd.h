// Masked row primitives shared by the CPU kernels: copy / accumulate a run of weights whose
// packed mask words start at a word boundary. AVX-512 paths turn each mask word straight into
// lane masks (masked loads), chosen at run time; the portable loops are the fallback.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace lass_sparse_cpu {

// LASS_SPARSE_CPU_SIMD=0 forces the portable loops (tests compare the two paths bit for bit).
inline bool has_avx512() {
  static const bool ok = [] {
    const char* env = std::getenv("LASS_SPARSE_CPU_SIMD");
    if (env && env[0] == '0') return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  }();
  return ok;
}

// Mask word `w` of a run of `count` elements: bits past the run are cleared, so a malformed
// padding bit can never cause an out-of-bounds read.
inline uint32_t run_word(const int32_t* words, int64_t w, int64_t count) {
  uint32_t word = static_cast<uint32_t>(words[w]);
  const int64_t rem = count - w * 32;
  if (rem < 32) word &= (rem <= 0) ? 0u : ((1u << rem) - 1u);
  return word;
}

// permutex2var_epi16 indices that interleave two rows a, b of 32 bf16 into (a[j], b[j]) pairs:
// kPairLo for columns 0-15 (lane 2j <- a[j], 2j + 1 <- b[j]), kPairHi for columns 16-31 (the
// layout vdpbf16ps reduces over).
alignas(64) inline constexpr uint16_t kPairLo[32] = {
    0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) inline constexpr uint16_t kPairHi[32] = {
    16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

inline uint32_t valid_lanes(int64_t w, int64_t count) {
  const int64_t rem = count - w * 32;
  return rem >= 32 ? 0xFFFFFFFFu : ((1u << rem) - 1u);
}

template <typename T>
inline void masked_copy_generic(const T* src, const int32_t* words, int64_t count, T* dst) {
  const int64_t nw = num_words(count);
  for (int64_t w = 0; w < nw; ++w) {
    const uint32_t word = run_word(words, w, count);
    const int64_t lo = w * 32, n = std::min<int64_t>(32, count - lo);
    for (int64_t j = 0; j < n; ++j) dst[lo + j] = ((word >> j) & 1u) ? src[lo + j] : T(0);
  }
}

__attribute__((target("avx512f,avx512bw"))) inline void masked_copy_avx512(
    const float* src, const int32_t* words, int64_t count, float* dst) {
  const int64_t nw = num_words(count);
  for (int64_t w = 0; w < nw; ++w) {
    const uint32_t word = run_word(words, w, count), valid = valid_lanes(w, count);
    const float* s = src + w * 32;
    float* d = dst + w * 32;
    __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(word), s);
    __m512 b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(word >> 16), s + 16);
    _mm512_mask_storeu_ps(d, static_cast<__mmask16>(valid), a);
    _mm512_mask_storeu_ps(d + 16, static_cast<__mmask16>(valid >> 16), b);
  }
}

__attribute__((target("avx512f,avx512bw"))) inline void masked_copy_avx512(
    const c10::BFloat16* src, const int32_t* words, int64_t count, c10::BFloat16* dst) {
  const int64_t nw = num_words(count);
  for (int64_t w = 0; w < nw; ++w) {
    const uint32_t word = run_word(words, w, count), valid = valid_lanes(w, count);
    __m512i a = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(word), src + w * 32);
    _mm512_mask_storeu_epi16(dst + w * 32, static_cast<__mmask32>(valid), a);
  }
}

// dst[i] = mask[i] ? src[i] : 0 for i < count (src may equal dst).
template <typename T>
inline void masked_copy(const T* src, const int32_t* words, int64_t count, T* dst) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (has_avx512()) return masked_copy_avx512(src, words, count, dst);
  }
  masked_copy_generic(src, words, count, dst);
}

// dst[i] += mask[i] ? src[i] : 0 for i < count.
template <typename S, typename D>
inline void masked_add_generic(const S* src, const int32_t* words, int64_t count, D* dst) {
  const int64_t nw = num_words(count);
  for (int64_t w = 0; w < nw; ++w) {
    const uint32_t word = run_word(words, w, count);
    const int64_t lo = w * 32, n = std::min<int64_t>(32, count - lo);
    for (int64_t j = 0; j < n; ++j)
      dst[lo + j] = static_cast<D>(static_cast<float>(dst[lo + j]) +
                                   (((word >> j) & 1u) ? static_cast<float>(src[lo + j]) : 0.f));
  }
}

template <>
inline void masked_add_generic<double, double>(const double* src, const int32_t* words,
                                               int64_t count, double* dst) {
  const int64_t nw = num_words(count);
  for (int64_t w = 0; w < nw; ++w) {
    const uint32_t word = run_word(words, w, count);
    const int64_t lo = w * 32, n = std::min<int64_t>(32, count - lo);
    for (int64_t j = 0; j < n; ++j) dst[lo + j] += ((word >> j) & 1u) ? src[lo + j] : 0.0;
  }
}

__attribute__((target("avx512f,avx512bw"))) inline void masked_add_avx512(
    const float* src, const int32_t* words, int64_t count, float* dst) {
  const int64_t nw = num_words(count);
  for (int64_t w = 0; w < nw; ++w) {
    const uint32_t word = run_word(words, w, count);
    const float* s = src + w * 32;
    float* d = dst + w * 32;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // lanes past count are off in `word`: never read or written
      const auto lanes = static_cast<__mmask16>(word >> (16 * h));
      const __m512 a = _mm512_maskz_loadu_ps(lanes, s + 16 * h);
      _mm512_mask_storeu_ps(d + 16 * h, lanes,
                            _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, d + 16 * h), a));
    }
  }
}

// dst[i] += mask[i] ? src[i] : 0 for i < count.
template <typename S, typename D>
inline void masked_add(const S* src, const int32_t* words, int64_t count, D* dst) {
  if constexpr (std::is_same_v<S, float> && std::is_same_v<D, float>) {
    if (has_avx512()) return masked_add_avx512(src, words, count, dst);
  }
  masked_add_generic(src, words, count, dst);
}

}  // namespace lass_sparse_cpu
