// bf16 masked GEMMs on AMX tiles (Intel AMX-BF16: Sapphire Rapids and later). There oneDNN runs
// dense bf16 GEMMs on the tiles, and the AVX512-BF16 kernels (gemv.cpp, dx_bf16dp.cpp,
// panel_bf16.cpp) took 2-5x dense at 16-64 rows. Each kernel stages W ⊙ M one strip at a time,
// decoded and laid out as a tile operand in a cache-resident buffer (never W's size), and
// multiplies with TDPBF16PS (fp32 accumulation):
//   forward  y  = x (W ⊙ M)ᵀ: C[m, n] += x[m, k] B[k, n]; B = strips of 32 rows of W ⊙ M, each
//            16x16 block of (k, k+1) pairs transposed (VNNI layout), packed again when a
//            segment's pair changes (the segmented forward); x read in place (or zero-padded).
//   dx       dx = dy (W ⊙ M): C[m, k] += dy[m, n] B[n, k]; B = a row block of a column chunk of
//            W ⊙ M (each row read in one run), rows n and n+1 interleaved (permutex2var); the
//            fp32 sums kept in an L2-sized buffer between row blocks.
//   dW       dW = (dyᵀ x) ⊙ M: C[n, k] += dyᵀ[n, m] B[m, k]; dyᵀ and x packed once (each
//            segment's rows from a 32-row boundary); the mask applied as each 32x32 block is
//            stored (off-mask exactly 0), added under it to an fp32 gradient (accumulate), or,
//            for several segments, each one's block added under its pair's mask into an fp32
//            sum stored once.
// Tiles: 8 registers of 16 rows x 64 bytes; C in 0-3 (2x2 blocks of 16x16 fp32), A in 4-5, B in
// 6-7. Each worker thread loads the tile configuration for its chunk and releases it after.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

// AMX intrinsics need GCC 11 / clang 12 on x86-64 Linux (arch_prctl); elsewhere, or with
// -DLASS_SPARSE_NO_AMX, the entry points below are stubs: has_amx_bf16() is false and the other
// families serve every call.
#if defined(__x86_64__) && defined(__linux__) && !defined(LASS_SPARSE_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) ||                        \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define LASS_AMX_BUILD 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define LASS_AMX_BUILD 0
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "linear.h"

#define LASS_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace lass_sparse_cpu {

int64_t amx_min_rows() {
  static const int64_t v = env_int("LASS_SPARSE_CPU_AMX_MIN_M", 5);
  return v;
}

int64_t amx_max_rows() {
  static const int64_t v = env_int("LASS_SPARSE_CPU_AMX_MAX_M", 512);
  return v;
}

