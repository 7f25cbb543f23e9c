// Torch binding for the CUDA kernels in lass_kernels.cu. They register under the public op
// names (TORCH_LIBRARY_IMPL(lass_sparse, CUDA); schemas in lass_sparse/ops/schema.py): pack_mask,
// unpack_mask, magnitude_mask, masked_cast, masked_linear (decode GEMV at most kGemvMaxM rows; the "mask,
// then cuBLAS" route from the rows Python sets), masked_linear_dx / _dw / _dw_accumulate_ (the
// small-M kernels up to the rows Python sets, that route from its rows), masked_qkv_proj (the
// decode GEMV or that route), segmented_masked_linear (the segmented decode GEMV, for tables the
// nn layers registered; others through the op body) and masked_adamw_. Each entry runs its
// kernel or defers to the op's Python body (another backend forced, a call it does not take,
// inputs its checks refuse: common/entry.h). The kernels themselves have no torch headers
// (lass_kernels.cuh).
#include <Python.h>  // first, as Python asks
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "lass_abi.h"  // structs, dtype codes, limits and launchers shared with the kernels

#define LASS_ENTRY_BACKEND "cuda"
#include "common/adamw_checks.h"
#include "common/message.h"  // LASS_CHECK

#include "common/entry_module.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <string>
#include <vector>

// The module lass_sparse._cuda (set_forced / kernels_only); loading it loads the kernels.
LASS_ENTRY_MODULE(_cuda)

// A launcher's cudaError_t as a RuntimeError naming the op.
#define LASS_CUDA_CHECK(op, expr)                                                           \
  do {                                                                                      \
    const cudaError_t lass_err_ = (expr);                                                   \
    LASS_CHECK(lass_err_ == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(lass_err_)); \
  } while (0)
// `cond` must hold for argument `name` of `op`, else a RuntimeError saying what was expected.
#define LASS_CHECK_ARG(cond, op, name, ...) LASS_CHECK(cond, op, ": ", name, " ", __VA_ARGS__)

namespace {
using namespace lass_sparse_entry;

bool is_kernel_dtype(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return lass::kFloat32;
    case at::kHalf: return lass::kFloat16;
    case at::kBFloat16: return lass::kBFloat16;
    default: LASS_CHECK(false, op, ": float32, float16 or bfloat16 expected, got ", t.scalar_type());
  }
  return -1;
}

// Argument checks every entry point runs before a launch: the dispatcher routes by device only,
// so dtype, shape, numel, layout and "one device" are checked here (a wrong size must raise, never
// become an out-of-bounds access on the GPU).
void check_on(const at::Tensor& t, const at::Device& dev, const char* op, const std::string& name) {
  LASS_CHECK_ARG(t.defined(), op, name, "is undefined");
  LASS_CHECK_ARG(t.is_cuda() && t.device() == dev, op, name, "must be on ", dev,
                 " with the other tensors, got ", t.device());
}

void check_exact(const at::Tensor& t, const at::Device& dev, const char* op,
                 const std::string& name, at::ScalarType dtype, at::IntArrayRef sizes) {
  check_on(t, dev, op, name);
  LASS_CHECK_ARG(t.scalar_type() == dtype && t.sizes() == sizes, op, name, "must be ", dtype,
                 sizes, ", got ", t.scalar_type(), t.sizes());
  LASS_CHECK_ARG(t.is_contiguous(), op, name, "must be contiguous");
}

// bits of a [rows..., k] tensor: int32[rows..., ceil(k/32)], contiguous, on `dev`.
void check_bits(const at::Tensor& bits, const at::Device& dev, at::IntArrayRef rows, int64_t k,
                const char* op, const std::string& name) {
  std::vector<int64_t> want(rows.begin(), rows.end());
  want.push_back((k + 31) / 32);
  check_exact(bits, dev, op, name, at::kInt, want);
}

at::Tensor pack_mask(const at::Tensor& mask) {
  check_on(mask, mask.device(), "pack_mask", "mask");
  LASS_CHECK(mask.scalar_type() == at::kBool && mask.dim() >= 1,
              "pack_mask: mask must be bool[..., K], got ", mask.scalar_type(), mask.sizes());
  const c10::cuda::CUDAGuard guard(mask.device());
  auto m = mask.contiguous();
  const int64_t k = m.size(-1), rows = m.numel() / std::max<int64_t>(k, 1);
  auto sizes = m.sizes().vec();
  sizes.back() = (k + 31) / 32;
  auto bits = at::empty(sizes, m.options().dtype(at::kInt));
  LASS_CUDA_CHECK("pack_mask", lass_launch_pack(m.data_ptr<bool>(), bits.data_ptr<int32_t>(),
                                                rows, k, c10::cuda::getCurrentCUDAStream()));
  return bits;
}

