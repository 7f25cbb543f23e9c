// Torch binding for the CUDA kernels in lass_kernels.cu: ops lass_sparse_cuda::* on CUDA tensors.
// The kernels themselves have no torch headers (see lass_kernels.cuh).
#include <Python.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "lass_abi.h"  // structs, dtype codes, limits and launchers shared with the kernels

#include <cmath>
#include <string>
#include <vector>

// A bare module so `import lass_sparse._cuda` loads the library (and its TORCH_LIBRARY blocks)
// under the limited API; the name must match the extension's (lass_sparse._cuda in setup.py).
// PyMODINIT_FUNC gives it C linkage and default visibility.
PyMODINIT_FUNC PyInit__cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// A launcher's cudaError_t as a RuntimeError naming the op.
#define LASS_CUDA_CHECK(op, expr)                                                           \
  do {                                                                                      \
    const cudaError_t lass_err_ = (expr);                                                   \
    TORCH_CHECK(lass_err_ == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(lass_err_)); \
  } while (0)
// `cond` must hold for argument `name` of `op`, else a RuntimeError saying what was expected.
#define LASS_CHECK_ARG(cond, op, name, ...) TORCH_CHECK(cond, op, ": ", name, " ", __VA_ARGS__)

namespace {

int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return lass::kFloat32;
    case at::kHalf: return lass::kFloat16;
    case at::kBFloat16: return lass::kBFloat16;
    default: TORCH_CHECK(false, op, ": float32, float16 or bfloat16 expected, got ", t.scalar_type());
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
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() >= 1,
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
  TORCH_CHECK(k >= 0, "unpack_mask: k must be >= 0, got ", k);
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.dim() >= 1 && bits.size(-1) == (k + 31) / 32,
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

at::Tensor magnitude_pack(const at::Tensor& weight, double threshold) {
  check_on(weight, weight.device(), "magnitude_mask", "weight");
  TORCH_CHECK(weight.dim() >= 1, "magnitude_mask: weight must have >= 1 dim, got ",
              weight.sizes());
  dtype_code(weight, "magnitude_mask");
  const c10::cuda::CUDAGuard guard(weight.device());
  auto w = weight.contiguous();
  const int64_t k = w.size(-1), rows = w.numel() / std::max<int64_t>(k, 1);
  auto sizes = w.sizes().vec();
  sizes.back() = (k + 31) / 32;
  auto bits = at::empty(sizes, w.options().dtype(at::kInt));
  LASS_CUDA_CHECK("magnitude_mask",
                  lass_launch_magnitude_pack(dtype_code(w, "magnitude_mask"), w.data_ptr(),
                                             static_cast<float>(threshold),
                                             bits.data_ptr<int32_t>(), rows, k,
                                             c10::cuda::getCurrentCUDAStream()));
  return bits;
}

at::Tensor decode_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                       const c10::optional<at::Tensor>& bias) {
  const char* op = "masked_linear";
  check_on(x, x.device(), op, "x");
  const at::Device dev = x.device();
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= lass::kGemvMaxM, "decode_gemv: x must be [M<=",
              lass::kGemvMaxM, ", K], got ", x.sizes());
  dtype_code(x, op);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(w.defined() && w.dim() == 2, op, ": weight must be 2-D [N, K]");
  check_exact(w, dev, op, "weight", x.scalar_type(), {w.size(0), x.size(1)});
  check_bits(bits, dev, {w.size(0)}, w.size(1), op, "bits");
  if (bias.has_value()) check_exact(*bias, dev, op, "bias", x.scalar_type(), {w.size(0)});
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  if (y.numel() == 0) return y;  // no zero-size grid launches
  LASS_CUDA_CHECK(op, lass_launch_decode_gemv(dtype_code(x, op), x.data_ptr(), w.data_ptr(),
                                              bits.data_ptr<int32_t>(),
                                              bias.has_value() ? bias->data_ptr() : nullptr,
                                              y.data_ptr(), static_cast<int>(x.size(0)),
                                              w.size(0), w.size(1),
                                              c10::cuda::getCurrentCUDAStream()));
  return y;
}