#if LASS_AMX_BUILD
bool has_amx_bf16() {
  const char* env = std::getenv("LASS_SPARSE_CPU_AMX");  // read per call: tests switch it
  if (env && env[0] == '0') return false;
  static const bool ok = [] {
    if (!has_avx512_bf16()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    unsigned lo = 0, hi = 0;  // the OS saves tile state (XCR0 bits 17, 18) ...
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    // ... and lets this process use it (Linux: ARCH_REQ_XCOMP_PERM for XTILEDATA)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

namespace {
using bf16 = c10::BFloat16;
constexpr int64_t kStrip = 32;  // rows (forward) or columns (dx) of W ⊙ M staged per B strip

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tile configuration (8 tiles of 16 rows x 64 bytes) in this thread for a scope.
struct Tiles {
  LASS_AMX Tiles() {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
  }
  LASS_AMX ~Tiles() { _tile_release(); }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

// A 64-byte aligned scratch buffer of `n` elements.
template <typename T>
struct Scratch {
  explicit Scratch(int64_t n)
      : p(static_cast<T*>(std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64))) {
    LASS_CHECK(p != nullptr, "amx: out of memory for a ", n * sizeof(T), "-byte tile buffer");
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* p;
};

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Strips packed together (B tiles of `strip_bytes` each): up to ~1 MB of B in L2 (each group
// passes over all of the activations once, so fewer, larger groups read them less often), at
// most 8, and at least one group per thread.
inline int64_t group_size(int64_t strips, int64_t strip_bytes) {
  static const int64_t budget = env_int("LASS_SPARSE_CPU_AMX_B_KB", 1024) * 1024;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t g = std::clamp<int64_t>(budget / std::max<int64_t>(strip_bytes, 1), 1, 8);
  return std::max<int64_t>(1, std::min(g, (strips + threads - 1) / threads));
}

// r[i] (16 rows of 16 dwords) <- its transpose.
LASS_AMX inline void transpose16(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // r[4i + e], lane l: rows 4i..4i+3 of column 4l + e
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {  // 4x4 transpose of 128-bit lanes across r[e], r[4+e], ...
    const __m512i v0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xDD);
    t[e] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + e] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[8 + e] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[12 + e] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// 32 bf16 of row `row` of W ⊙ M from column 32 kb (zeros past K or for rows past N).
LASS_AMX inline __m512i masked_row32(const bf16* w, const int32_t* bits, int64_t n, int64_t k,
                                     int64_t row, int64_t kb) {
  if (row >= n) return _mm512_setzero_si512();
  const uint32_t word = run_word(bits + row * num_words(k), kb, k);
  return _mm512_maskz_loadu_epi16(static_cast<__mmask32>(word), w + row * k + kb * 32);
}

// Rows of `a` [rows, cols] (row stride lda) as a [rows_p, cols_p] zero-padded copy, or `a`
// itself when it is already that shape.
const bf16* padded(const bf16* a, int64_t rows, int64_t cols, int64_t rows_p, int64_t cols_p,
                   std::unique_ptr<Scratch<bf16>>& keep) {
  if (rows == rows_p && cols == cols_p) return a;
  keep = std::make_unique<Scratch<bf16>>(rows_p * cols_p);
  bf16* out = keep->p;
  std::memset(static_cast<void*>(out), 0, rows_p * cols_p * sizeof(bf16));
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(static_cast<void*>(out + r * cols_p), a + r * cols, cols * sizeof(bf16));
  return out;
}

// 16 fp32 -> bf16 (nearest even) stored at `dst` on `lanes`.
LASS_AMX inline void store_bf16(bf16* dst, __mmask16 lanes, __m512 v) {
  _mm256_mask_storeu_epi16(dst, lanes, (__m256i)_mm512_cvtneps_pbh(v));
}

inline __mmask16 lanes16(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1u);
}

// One 32-wide reduction step of the 2x2 block: C0, C1 += A0 · (B0, B1); with `two` also
// C2, C3 += A1 · (B0, B1). A rows lda bytes apart; B0 at b, B1 at b + 256 (dense 1 KB tiles).
LASS_AMX inline void step_2x2(const bf16* a0, const bf16* a1, int64_t lda, const uint32_t* b,
                              bool two) {
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b + 256, 64);
  _tile_loadd(4, a0, lda);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  if (two) {
    _tile_loadd(5, a1, lda);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// ---- forward

// B tiles of W rows [n0, n0 + 32), every k-block: buf[(kb * 2 + h) * 256 + kk * 16 + j] is the
// (k = 32 kb + 2 kk, k + 1) pair of row n0 + 16 h + j of W ⊙ M.
LASS_AMX void pack_rows_vnni(const bf16* w, const int32_t* bits, int64_t n, int64_t k, int64_t n0,
                             int64_t kblocks, uint32_t* buf) {
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    for (int h = 0; h < 2; ++h) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) r[j] = masked_row32(w, bits, n, k, n0 + 16 * h + j, kb);
      transpose16(r);
      uint32_t* out = buf + (kb * 2 + h) * 256;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) _mm512_store_si512(out + 16 * j, r[j]);
    }
  }
}

struct FwdArgs {
  const bf16* xa;  // x, [>= rows of the last block, kp] (zero-padded where needed)
  const bf16* w;
  const int32_t* bits;  // pair p's mask at bits + p * bank_stride
  int64_t bank_stride;
  const int64_t* offs;  // segment s: rows [offs[s], offs[s + 1]) of x, pair pid[s]
  const int64_t* pid;
  int64_t segs;
  const bf16* bias;  // or nullptr
  bf16* y;
  int64_t n, k, kp, kblocks, group;
};

// Groups [g0, g1) of `group` strips of W's rows (32 rows a strip) for every row of x: a group's
// B tiles are packed (under a segment's mask, again when the pair changes) and stay in L2 while
// every pair of 16-row blocks of the segment passes.
LASS_AMX void forward_strips(const FwdArgs& a, int64_t g0, int64_t g1) {
  const bf16* xa = a.xa;
  const bf16* bias_p = a.bias;
  bf16* yp = a.y;
  const int64_t n = a.n, k = a.k, kp = a.kp, kblocks = a.kblocks;
  const int64_t lda = kp * 2;  // bytes
  Tiles tiles;
  Scratch<uint32_t> buf(a.group * kblocks * 512);
  alignas(64) float c[4][16][16];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t strips = std::min(a.group, (n - g * a.group * kStrip + kStrip - 1) / kStrip);
    int64_t packed = -1;  // the pair whose mask buf holds
    for (int64_t s = 0; s < a.segs; ++s) {
      const int64_t lo = a.offs[s], hi = a.offs[s + 1];
      if (lo == hi) continue;
      if (a.pid[s] != packed) {
        for (int64_t j = 0; j < strips; ++j)
          pack_rows_vnni(a.w, a.bits + a.pid[s] * a.bank_stride, n, k,
                         (g * a.group + j) * kStrip, kblocks, buf.p + j * kblocks * 512);
        packed = a.pid[s];
      }
      for (int64_t r0 = lo; r0 < hi; r0 += 32)
        for (int64_t j = 0; j < strips; ++j) {
          const int64_t n0 = (g * a.group + j) * kStrip;
          const uint32_t* bj = buf.p + j * kblocks * 512;
          const bool two = r0 + 16 < hi;
          const bf16* a0 = xa + r0 * kp;
          const bf16* a1 = a0 + 16 * kp;
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t kb = 0; kb < kblocks; ++kb)
            step_2x2(a0 + kb * 32, a1 + kb * 32, lda, bj + kb * 512, two);
          _tile_stored(0, c[0], 64);
          _tile_stored(1, c[1], 64);
          _tile_stored(2, c[2], 64);
          _tile_stored(3, c[3], 64);
          for (int t = 0; t < (two ? 2 : 1); ++t)
            for (int h = 0; h < 2; ++h) {
              const int64_t col = n0 + 16 * h;
              const __mmask16 lanes = lanes16(n - col);
              if (!lanes) continue;
              const __m512 b =
                  bias_p ? _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, bias_p + col)),
                               16))
                         : _mm512_setzero_ps();
              for (int i = 0; i < 16; ++i) {  // rows of this segment only
                const int64_t row = r0 + 16 * t + i;
                if (row >= hi) break;
                store_bf16(yp + row * n + col, lanes,
                           _mm512_add_ps(_mm512_load_ps(c[2 * t + h][i]), b));
              }
            }
        }
    }
  }
}

