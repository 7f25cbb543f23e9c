// Schemas of the C++ CPU kernels (namespace lass_sparse_cpu). The public ops live in
// lass_sparse/ops.py; lass_sparse/backends/cpu.py registers these as their CPU backend.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module so `import lass_sparse._C` loads the library (and its TORCH_LIBRARY blocks)
// under the limited API, as in pytorch/extension-cpp.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lass_sparse_cpu, m) {
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor bits, int k) -> Tensor");
  m.def("magnitude_mask(Tensor weight, float alpha) -> Tensor");
  m.def("masked_linear(Tensor x, Tensor weight, Tensor bits, Tensor? bias) -> Tensor");
  // masked_linear with its gradient in C++ (eager CPU training; x 2-D)
  m.def("masked_linear_autograd(Tensor x, Tensor weight, Tensor bits, Tensor? bias) -> Tensor");
  m.def(
      "segmented_masked_linear(Tensor x, Tensor weight, Tensor bits_bank, Tensor seg_offsets, "
      "Tensor seg_pair, Tensor? bias) -> Tensor");
  m.def("masked_linear_dx(Tensor grad_out, Tensor weight, Tensor bits) -> Tensor");
  m.def("masked_linear_dw(Tensor grad_out, Tensor x, Tensor bits) -> Tensor");
  m.def("masked_linear_dw_accumulate_(Tensor(a!) grad, Tensor grad_out, Tensor x, Tensor bits) -> ()");
  m.def(
      "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor?[] bits, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, bool maximize) -> ()");
}
