// Torch binding for the CUDA kernels in lass_kernels.cu: ops lass_sparse_cuda::* on CUDA tensors.
// The kernels themselves have no torch headers (see lass_kernels.cuh).
#include <Python.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <vector>

// A bare module so `import lass_sparse._cuda` loads the library (and its TORCH_LIBRARY blocks)
// under the limited API; the name must match the extension's (lass_sparse._cuda in setup.py).
// PyMODINIT_FUNC gives it C linkage and default visibility.
PyMODINIT_FUNC PyInit__cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace lass {
struct AdamWTensor {
  void* p;
  const void* g;
  float* m;
  float* v;
  const int32_t* bits;
  int64_t numel, k, nw;
};
struct AdamWArgs {
  float lr, beta1, beta2, eps, weight_decay, bc1, bc2;
  int maximize;
};
}  // namespace lass

extern "C" {
cudaError_t lass_launch_decode_gemv(int, const void*, const void*, const int32_t*, const void*,
                                    void*, int, int64_t, int64_t, cudaStream_t);
cudaError_t lass_launch_pack(const bool*, int32_t*, int64_t, int64_t, cudaStream_t);
cudaError_t lass_launch_unpack(const int32_t*, bool*, int64_t, int64_t, cudaStream_t);
cudaError_t lass_launch_magnitude_pack(int, const void*, float, int32_t*, int64_t, int64_t,
                                       cudaStream_t);
cudaError_t lass_launch_masked_adamw(int, const lass::AdamWTensor*, const int32_t*,
                                     const int64_t*, int64_t, int64_t, lass::AdamWArgs,
                                     cudaStream_t);
}

namespace {

constexpr int64_t kChunk = 65536;

int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, op, ": float32, float16 or bfloat16 expected, got ", t.scalar_type());
  }
  return -1;
}

void check(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(e));
}

at::Tensor pack_mask(const at::Tensor& mask) {
  const c10::cuda::CUDAGuard guard(mask.device());
  auto m = mask.contiguous();
  const int64_t k = m.size(-1), rows = m.numel() / std::max<int64_t>(k, 1);
  auto sizes = m.sizes().vec();
  sizes.back() = (k + 31) / 32;
  auto bits = at::empty(sizes, m.options().dtype(at::kInt));
  check(lass_launch_pack(m.data_ptr<bool>(), bits.data_ptr<int32_t>(), rows, k,
                         c10::cuda::getCurrentCUDAStream()), "pack_mask");
  return bits;
}

at::Tensor unpack_mask(const at::Tensor& bits, int64_t k) {
  const c10::cuda::CUDAGuard guard(bits.device());
  auto b = bits.contiguous();
  const int64_t rows = b.numel() / std::max<int64_t>(b.size(-1), 1);
  auto sizes = b.sizes().vec();
  sizes.back() = k;
  auto out = at::empty(sizes, b.options().dtype(at::kBool));
  check(lass_launch_unpack(b.data_ptr<int32_t>(), out.data_ptr<bool>(), rows, k,
                           c10::cuda::getCurrentCUDAStream()), "unpack_mask");
  return out;
}

at::Tensor magnitude_pack(const at::Tensor& weight, double threshold) {
  const c10::cuda::CUDAGuard guard(weight.device());
  auto w = weight.contiguous();
  const int64_t k = w.size(-1), rows = w.numel() / std::max<int64_t>(k, 1);
  auto sizes = w.sizes().vec();
  sizes.back() = (k + 31) / 32;
  auto bits = at::empty(sizes, w.options().dtype(at::kInt));
  check(lass_launch_magnitude_pack(dtype_code(w, "magnitude_mask"), w.data_ptr(),
                                   static_cast<float>(threshold), bits.data_ptr<int32_t>(), rows,
                                   k, c10::cuda::getCurrentCUDAStream()),
        "magnitude_mask");
  return bits;
}

at::Tensor decode_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bits,
                       const c10::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= 16, "decode_gemv: x must be [M<=16, K]");
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  if (y.numel() == 0) return y;  // no zero-size grid launches
  check(lass_launch_decode_gemv(dtype_code(x, "masked_linear"), x.data_ptr(), w.data_ptr(),
                                bits.data_ptr<int32_t>(),
                                bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(),
                                static_cast<int>(x.size(0)), w.size(0), w.size(1),
                                c10::cuda::getCurrentCUDAStream()),
        "masked_linear");
  return y;
}

void masked_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const c10::List<c10::optional<at::Tensor>>& bits,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t step, bool maximize) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const int code = dtype_code(params[0], "masked_adamw_");
  std::vector<int64_t> table;
  std::vector<int32_t> chunk_tensor;
  std::vector<int64_t> chunk_start;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type(),
                "masked_adamw_: all params must share one dtype");
    const at::Tensor& p = params[i];
    const int64_t k = p.dim() ? std::max<int64_t>(p.size(-1), 1) : 1;
    c10::optional<at::Tensor> b = bits.get(i);
    table.insert(table.end(),
                 {reinterpret_cast<int64_t>(p.data_ptr()),
                  reinterpret_cast<int64_t>(grads[i].data_ptr()),
                  reinterpret_cast<int64_t>(exp_avgs[i].data_ptr()),
                  reinterpret_cast<int64_t>(exp_avg_sqs[i].data_ptr()),
                  b.has_value() ? reinterpret_cast<int64_t>(b->data_ptr()) : 0, p.numel(), k,
                  (k + 31) / 32});
    for (int64_t s = 0; s < p.numel(); s += kChunk) {
      chunk_tensor.push_back(static_cast<int32_t>(i));
      chunk_start.push_back(s);
    }
  }
  auto opts = params[0].options();
  auto d_table = at::tensor(table, opts.dtype(at::kLong));
  auto d_ct = at::tensor(chunk_tensor, opts.dtype(at::kInt));
  auto d_cs = at::tensor(chunk_start, opts.dtype(at::kLong));
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  lass::AdamWArgs args{static_cast<float>(lr), static_cast<float>(beta1),
                       static_cast<float>(beta2), static_cast<float>(eps),
                       static_cast<float>(weight_decay), static_cast<float>(bc1),
                       static_cast<float>(bc2), maximize ? 1 : 0};
  check(lass_launch_masked_adamw(code, reinterpret_cast<const lass::AdamWTensor*>(
                                           d_table.data_ptr<int64_t>()),
                                 d_ct.data_ptr<int32_t>(), d_cs.data_ptr<int64_t>(),
                                 static_cast<int64_t>(chunk_start.size()), kChunk, args,
                                 c10::cuda::getCurrentCUDAStream()),
        "masked_adamw_");
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