void forward_impl(const at::Tensor& x, const at::Tensor& w, const int32_t* bits,
                  int64_t bank_stride, const int64_t* offs, const int64_t* pid, int64_t segs,
                  const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const int64_t kp = round_up(k, 32);
  // a block of 16 rows may start anywhere in a segment and read past it: zero rows up to there
  int64_t rows = 0, longest = 0;
  for (int64_t s = 0; s < segs; ++s) {
    if (offs[s] == offs[s + 1]) continue;
    rows = std::max(rows, offs[s] + round_up(offs[s + 1] - offs[s], 16));
    longest = std::max(longest, offs[s + 1] - offs[s]);
  }
  std::unique_ptr<Scratch<bf16>> keep;
  const int64_t strips = (n + kStrip - 1) / kStrip;
  // one pair of 16-row blocks per segment: B is used once, so one strip at a time (L1/L2-hot)
  const int64_t group = longest <= 32 ? 1 : group_size(strips, kp * 64);
  const FwdArgs a{padded(x.data_ptr<bf16>(), m, k, std::max(rows, m), kp, keep),
                  w.data_ptr<bf16>(), bits, bank_stride, offs, pid, segs,
                  bias.has_value() ? bias->data_ptr<bf16>() : nullptr, y.data_ptr<bf16>(), n, k,
                  kp, kp / 32, group};
  at::parallel_for(0, (strips + group - 1) / group, 1,
                   [&](int64_t g0, int64_t g1) { forward_strips(a, g0, g1); });
}