void masked_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const c10::List<c10::optional<at::Tensor>>& bits,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t step, bool maximize) {
  const char* op = "masked_adamw_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  bits.size() == n,
              op, ": all lists must have one length");
  TORCH_CHECK(step >= 1, op, ": step must be >= 1, got ", step);
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, op, ": lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, op,
              ": betas must be in [0, 1), got ", beta1, ", ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0 && std::isfinite(weight_decay) &&
                  weight_decay >= 0.0,
              op, ": eps and weight_decay must be finite and >= 0, got ", eps, ", ", weight_decay);
  if (params.empty()) return;
  check_on(params[0], params[0].device(), op, "params[0]");
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string idx = "[" + std::to_string(i) + "]";
    check_on(p, dev, op, "params" + idx);
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), op,
                ": all params must share one dtype");
    TORCH_CHECK(p.is_contiguous(), op, ": params", idx, " must be contiguous");
    check_exact(grads[i], dev, op, "grads" + idx, p.scalar_type(), p.sizes());
    check_exact(exp_avgs[i], dev, op, "exp_avgs" + idx, at::kFloat, p.sizes());
    check_exact(exp_avg_sqs[i], dev, op, "exp_avg_sqs" + idx, at::kFloat, p.sizes());
    const c10::optional<at::Tensor> b = bits.get(i);
    if (b.has_value()) {
      TORCH_CHECK(p.dim() >= 1, op, ": a masked param must have >= 1 dim, params", idx,
                  " is 0-d");
      check_bits(*b, dev, p.sizes().slice(0, p.dim() - 1), p.size(-1), op, "bits" + idx);
    }
  }
  const c10::cuda::CUDAGuard guard(dev);
  const int code = dtype_code(params[0], op);
  std::vector<lass::AdamWTensor> table;  // the ABI struct itself: no second layout to keep
  std::vector<int32_t> chunk_tensor;
  std::vector<int64_t> chunk_start;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const int64_t k = p.dim() ? std::max<int64_t>(p.size(-1), 1) : 1;
    c10::optional<at::Tensor> b = bits.get(i);
    table.push_back({p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr<float>(),
                     exp_avg_sqs[i].data_ptr<float>(),
                     b.has_value() ? b->data_ptr<int32_t>() : nullptr, p.numel(), k,
                     (k + 31) / 32});
    for (int64_t s = 0; s < p.numel(); s += lass::kAdamWChunk) {
      chunk_tensor.push_back(static_cast<int32_t>(i));
      chunk_start.push_back(s);
    }
  }
  auto opts = params[0].options();
  const int64_t table_bytes = static_cast<int64_t>(table.size() * sizeof(lass::AdamWTensor));
  auto d_table = at::from_blob(table.data(), {table_bytes}, at::TensorOptions(at::kByte))
                     .to(opts.device());
  auto d_ct = at::tensor(chunk_tensor, opts.dtype(at::kInt));
  auto d_cs = at::tensor(chunk_start, opts.dtype(at::kLong));
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  lass::AdamWArgs args{static_cast<float>(lr), static_cast<float>(beta1),
                       static_cast<float>(beta2), static_cast<float>(eps),
                       static_cast<float>(weight_decay), static_cast<float>(bc1),
                       static_cast<float>(bc2), maximize ? 1 : 0};
  LASS_CUDA_CHECK(op, lass_launch_masked_adamw(
                          code, reinterpret_cast<const lass::AdamWTensor*>(d_table.data_ptr()),
                          d_ct.data_ptr<int32_t>(), d_cs.data_ptr<int64_t>(),
                          static_cast<int64_t>(chunk_start.size()), lass::kAdamWChunk, args,
                          c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY(lass_sparse_cuda, m) {
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor bits, int k) -> Tensor");
  m.def("magnitude_pack(Tensor weight, float threshold) -> Tensor");
  m.def("decode_gemv(Tensor x, Tensor weight, Tensor bits, Tensor? bias) -> Tensor");
  m.def(
      "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor?[] bits, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(lass_sparse_cuda, CUDA, m) {
  m.impl("pack_mask", &pack_mask);
  m.impl("unpack_mask", &unpack_mask);
  m.impl("magnitude_pack", &magnitude_pack);
  m.impl("decode_gemv", &decode_gemv);
  m.impl("masked_adamw_", &masked_adamw_);
}