at::Tensor unpack_mask(const at::Tensor& bits, int64_t k) {
  check_on(bits, bits.device(), "unpack_mask", "bits");
  LASS_CHECK(k >= 0, "unpack_mask: k must be >= 0, got ", k);
  LASS_CHECK(bits.scalar_type() == at::kInt && bits.dim() >= 1 && bits.size(-1) == (k + 31) / 32,
              "unpack_mask: bits must be int32[..., ceil(k/32)] for k=", k, ", got ",
              bits.scalar_type(), bits.sizes());
  const c10::cuda::CUDAGuard guard(bits.device());
  auto b = bits.contiguous();
  const int64_t rows = b.numel() / std::max<int64_t>(b.size(-1), 1);
  auto sizes = b.sizes().vec();
  sizes.back() = k;
  auto out = at::empty(sizes, b.options().dtype(at::kBool));
  LASS_CUDA_CHECK("unpack_mask", lass_launch_unpack(b.data_ptr<int32_t>(), out.data_ptr<bool>(),
                                                    rows, k, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// LaSS magnitude rule: keep |w| > kthvalue(|w|.flatten(), int(alpha * numel)); every entry
// when that index is 0. The threshold by a radix sort (CUDA kthvalue is far slower), as the
// reference computes it on CUDA.
at::Tensor magnitude_mask(const at::Tensor& weight, double alpha) {
  const char* op = "magnitude_mask";
  check_on(weight, weight.device(), op, "weight");
  LASS_CHECK(weight.dim() >= 1, op, ": weight must have >= 1 dim, got ", weight.sizes());
  LASS_CHECK(alpha >= 0.0 && alpha < 1.0, op, ": alpha must be in [0, 1), got ", alpha);
  const int code = dtype_code(weight, op);
  const c10::cuda::CUDAGuard guard(weight.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto w = weight.contiguous();
  const auto kth = static_cast<int64_t>(alpha * static_cast<double>(w.numel()));
  double threshold = -1.0;  // |w| >= 0 > -1: keep all
  if (kth > 0) {
    auto a = w.abs().flatten();
    if (a.scalar_type() != at::kFloat) a = a.to(at::kFloat);  // exact: keeps order and ties
    threshold = std::get<0>(at::sort(a)).select(0, kth - 1).item<double>();
  }
  const int64_t k = w.size(-1), rows = w.numel() / std::max<int64_t>(k, 1);
  auto sizes = w.sizes().vec();
  sizes.back() = (k + 31) / 32;
  auto bits = at::empty(sizes, w.options().dtype(at::kInt));
  LASS_CUDA_CHECK(op, lass_launch_magnitude_pack(code, w.data_ptr(),
                                                 static_cast<float>(threshold),
                                                 bits.data_ptr<int32_t>(), rows, k,
                                                 c10::cuda::getCurrentCUDAStream()));
  return bits;
}

// masked_cast's dtype pairs: one kernel dtype (the apply-mask pass), or fp32 <-> bf16 / fp16.
bool cast_pair(at::ScalarType in, at::ScalarType out) {
  const auto kernel = [](at::ScalarType st) {
    return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
  };
  return kernel(in) && kernel(out) && (in == out || in == at::kFloat || out == at::kFloat);
}

// (W ⊙ M).to(dtype) in one pass: what MaskedLinear runs under autocast for a weight of another
// dtype (the cast autocast would make, with the mask applied in it).
at::Tensor masked_cast(const at::Tensor& weight, const at::Tensor& bits, at::ScalarType dtype) {
  const char* op = "masked_cast";
  check_on(weight, weight.device(), op, "weight");
  LASS_CHECK(weight.dim() >= 1 && cast_pair(weight.scalar_type(), dtype), op,
             ": weight [..., K] and dtype must be float32 -> float32, bfloat16 or float16, or "
             "bfloat16 / float16 -> itself or float32, got ", weight.scalar_type(), " -> ",
             dtype);
  const auto w = weight.contiguous();
  const int64_t k = w.size(-1);
  const auto b = bits.contiguous();
  check_bits(b, w.device(), w.sizes().slice(0, w.dim() - 1), k, op, "bits");
  const c10::cuda::CUDAGuard guard(w.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto out = at::empty(w.sizes(), w.options().dtype(dtype));
  if (out.numel() == 0) return out;
  LASS_CUDA_CHECK(op, lass_launch_mask_cast(dtype_code(w, op), dtype_code(out, op),
                                            w.data_ptr(), b.data_ptr<int32_t>(), out.data_ptr(),
                                            w.numel() / k, k,
                                            c10::cuda::getCurrentCUDAStream()));
  return out;
}

// Rows of x [..., K]: the product of the leading sizes (K may be 0).
int64_t leading_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// ---- the "mask, then cuBLAS" route (issue 29): W ⊙ M written once into a W-sized transient
// by one pass (lass_launch_apply_mask: a select, so NaN/Inf off the mask is never used), then
// cuBLAS; dW as one cuBLAS GEMM masked in place (off-mask entries exactly 0), or added into the
// gradient on the mask only. The rows from which each op takes it come from Python
// (lass_sparse/backends/cuda.py: the Triton backend's CUBLAS_MIN_M, off for ops a measured
// route sends to another kernel); no Python runs on it.

// The route serves `rows` rows of this op (the kernel's own condition).
bool cublas_serves(Option opt, int64_t rows) {
  const int64_t min_m = option(opt);
  return min_m >= 0 && rows >= min_m;
}

// A Triton variant is being timed or tested ($LASS_SPARSE_TRITON_VARIANT names one): the
// entries leave the GEMM-shaped calls to the op body, which runs it.
bool triton_variant_set() {
  const char* v = std::getenv("LASS_SPARSE_TRITON_VARIANT");
  return v != nullptr && v[0] != '\0';
}

// The entry takes the call for the route: it serves it and no Triton variant is set.
bool cublas_takes(Option opt, int64_t rows) {
  return cublas_serves(opt, rows) && !triton_variant_set();
}

// dx / dW of `rows` rows run the small-M kernels (up to the rows Python sets, at most
// kSmallBwdMaxM); the entries take them unless a Triton variant is being timed or tested.
bool small_rows(int64_t rows) {
  return rows <= std::min<int64_t>(option(kSmallBwdMaxM), lass::kSmallBwdMaxM);
}

bool small_takes(int64_t rows) { return small_rows(rows) && !triton_variant_set(); }

std::string cublas_rows(Option opt) {
  const int64_t min_m = option(opt);
  return min_m < 0 ? std::string("(the cuBLAS route is off)")
                   : "(the cuBLAS route from " + std::to_string(min_m) + " rows)";
}

// out[N, K] = src ⊙ M, or out += src ⊙ M off-mask entries left as they are (out may be src).
// src and out: contiguous, one kernel dtype, one device; bits checked by the caller.
void apply_mask_into(const at::Tensor& src, const at::Tensor& bits, const at::Tensor& out,
                     bool accumulate, const char* op) {
  LASS_CUDA_CHECK(op, lass_launch_apply_mask(dtype_code(src, op), src.data_ptr(),
                                             bits.data_ptr<int32_t>(), out.data_ptr(),
                                             src.size(0), src.size(1), accumulate ? 1 : 0,
                                             c10::cuda::getCurrentCUDAStream()));
}

// W ⊙ M into a new W-sized transient (w contiguous, bits checked by the caller).
at::Tensor masked_weight(const at::Tensor& w, const at::Tensor& bits, const char* op) {
  auto wm = at::empty_like(w);
  apply_mask_into(w, bits, wm, false, op);
  return wm;
}

// grad_out: [M, N] of a kernel dtype; returns its device.
at::Device check_grad_out(const at::Tensor& dy, const char* op) {
  check_on(dy, dy.device(), op, "grad_out");
  LASS_CHECK(dy.dim() == 2, op, ": grad_out must be 2-D [M, N], got ", dy.sizes());
  dtype_code(dy, op);
  return dy.device();
}

// The device's SMs (the small-M dx kernel's split count follows them).
int sm_count(const at::Device& dev, const char* op) {
  int count = 0;
  LASS_CUDA_CHECK(op, cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount,
                                             dev.index()));
  return count;
}

// dx[M, K] = grad_out[M, N] @ (W ⊙ M): up to the small-M rows one streaming pass over W
// (float32 partials of the N splits summed in a fixed order), else the mask pass, then cuBLAS.
at::Tensor masked_linear_dx(const at::Tensor& dy, const at::Tensor& weight,
                            const at::Tensor& bits) {
  const char* op = "masked_linear_dx";
  const at::Device dev = check_grad_out(dy, op);
  check_on(weight, dev, op, "weight");
  LASS_CHECK(weight.dim() == 2 && weight.size(0) == dy.size(1), op,
              ": weight must be [N=", dy.size(1), ", K], got ", weight.sizes());
  LASS_CHECK(weight.scalar_type() == dy.scalar_type(), op, ": weight must be ",
              dy.scalar_type(), " like grad_out (cuBLAS route), got ", weight.scalar_type());
  const int64_t m = dy.size(0), n = dy.size(1), k = weight.size(1);
  const auto b = bits.contiguous();
  check_bits(b, dev, {n}, k, op, "bits");
  const c10::cuda::CUDAGuard guard(dev);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto dx = at::empty({m, k}, dy.options());
  if (dx.numel() == 0) return dx;
  if (n == 0) return dx.zero_();
  if (small_rows(m)) {
    const auto dyc = dy.contiguous();
    const auto w = weight.contiguous();
    const int code = dtype_code(dy, op);
    const int splits = lass_small_dx_splits(static_cast<int>(m), n, k, code, sm_count(dev, op));
    at::Tensor ws;
    if (splits > 1) ws = at::empty({splits, m, k}, dy.options().dtype(at::kFloat));
    LASS_CUDA_CHECK(op, lass_launch_small_dx(code, dyc.data_ptr(), w.data_ptr(),
                                             b.data_ptr<int32_t>(), dx.data_ptr(),
                                             splits > 1 ? ws.data_ptr<float>() : nullptr,
                                             static_cast<int>(m), n, k, splits,
                                             c10::cuda::getCurrentCUDAStream()));
    return dx;
  }
  at::mm_out(dx, dy, masked_weight(weight.contiguous(), b, op));
  return dx;
}

// The checks of dW and its accumulation (grad_out [M, N], x [M, K] of its dtype, bits
// [N, ceil(K/32)]); returns the contiguous bits.
at::Tensor check_dw(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                    const char* op) {
  const at::Device dev = check_grad_out(dy, op);
  check_on(x, dev, op, "x");
  LASS_CHECK(x.dim() == 2 && x.size(0) == dy.size(0), op, ": x must be [M=", dy.size(0),
              ", K], got ", x.sizes());
  LASS_CHECK(x.scalar_type() == dy.scalar_type(), op, ": x must be ", dy.scalar_type(),
              " like grad_out, got ", x.scalar_type());
  auto b = bits.contiguous();
  check_bits(b, dev, {dy.size(1)}, x.size(1), op, "bits");
  return b;
}

// The small-M dW kernel into out ([N, K] contiguous, x's dtype or, accumulating, float32).
void small_dw_into(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits,
                   const at::Tensor& out, bool accumulate, const char* op) {
  const auto dyc = dy.contiguous(), xc = x.contiguous();
  LASS_CUDA_CHECK(op, lass_launch_small_dw(dtype_code(x, op), dtype_code(out, op),
                                           dyc.data_ptr(), xc.data_ptr(),
                                           bits.data_ptr<int32_t>(), out.data_ptr(),
                                           static_cast<int>(dy.size(0)), dy.size(1), x.size(1),
                                           accumulate ? 1 : 0,
                                           c10::cuda::getCurrentCUDAStream()));
}

// dW[N, K] = (grad_out ᵀ x) ⊙ M: up to the small-M rows one pass writing dW with the mask
// applied as it is written, else one cuBLAS GEMM, masked in place.
at::Tensor masked_linear_dw(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits) {
  const char* op = "masked_linear_dw";
  const auto b = check_dw(dy, x, bits, op);
  const c10::cuda::CUDAGuard guard(dy.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (small_rows(dy.size(0))) {
    if (dy.size(0) == 0) return at::zeros({dy.size(1), x.size(1)}, x.options());
    auto dw = at::empty({dy.size(1), x.size(1)}, x.options());
    if (dw.numel() != 0) small_dw_into(dy, x, b, dw, false, op);
    return dw;
  }
  auto dw = at::mm(dy.t(), x);
  if (dw.numel() != 0) apply_mask_into(dw, b, dw, false, op);
  return dw;
}

// grad[N, K] += (grad_out ᵀ x) ⊙ M, off-mask entries of grad left exactly as they are; grad
// of x's dtype, or float32 up to the small-M rows (above them a float32 grad for 16-bit x is
// the op body's Triton kernel).
void masked_linear_dw_accumulate_(const at::Tensor& grad, const at::Tensor& dy,
                                  const at::Tensor& x, const at::Tensor& bits) {
  const char* op = "masked_linear_dw_accumulate_";
  const auto b = check_dw(dy, x, bits, op);
  const bool small = small_rows(dy.size(0));
  const auto grad_dtype =
      small && grad.defined() && grad.scalar_type() == at::kFloat ? at::kFloat : x.scalar_type();
  check_exact(grad, dy.device(), op, "grad", grad_dtype, {dy.size(1), x.size(1)});
  const c10::cuda::CUDAGuard guard(dy.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (small) {
    if (grad.numel() != 0) small_dw_into(dy, x, b, grad, true, op);  // M = 0: nothing to add
    return;
  }
  const auto prod = at::mm(dy.t(), x);
  if (prod.numel() != 0) apply_mask_into(prod, b, grad, true, op);
}

// Decode GEMV: y = x (W ⊙ M)^T + b for x [..., K] with at most kGemvMaxM rows (kSegGemvMaxT
// under LASS_SPARSE_CUDA_GEMV=v3: lass_decode_gemv_max_rows); from the rows
// Python sets, the "mask, then cuBLAS" route.
at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bits,
                         const std::optional<at::Tensor>& bias) {
  const char* op = "masked_linear";
  check_on(x, x.device(), op, "x");
  const at::Device dev = x.device();
  LASS_CHECK(x.dim() >= 1, op, ": x must be [..., K], got ", x.sizes());
  dtype_code(x, op);
  LASS_CHECK(weight.defined() && weight.dim() == 2, op, ": weight must be 2-D [N, K]");
  const int64_t n = weight.size(0), k = weight.size(1), m = leading_rows(x);
  LASS_CHECK(x.size(-1) == k, op, ": x must be [..., K=", k, "] to match weight [N, K], got ",
              x.sizes());
  const int gemv_rows = lass_decode_gemv_max_rows();
  const bool gemv = m <= gemv_rows;
  LASS_CHECK(gemv || cublas_serves(kCublasMinMLinear, m), op,
              ": the CUDA kernels take at most ", gemv_rows,
              " rows of x (decode GEMV) or more ", cublas_rows(kCublasMinMLinear), ", got ", m);
  check_on(weight, dev, op, "weight");
  LASS_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must be ",
              x.scalar_type(), " like x, got ", weight.scalar_type());
  const auto b = bits.contiguous();  // the op takes any strides
  check_bits(b, dev, {n}, k, op, "bits");
  if (bias.has_value()) {
    check_on(*bias, dev, op, "bias");
    LASS_CHECK(bias->scalar_type() == x.scalar_type() && bias->sizes() == at::IntArrayRef{n},
                op, ": bias must be ", x.scalar_type(), "[", n, "], got ", bias->scalar_type(),
                bias->sizes());
  }
  const c10::cuda::CUDAGuard guard(dev);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto x2 = x.reshape({m, k}).contiguous();
  const auto w = weight.contiguous();
  const auto bias_c = contiguous(bias);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  auto y = at::empty(out_sizes, x.options());
  if (y.numel() == 0) return y;  // no zero-size grid launches
  if (!gemv) {  // W ⊙ M into a transient, then cuBLAS (addmm, as F.linear)
    const auto wm = masked_weight(w, b, op);
    auto y2 = y.view({m, n});
    if (bias_c.has_value())
      at::addmm_out(y2, *bias_c, x2, wm.t());
    else
      at::mm_out(y2, x2, wm.t());
    return y;
  }
  LASS_CUDA_CHECK(op, lass_launch_decode_gemv(dtype_code(x, op), x2.data_ptr(), w.data_ptr(),
                                              b.data_ptr<int32_t>(),
                                              bias_c.has_value() ? bias_c->data_ptr() : nullptr,
                                              y.data_ptr(), static_cast<int>(m), n, k,
                                              c10::cuda::getCurrentCUDAStream()));
  return y;
}

// Mixed-pair rows (segmented decode GEMV, at most kSegGemvMaxT rows of x): each row under its
// segment's pair's mask, W streamed once per 16 rows. The table stays on the device, read by
// the kernel (clamped: no value reaches outside the tensors); its values are checked by the op
// body, or were registered by the code that built the table (table_known below).
at::Tensor segmented_masked_linear(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& bits_bank, const at::Tensor& seg_offsets,
                                   const at::Tensor& seg_pair,
                                   const std::optional<at::Tensor>& bias) {
  const char* op = "segmented_masked_linear";
  check_on(x, x.device(), op, "x");
  const at::Device dev = x.device();
  LASS_CHECK(x.dim() == 2, op, ": x must be 2-D [T, K], got ", x.sizes());
  const int code = dtype_code(x, op);
  const int64_t t = x.size(0), k = x.size(1);
  LASS_CHECK(t <= lass::kSegGemvMaxT, op, ": the CUDA kernel takes at most ",
              lass::kSegGemvMaxT, " rows of x, got ", t);
  check_on(weight, dev, op, "weight");
  LASS_CHECK(weight.dim() == 2 && weight.size(1) == k && weight.scalar_type() == x.scalar_type(),
              op, ": weight must be ", x.scalar_type(), "[N, K=", k, "], got ",
              weight.scalar_type(), weight.sizes());
  const int64_t n = weight.size(0);
  check_on(bits_bank, dev, op, "bits_bank");
  LASS_CHECK(bits_bank.dim() == 3 && bits_bank.size(0) >= 1, op,
              ": bits_bank must be int32[P >= 1, N, ceil(K/32)], got ", bits_bank.sizes());
  const auto bank = bits_bank.contiguous();
  check_exact(bank, dev, op, "bits_bank", at::kInt, {bank.size(0), n, (k + 31) / 32});
  check_on(seg_pair, dev, op, "seg_pair");
  LASS_CHECK(seg_pair.dim() == 1 && seg_pair.size(0) < (int64_t{1} << 30), op,
              ": seg_pair must be int64[S], got ", seg_pair.sizes());
  const int64_t segs = seg_pair.size(0);
  check_exact(seg_pair, dev, op, "seg_pair", at::kLong, {segs});
  check_exact(seg_offsets, dev, op, "seg_offsets", at::kLong, {segs + 1});
  const auto bias_c = contiguous(bias);
  if (bias_c.has_value()) check_exact(*bias_c, dev, op, "bias", x.scalar_type(), {n});
  const c10::cuda::CUDAGuard guard(dev);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto xc = x.contiguous(), w = weight.contiguous();
  auto y = at::empty({t, n}, x.options());
  if (y.numel() == 0) return y;
  LASS_CUDA_CHECK(op, lass_launch_seg_gemv(
                          code, xc.data_ptr(), w.data_ptr(), bank.data_ptr<int32_t>(),
                          seg_offsets.data_ptr<int64_t>(), seg_pair.data_ptr<int64_t>(),
                          static_cast<int>(segs), static_cast<int>(bank.size(0)),
                          bias_c.has_value() ? bias_c->data_ptr() : nullptr, y.data_ptr(),
                          static_cast<int>(t), n, k, c10::cuda::getCurrentCUDAStream()));
  return y;
}

// One launch over the entries `idx` (one param dtype): the AdamWTensor table and chunk table
// copied to the device, then the multi-tensor kernel.
void adamw_launch(const std::vector<size_t>& idx, at::TensorList params, at::TensorList grads,
                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  const c10::List<std::optional<at::Tensor>>& bits, const lass::AdamWArgs& args) {
  const char* op = "masked_adamw_";
  const at::Tensor& p0 = params[idx[0]];
  std::vector<lass::AdamWTensor> table;  // the ABI struct itself: no second layout to keep
  std::vector<int32_t> chunk_tensor;
  std::vector<int64_t> chunk_start;
  for (size_t j = 0; j < idx.size(); ++j) {
    const size_t i = idx[j];
    const at::Tensor& p = params[i];
    const int64_t k = p.dim() ? std::max<int64_t>(p.size(-1), 1) : 1;
    std::optional<at::Tensor> b = bits.get(i);
    table.push_back({p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr<float>(),
                     exp_avg_sqs[i].data_ptr<float>(),
                     b.has_value() ? b->data_ptr<int32_t>() : nullptr, p.numel(), k,
                     (k + 31) / 32});
    for (int64_t s = 0; s < p.numel(); s += lass::kAdamWChunk) {
      chunk_tensor.push_back(static_cast<int32_t>(j));
      chunk_start.push_back(s);
    }
  }
  if (chunk_start.empty()) return;  // only empty params: nothing to launch
  auto opts = p0.options();
  const int64_t table_bytes = static_cast<int64_t>(table.size() * sizeof(lass::AdamWTensor));
  auto d_table = at::from_blob(table.data(), {table_bytes}, at::TensorOptions(at::kByte))
                     .to(opts.device());
  auto d_ct = at::tensor(chunk_tensor, opts.dtype(at::kInt));
  auto d_cs = at::tensor(chunk_start, opts.dtype(at::kLong));
  LASS_CUDA_CHECK(op, lass_launch_masked_adamw(
                          dtype_code(p0, op),
                          reinterpret_cast<const lass::AdamWTensor*>(d_table.data_ptr()),
                          d_ct.data_ptr<int32_t>(), d_cs.data_ptr<int64_t>(),
                          static_cast<int64_t>(chunk_start.size()), lass::kAdamWChunk, args,
                          c10::cuda::getCurrentCUDAStream()));
}

void masked_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& bits,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t step, bool maximize) {
  const char* op = "masked_adamw_";
  check_adamw_lists_and_hparams(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2,
                                eps, weight_decay, step);
  if (params.empty()) return;
  check_on(params[0], params[0].device(), op, "params[0]");
  const at::Device dev = params[0].device();
  // entries by param dtype, in list order (one launch per dtype)
  std::map<int, std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const std::string idx = "[" + std::to_string(i) + "]";
    check_on(p, dev, op, "params" + idx);
    LASS_CHECK(is_kernel_dtype(p), op, ": params", idx,
                " must be float32, float16 or bfloat16 (CUDA kernel), got ", p.scalar_type());
    LASS_CHECK(p.is_contiguous(), op, ": params", idx, " must be contiguous");
    check_exact(grads[i], dev, op, "grads" + idx, p.scalar_type(), p.sizes());
    check_exact(exp_avgs[i], dev, op, "exp_avgs" + idx, at::kFloat, p.sizes());
    check_exact(exp_avg_sqs[i], dev, op, "exp_avg_sqs" + idx, at::kFloat, p.sizes());
    const std::optional<at::Tensor> b = bits.get(i);
    if (b.has_value()) {
      LASS_CHECK(p.dim() >= 1, op, ": a masked param must have >= 1 dim, params", idx,
                  " is 0-d");
      check_bits(*b, dev, p.sizes().slice(0, p.dim() - 1), p.size(-1), op, "bits" + idx);
    }
    groups[dtype_code(p, op)].push_back(i);
  }
  check_adamw_no_overlap(params, grads, exp_avgs, exp_avg_sqs);
  // Every list entry is checked before the first one is updated: no half-applied step.
  const c10::cuda::CUDAGuard guard(dev);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const lass::AdamWArgs args{static_cast<float>(lr), static_cast<float>(beta1),
                             static_cast<float>(beta2), static_cast<float>(eps),
                             static_cast<float>(weight_decay), static_cast<float>(bc1),
                             static_cast<float>(bc2), maximize ? 1 : 0};
  for (const auto& group : groups)
    adamw_launch(group.second, params, grads, exp_avgs, exp_avg_sqs, bits, args);
}

// Fused QKV projection: x[B, T, D] @ (W ⊙ M)ᵀ (+ b) with W [3D, D] (q, k, v rows stacked),
// split into q, k, v [B, H, T, D/H] (the layout of scaled_dot_product_attention); B*T rows by
// the decode GEMV up to lass_decode_gemv_max_rows (cached decoding steps), else on the cuBLAS
// route.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_qkv_proj(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bits,
    const std::optional<at::Tensor>& bias, int64_t num_heads) {
  const char* op = "masked_qkv_proj";
  check_on(x, x.device(), op, "x");
  const at::Device dev = x.device();
  LASS_CHECK(x.dim() == 3, op, ": x must be [B, T, D], got ", x.sizes());
  dtype_code(x, op);
  const int64_t bsz = x.size(0), t = x.size(1), d = x.size(2), m = bsz * t;
  const int gemv_rows = lass_decode_gemv_max_rows();
  const bool gemv = m <= gemv_rows;
  LASS_CHECK(gemv || cublas_serves(kCublasMinMQkv, m), op, ": the CUDA kernel takes B*T <= ",
              gemv_rows, " rows (decode GEMV) or more ", cublas_rows(kCublasMinMQkv),
              ", got ", m);
  LASS_CHECK(num_heads > 0 && d % num_heads == 0, op, ": num_heads must divide D=", d, ", got ",
              num_heads);
  const auto w = weight.contiguous();  // the op takes any strides
  check_exact(w, dev, op, "weight", x.scalar_type(), {3 * d, d});
  const auto b = bits.contiguous();
  check_bits(b, dev, {3 * d}, d, op, "bits");
  const auto bias_c = contiguous(bias);
  if (bias_c.has_value()) check_exact(*bias_c, dev, op, "bias", x.scalar_type(), {3 * d});
  const c10::cuda::CUDAGuard guard(dev);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t dh = d / num_heads;
  auto q = at::empty({bsz, num_heads, t, dh}, x.options());
  auto k = at::empty_like(q), v = at::empty_like(q);
  if (m == 0 || d == 0) return {q, k, v};
  const auto x2 = x.reshape({m, d}).contiguous();
  at::Tensor y;
  if (gemv) {
    y = at::empty({m, 3 * d}, x.options());
    LASS_CUDA_CHECK(op, lass_launch_decode_gemv(
                            dtype_code(x, op), x2.data_ptr(), w.data_ptr(),
                            b.data_ptr<int32_t>(),
                            bias_c.has_value() ? bias_c->data_ptr() : nullptr, y.data_ptr(),
                            static_cast<int>(m), 3 * d, d, c10::cuda::getCurrentCUDAStream()));
  } else {
    const auto wm = masked_weight(w, b, op);
    y = bias_c.has_value() ? at::addmm(*bias_c, x2, wm.t()) : at::mm(x2, wm.t());
  }
  const auto y5 = y.view({bsz, t, 3, num_heads, dh});
  q.copy_(y5.select(2, 0).transpose(1, 2));
  k.copy_(y5.select(2, 1).transpose(1, 2));
  v.copy_(y5.select(2, 2).transpose(1, 2));
  return {q, k, v};
}

// ---- entries under the public names (common/entry.h)

at::Tensor pack_mask_op(const at::Tensor& mask) {
  static const auto registry = registry_overload<decltype(pack_mask_op)>("lass_sparse::pack_mask");
  return run_or_defer(registry, [&] { return pack_mask(mask); }, mask);
}

at::Tensor unpack_mask_op(const at::Tensor& bits, int64_t k) {
  static const auto registry =
      registry_overload<decltype(unpack_mask_op)>("lass_sparse::unpack_mask");
  return run_or_defer(registry, [&] { return unpack_mask(bits, k); }, bits, k);
}

at::Tensor magnitude_mask_op(const at::Tensor& weight, double alpha) {
  static const auto registry =
      registry_overload<decltype(magnitude_mask_op)>("lass_sparse::magnitude_mask");
  return run_if_or_defer(is_kernel_dtype(weight), registry,
                         [&] { return magnitude_mask(weight, alpha); }, weight, alpha);
}

at::Tensor masked_cast_op(const at::Tensor& weight, const at::Tensor& bits,
                          at::ScalarType dtype) {
  static const auto registry =
      registry_overload<decltype(masked_cast_op)>("lass_sparse::masked_cast");
  return run_if_or_defer(cast_pair(weight.scalar_type(), dtype), registry,
                         [&] { return masked_cast(weight, bits, dtype); }, weight, bits, dtype);
}

at::Tensor masked_linear_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bits,
                            const std::optional<at::Tensor>& bias) {
  static const auto registry =
      registry_overload<decltype(masked_linear_op)>("lass_sparse::masked_linear");
  // rows between the decode GEMV's and the cuBLAS route's, other dtypes, mixed dtypes on the
  // cuBLAS route: the op body, where the registry picks Triton, without an exception on the way
  const int64_t rows = x.dim() >= 1 ? leading_rows(x) : 0;
  const bool takes = x.dim() >= 1 && is_kernel_dtype(x) &&
                     (rows <= lass_decode_gemv_max_rows() ||
                      (cublas_takes(kCublasMinMLinear, rows) &&
                       weight.scalar_type() == x.scalar_type() &&
                       (!bias.has_value() || bias->scalar_type() == x.scalar_type())));
  return run_if_or_defer(takes, registry, [&] { return masked_linear(x, weight, bits, bias); },
                         x, weight, bits, bias);
}