// ---- dx

// B tiles of rows [r0, r0 + 32 nblocks) x columns [c0, c0 + 32 strips) of W ⊙ M: strip j, n-block
// nb at buf + (j * nblocks + nb) * 512; dword p * 16 + i of half h there is the (row, row + 1)
// pair (row = r0 + 32 nb + 2 p) of column c0 + 32 j + 16 h + i. Each row is read in one run.
LASS_AMX void pack_cols_vnni(const bf16* w, const int32_t* bits, int64_t n, int64_t k, int64_t r0,
                             int64_t nblocks, int64_t c0, int64_t strips, uint32_t* buf) {
  const __m512i lo_idx = _mm512_load_si512(kPairLo), hi_idx = _mm512_load_si512(kPairHi);
  for (int64_t nb = 0; nb < nblocks; ++nb)
    for (int p = 0; p < 16; ++p) {
      const int64_t row = r0 + nb * 32 + 2 * p;
      for (int64_t j = 0; j < strips; ++j) {
        uint32_t* out = buf + (j * nblocks + nb) * 512;
        const __m512i a = masked_row32(w, bits, n, k, row, c0 / 32 + j);
        const __m512i b = masked_row32(w, bits, n, k, row + 1, c0 / 32 + j);
        _mm512_store_si512(out + p * 16, _mm512_permutex2var_epi16(a, lo_idx, b));
        _mm512_store_si512(out + 256 + p * 16, _mm512_permutex2var_epi16(a, hi_idx, b));
      }
    }
}

struct DxArgs {
  const bf16* da;  // dy, [mp, np] (zero-padded where needed)
  const bf16* w;
  const int32_t* bits;
  bf16* dx;
  int64_t m, n, k, np, mp, cols, rblocks;  // cols: per chunk; rblocks: 32-row blocks per pass
};

// Columns [32 strip0, ...) of dx, `a.cols` at a time per chunk [q0, q1): W ⊙ M is read in row
// blocks (each row of the chunk in one run), packed as B tiles in L2, and every pair of 16-row
// blocks of dy passes over it; the fp32 sums live in `acc` between row blocks.
LASS_AMX void dx_chunks(const DxArgs& a, int64_t q0, int64_t q1) {
  const int64_t m = a.m, n = a.n, k = a.k, np = a.np, mp = a.mp;
  const int64_t lda = np * 2;
  Tiles tiles;
  Scratch<uint32_t> buf(a.rblocks * (a.cols / 32) * 512);
  Scratch<float> acc(mp * a.cols);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t c0 = q * a.cols, cw = std::min(a.cols, round_up(k, 32) - c0), strips = cw / 32;
    const int64_t ldc = cw * 4;
    std::memset(acc.p, 0, mp * cw * sizeof(float));
    for (int64_t r0 = 0; r0 < np; r0 += a.rblocks * 32) {
      const int64_t nblocks = std::min(a.rblocks, (np - r0) / 32);
      pack_cols_vnni(a.w, a.bits, n, k, r0, nblocks, c0, strips, buf.p);
      for (int64_t mb = 0; mb < mp / 16; mb += 2) {
        const bool two = mb + 1 < mp / 16;
        const bf16* a0 = a.da + mb * 16 * np + r0;
        const bf16* a1 = a0 + 16 * np;
        for (int64_t j = 0; j < strips; ++j) {
          float* c0p = acc.p + mb * 16 * cw + 32 * j;
          float* c1p = c0p + 16 * cw;
          const uint32_t* bj = buf.p + j * nblocks * 512;
          _tile_loadd(0, c0p, ldc);
          _tile_loadd(1, c0p + 16, ldc);
          if (two) {
            _tile_loadd(2, c1p, ldc);
            _tile_loadd(3, c1p + 16, ldc);
          }
          for (int64_t nb = 0; nb < nblocks; ++nb)
            step_2x2(a0 + nb * 32, a1 + nb * 32, lda, bj + nb * 512, two);
          _tile_stored(0, c0p, ldc);
          _tile_stored(1, c0p + 16, ldc);
          if (two) {
            _tile_stored(2, c1p, ldc);
            _tile_stored(3, c1p + 16, ldc);
          }
        }
      }
    }
    for (int64_t row = 0; row < m; ++row)
      for (int64_t col = 0; col < cw; col += 16)
        store_bf16(a.dx + row * k + c0 + col, lanes16(k - c0 - col),
                   _mm512_loadu_ps(acc.p + row * cw + col));
  }
}

void dx_impl(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits, at::Tensor& dx) {
  const int64_t m = dy.size(0), n = w.size(0), k = w.size(1);
  const int64_t np = round_up(n, 32), mp = round_up(m, 16), kp = round_up(k, 32);
  std::unique_ptr<Scratch<bf16>> keep;
  // column chunks: one per thread, at least 256 columns (long runs of each row of W), at most
  // 1024, and ~512 KB of fp32 sums (they stay in L2); row blocks: ~512 KB of B tiles
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t most = std::clamp<int64_t>((512 * 1024) / (mp * 4) / 32 * 32, 256, 1024);
  const int64_t cols =
      std::min(kp, std::clamp<int64_t>(round_up((kp + threads - 1) / threads, 32), 256, most));
  const int64_t rblocks = std::clamp<int64_t>((512 * 1024) / (cols * 64), 1, np / 32);
  const DxArgs a{padded(dy.data_ptr<bf16>(), m, n, mp, np, keep), w.data_ptr<bf16>(),
                 bits.data_ptr<int32_t>(), dx.data_ptr<bf16>(), m, n, k, np, mp, cols,
                 rblocks};
  at::parallel_for(0, (kp + cols - 1) / cols, 1,
                   [&](int64_t q0, int64_t q1) { dx_chunks(a, q0, q1); });
}

// ---- dW

// Segments of rows laid out from `align`-row boundaries (a tile never mixes two segments):
// segment s at base[s], rows past its end zero; `rows` in all.
struct Layout {
  std::vector<int64_t> base;
  int64_t rows = 0;
  bool identity = false;  // one segment at row 0: the rows as they are
  int64_t only = 0;  // with `identity`: that segment
};

Layout layout(const int64_t* offs, int64_t segs, int64_t align) {
  Layout l;
  l.base.resize(segs);
  int64_t nonempty = 0;
  for (int64_t s = 0; s < segs; ++s) {
    l.base[s] = l.rows;
    const int64_t len = offs[s + 1] - offs[s];
    l.rows += round_up(len, align);
    if (len > 0 && nonempty++ == 0) l.only = s;
  }
  l.identity = nonempty <= 1;
  if (l.identity) std::fill(l.base.begin(), l.base.end(), 0);  // the rows stay where they are
  if (l.identity) l.rows = round_up(offs[segs], align);
  return l;
}

// a [rows, cols] bf16 -> [ceil(rows / 2), cols_p] dwords: (a[2p][c], a[2p + 1][c]) for pairs
// [p0, p1) (zeros past the rows and columns).
LASS_AMX void pack_row_pairs(const bf16* a, int64_t rows, int64_t cols, int64_t cols_p,
                             uint32_t* out, int64_t p0, int64_t p1) {
  const __m512i lo_idx = _mm512_load_si512(kPairLo), hi_idx = _mm512_load_si512(kPairHi);
  for (int64_t p = p0; p < p1; ++p) {
    const bf16* r0 = a + 2 * p * cols;
    const bf16* r1 = 2 * p + 1 < rows ? r0 + cols : nullptr;
    for (int64_t c0 = 0; c0 < cols_p; c0 += 32) {
      const __mmask32 valid =
          cols - c0 >= 32 ? ~__mmask32(0)
                          : static_cast<__mmask32>((1ull << std::max<int64_t>(cols - c0, 0)) - 1);
      const __m512i x0 = _mm512_maskz_loadu_epi16(valid, r0 + c0);
      const __m512i x1 = r1 ? _mm512_maskz_loadu_epi16(valid, r1 + c0) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + p * cols_p + c0, _mm512_permutex2var_epi16(x0, lo_idx, x1));
      _mm512_storeu_si512(out + p * cols_p + c0 + 16, _mm512_permutex2var_epi16(x0, hi_idx, x1));
    }
  }
}