at::Tensor masked_linear_dx_op(const at::Tensor& dy, const at::Tensor& weight,
                               const at::Tensor& bits) {
  static const auto registry =
      registry_overload<decltype(masked_linear_dx_op)>("lass_sparse::masked_linear_dx");
  const bool takes = dy.dim() == 2 && is_kernel_dtype(dy) &&
                     weight.scalar_type() == dy.scalar_type() &&
                     (small_takes(dy.size(0)) || cublas_takes(kCublasMinMDx, dy.size(0)));
  return run_if_or_defer(takes, registry, [&] { return masked_linear_dx(dy, weight, bits); },
                         dy, weight, bits);
}

at::Tensor masked_linear_dw_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits) {
  static const auto registry =
      registry_overload<decltype(masked_linear_dw_op)>("lass_sparse::masked_linear_dw");
  const bool takes = dy.dim() == 2 && is_kernel_dtype(dy) && x.scalar_type() == dy.scalar_type() &&
                     (small_takes(dy.size(0)) || cublas_takes(kCublasMinMDw, dy.size(0)));
  return run_if_or_defer(takes, registry, [&] { return masked_linear_dw(dy, x, bits); }, dy, x,
                         bits);
}

void masked_linear_dw_accumulate_op(const at::Tensor& grad, const at::Tensor& dy,
                                    const at::Tensor& x, const at::Tensor& bits) {
  static const auto registry = registry_overload<decltype(masked_linear_dw_accumulate_op)>(
      "lass_sparse::masked_linear_dw_accumulate_");
  const bool small = dy.dim() == 2 && small_takes(dy.size(0));
  const bool takes = dy.dim() == 2 && is_kernel_dtype(dy) && x.scalar_type() == dy.scalar_type() &&
                     (grad.scalar_type() == dy.scalar_type() ||
                      (small && grad.scalar_type() == at::kFloat)) &&
                     (small || cublas_takes(kCublasMinMDw, dy.size(0)));
  run_if_or_defer(takes, registry,
                  [&] { masked_linear_dw_accumulate_(grad, dy, x, bits); }, grad, dy, x, bits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_qkv_proj_op(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bits,
    const std::optional<at::Tensor>& bias, int64_t num_heads) {
  static const auto registry =
      registry_overload<decltype(masked_qkv_proj_op)>("lass_sparse::masked_qkv_proj");
  const bool takes = x.dim() == 3 && is_kernel_dtype(x) && weight.scalar_type() == x.scalar_type() &&
                     (!bias.has_value() || bias->scalar_type() == x.scalar_type()) &&
                     (x.size(0) * x.size(1) <= lass_decode_gemv_max_rows() ||
                      cublas_takes(kCublasMinMQkv, x.size(0) * x.size(1)));
  return run_if_or_defer(takes, registry,
                         [&] { return masked_qkv_proj(x, weight, bits, bias, num_heads); }, x,
                         weight, bits, bias, num_heads);
}

// The table's values were registered by its builder (lass_sparse_cpu::table_known, the C++
// extension's registry of known tables; false where that extension is not loaded).
bool table_known(const at::Tensor& offs, const at::Tensor& pairs, int64_t rows,
                 int64_t num_pairs) {
  using Sig = bool(const at::Tensor&, const at::Tensor&, int64_t, int64_t);
  static std::optional<c10::TypedOperatorHandle<Sig>> handle;
  static std::once_flag looked;
  std::call_once(looked, [] {
    const auto found =
        c10::Dispatcher::singleton().findSchema({"lass_sparse_cpu::table_known", ""});
    if (found.has_value()) handle = found->typed<Sig>();
  });
  return handle.has_value() && handle->call(offs, pairs, rows, num_pairs);
}

// A dispatcher call runs the kernel when its table is known (registered by the nn layers that
// built it: no device->host read, no Python) and the call is the kernel's (at most
// kSegGemvMaxT rows, one dtype); else the op body checks the table (read once per table, or
// asserted on the device during graph capture) and picks a kernel through the registry
// (lass_sparse/backends/cuda.py runs this one in kernels-only mode).
at::Tensor segmented_masked_linear_op(const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bits_bank, const at::Tensor& seg_offsets,
                                      const at::Tensor& seg_pair,
                                      const std::optional<at::Tensor>& bias) {
  static const auto registry = registry_overload<decltype(segmented_masked_linear_op)>(
      "lass_sparse::segmented_masked_linear");
  const bool takes = x.dim() == 2 && x.size(0) <= lass::kSegGemvMaxT && is_kernel_dtype(x) &&
                     weight.scalar_type() == x.scalar_type() &&
                     (!bias.has_value() || bias->scalar_type() == x.scalar_type()) &&
                     bits_bank.dim() == 3 && seg_offsets.dim() == 1 && seg_pair.dim() == 1 &&
                     table_known(seg_offsets, seg_pair, x.size(0), bits_bank.size(0));
  return run_if_or_defer(
      takes, registry,
      [&] { return segmented_masked_linear(x, weight, bits_bank, seg_offsets, seg_pair, bias); },
      x, weight, bits_bank, seg_offsets, seg_pair, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lass_sparse, CUDA, m) {
  m.impl("pack_mask", &pack_mask_op);
  m.impl("unpack_mask", &unpack_mask_op);
  m.impl("magnitude_mask", &magnitude_mask_op);
  m.impl("masked_cast", &masked_cast_op);
  m.impl("masked_linear", &masked_linear_op);
  m.impl("masked_linear_dx", &masked_linear_dx_op);
  m.impl("masked_linear_dw", &masked_linear_dw_op);
  m.impl("masked_linear_dw_accumulate_", &masked_linear_dw_accumulate_op);
  m.impl("masked_qkv_proj", &masked_qkv_proj_op);
  m.impl("segmented_masked_linear", &segmented_masked_linear_op);
  m.impl("masked_adamw_", &adamw_entry<&masked_adamw_>);
}