// dyᵀ as A tiles: [np, mp] bf16, row r = column r of dy (zeros past M and N). From dy's row
// pairs (pack_row_pairs: [mp / 2, np] dwords), each 16x16 dword block transposed; columns
// [c_lo, c_hi) of dy (multiples of 16).
LASS_AMX void pack_transposed(const uint32_t* pairs, int64_t mp, int64_t np, uint32_t* out,
                              int64_t c_lo, int64_t c_hi) {
  for (int64_t p0 = 0; p0 < mp / 2; p0 += 16)
    for (int64_t c0 = c_lo; c0 < c_hi; c0 += 16) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = p0 + i < mp / 2 ? _mm512_loadu_si512(pairs + (p0 + i) * np + c0)
                               : _mm512_setzero_si512();
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)  // row c0 + i of dyᵀ, dwords p0 .. p0 + 15 (mp / 2 per row)
        _mm512_mask_storeu_epi32(out + (c0 + i) * (mp / 2) + p0,
                                 lanes16(mp / 2 - p0), r[i]);
    }
}

struct DwArgs {
  const uint32_t* xb;  // x as B tiles over row pairs: [rows / 2, kp] dwords
  const uint32_t* dyt;  // dyᵀ as A tiles: [np, rows] bf16
  const int32_t* bits;  // pair p's mask at bits + p * bank_stride
  int64_t bank_stride;
  const int64_t* offs;
  const int64_t* pid;
  int64_t segs;
  const Layout* lay;  // 32-row aligned
  bf16* out16;  // the result in bf16, or
  float* out32;  // in fp32 (accumulate: added to it under the mask)
  bool accumulate;
  int64_t n, k, kp, chunk;  // chunk: k-blocks of x's B tiles kept in L2 across strips
};

// c (two 16x16 blocks of rows n0.. x two of columns 32 kb..) = Σ over row pairs [p_lo, p_hi)
// of dyᵀ x.
LASS_AMX inline void dw_block(const DwArgs& a, int64_t n0, int64_t kb, int64_t p_lo,
                              int64_t p_hi, float (*c)[16][16]) {
  const int64_t rows = a.lay->rows, kp = a.kp, lda = rows * 2, ldb = kp * 4;
  const auto* a0 = reinterpret_cast<const bf16*>(a.dyt) + n0 * rows;
  const bf16* a1 = a0 + 16 * rows;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t p0 = p_lo; p0 < p_hi; p0 += 16) {  // 32 rows of dy / x per step
    _tile_loadd(6, a.xb + p0 * kp + kb * 32, ldb);
    _tile_loadd(7, a.xb + p0 * kp + kb * 32 + 16, ldb);
    _tile_loadd(4, a0 + 2 * p0, lda);
    _tile_loadd(5, a1 + 2 * p0, lda);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
}

// Row `row` of dW, columns 32 kb.. (lo: the first 16, hi: the next): stored under the mask
// `word` (off-mask exactly 0; lanes past K untouched), or added under it (accumulate).
LASS_AMX inline void dw_store(const DwArgs& a, int64_t row, int64_t kb, uint32_t word, __m512 lo,
                              __m512 hi) {
  const int64_t k = a.k, col = kb * 32;
  if (a.out16) {
    const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    _mm512_mask_storeu_epi16(a.out16 + row * k + col, valid_lanes(kb, k),
                             _mm512_maskz_mov_epi16(word, v));
  } else if (!a.accumulate) {
    float* o = a.out32 + row * k + col;
    const __mmask32 valid = valid_lanes(kb, k);
    _mm512_mask_storeu_ps(o, static_cast<__mmask16>(valid),
                          _mm512_maskz_mov_ps(static_cast<__mmask16>(word), lo));
    _mm512_mask_storeu_ps(o + 16, static_cast<__mmask16>(valid >> 16),
                          _mm512_maskz_mov_ps(static_cast<__mmask16>(word >> 16), hi));
  } else {  // grad += on the mask only: other entries never read or written
    float* o = a.out32 + row * k + col;
    const auto w0 = static_cast<__mmask16>(word), w1 = static_cast<__mmask16>(word >> 16);
    _mm512_mask_storeu_ps(o, w0, _mm512_add_ps(_mm512_maskz_loadu_ps(w0, o), lo));
    _mm512_mask_storeu_ps(o + 16, w1, _mm512_add_ps(_mm512_maskz_loadu_ps(w1, o + 16), hi));
  }
}

// Strips [s0, s1) of dW's rows (32 each), every column. One segment: its block stored under its
// mask. Several: each segment's block added under its pair's mask into a 32x32 fp32 sum, stored
// once (entries off every mask exactly 0).
LASS_AMX void dw_strips(const DwArgs& a, int64_t s0, int64_t s1) {
  const int64_t n = a.n, k = a.k, nw = num_words(k), kblocks = a.kp / 32;
  Tiles tiles;
  alignas(64) float c[4][16][16];
  alignas(64) float sum[32][32];
  for (int64_t kc = 0; kc < kblocks; kc += a.chunk)
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n0 = s * 32;
      for (int64_t kb = kc; kb < std::min(kblocks, kc + a.chunk); ++kb) {
        if (a.lay->identity) {
          const int32_t* bits = a.bits + a.pid[a.lay->only] * a.bank_stride;
          dw_block(a, n0, kb, 0, a.lay->rows / 2, c);
          for (int t = 0; t < 2; ++t)
            for (int i = 0; i < 16; ++i) {
              const int64_t row = n0 + 16 * t + i;
              if (row >= n) break;
              dw_store(a, row, kb, run_word(bits + row * nw, kb, k), _mm512_load_ps(c[2 * t][i]),
                       _mm512_load_ps(c[2 * t + 1][i]));
            }
          continue;
        }
        std::memset(sum, 0, sizeof(sum));
        for (int64_t g = 0; g < a.segs; ++g) {
          const int64_t len = a.offs[g + 1] - a.offs[g];
          if (len == 0) continue;
          const int64_t lo = a.lay->base[g] / 2;
          dw_block(a, n0, kb, lo, lo + round_up(len, 32) / 2, c);
          const int32_t* bits = a.bits + a.pid[g] * a.bank_stride;
          for (int t = 0; t < 2; ++t)
            for (int i = 0; i < 16; ++i) {
              const int64_t row = n0 + 16 * t + i;
              if (row >= n) break;
              const uint32_t word = run_word(bits + row * nw, kb, k);
              float* o = sum[16 * t + i];
              const auto w0 = static_cast<__mmask16>(word), w1 = static_cast<__mmask16>(word >> 16);
              _mm512_store_ps(o, _mm512_mask_add_ps(_mm512_load_ps(o), w0, _mm512_load_ps(o),
                                                    _mm512_load_ps(c[2 * t][i])));
              _mm512_store_ps(o + 16, _mm512_mask_add_ps(_mm512_load_ps(o + 16), w1,
                                                         _mm512_load_ps(o + 16),
                                                         _mm512_load_ps(c[2 * t + 1][i])));
            }
        }
        for (int r = 0; r < 32 && n0 + r < n; ++r)  // all lanes: the sum is 0 off every mask
          dw_store(a, n0 + r, kb, 0xFFFFFFFFu, _mm512_load_ps(sum[r]),
                   _mm512_load_ps(sum[r] + 16));
      }
    }
}

void dw_impl(const at::Tensor& dy, const at::Tensor& x, const int32_t* bits, int64_t bank_stride,
             const int64_t* offs, const int64_t* pid, int64_t segs, at::Tensor& dst,
             bool accumulate) {
  const int64_t n = dy.size(1), k = x.size(1);
  const int64_t np = round_up(n, 32), kp = round_up(k, 32);
  const Layout lay = layout(offs, segs, 32);
  const int64_t pairs = lay.rows / 2;
  Scratch<uint32_t> xb(pairs * kp), dyp(pairs * np), dyt(np * pairs);
  std::memset(xb.p, 0, pairs * kp * 4);
  std::memset(dyp.p, 0, pairs * np * 4);
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* dp = dy.data_ptr<bf16>();
  for (int64_t s = 0; s < segs; ++s) {  // each segment's rows in pairs from its base
    const int64_t len = offs[s + 1] - offs[s];
    if (len == 0) continue;
    const int64_t at = lay.base[s] / 2;
    at::parallel_for(0, (len + 1) / 2, 16, [&](int64_t p0, int64_t p1) {
      pack_row_pairs(xp + offs[s] * k, len, k, kp, xb.p + at * kp, p0, p1);
      pack_row_pairs(dp + offs[s] * n, len, n, np, dyp.p + at * np, p0, p1);
    });
  }
  at::parallel_for(0, np / 16, 8, [&](int64_t c0, int64_t c1) {
    pack_transposed(dyp.p, lay.rows, np, dyt.p, 16 * c0, 16 * c1);
  });
  const bool to_bf16 = dst.scalar_type() == at::kBFloat16;
  const DwArgs a{xb.p, dyt.p, bits, bank_stride, offs, pid, segs, &lay,
                 to_bf16 ? dst.data_ptr<bf16>() : nullptr,
                 to_bf16 ? nullptr : dst.data_ptr<float>(), accumulate, n, k, kp,
                 std::max<int64_t>(1, (512 * 1024) / (std::max<int64_t>(lay.rows, 32) * 64))};
  at::parallel_for(0, np / 32, 1, [&](int64_t s0, int64_t s1) { dw_strips(a, s0, s1); });
}
}  // namespace

void forward_amx(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                 const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t offs[2] = {0, x.size(0)}, pid[1] = {0};
  forward_impl(x, w, bits.data_ptr<int32_t>(), 0, offs, pid, 1, bias, y);
}

void segments_amx(const at::Tensor& x, const at::Tensor& w, const int32_t* bits,
                  int64_t bank_stride, const int64_t* offs, const int64_t* pid, int64_t segs,
                  const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  forward_impl(x, w, bits, bank_stride, offs, pid, segs, bias, y);
}

void dx_amx(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& bits, at::Tensor& dx) {
  dx_impl(dy, w, bits, dx);
}

void dw_amx(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits, at::Tensor& dst,
            bool accumulate) {
  const int64_t offs[2] = {0, dy.size(0)}, pid[1] = {0};
  dw_impl(dy, x, bits.data_ptr<int32_t>(), 0, offs, pid, 1, dst, accumulate);
}

void segments_dw_amx(const at::Tensor& dy, const at::Tensor& x, const int32_t* bits,
                     int64_t bank_stride, const int64_t* offs, const int64_t* pid, int64_t segs,
                     at::Tensor& dst) {
  dw_impl(dy, x, bits, bank_stride, offs, pid, segs, dst, false);
}

#else  // LASS_AMX_BUILD: stubs (never called: has_amx_bf16() is false)
bool has_amx_bf16() { return false; }

static void no_amx() { LASS_CHECK(false, "lass_sparse: built without AMX intrinsics"); }

void forward_amx(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                 const c10::optional<at::Tensor>&, at::Tensor&) { no_amx(); }
void segments_amx(const at::Tensor&, const at::Tensor&, const int32_t*, int64_t,
                  const int64_t*, const int64_t*, int64_t, const c10::optional<at::Tensor>&,
                  at::Tensor&) { no_amx(); }
void dx_amx(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&) { no_amx(); }
void dw_amx(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, bool) {
  no_amx();
}
void segments_dw_amx(const at::Tensor&, const at::Tensor&, const int32_t*, int64_t,
                     const int64_t*, const int64_t*, int64_t, at::Tensor&) { no_amx(); }
#endif  // LASS_AMX_BUILD

}  // namespace lass_sparse_cpu
