// The Python module lass_sparse._C (set_forced / kernels_only) and the per-thread state its
// entries read (common/entry.h). The C++ kernels register under the public op names
// (lass_sparse::*, schemas in lass_sparse/ops/schema.py) in their own files; lass_sparse_cpu
// holds the eager training nodes (autograd.cpp) and the registry of known segment tables
// (known_tables.cpp).
#include <Python.h>  // first, as Python asks
#include <torch/library.h>

#define LASS_ENTRY_BACKEND "cpu"
#include "common/entry_module.h"

namespace lass_sparse_cpu {
bool has_amx_bf16();  // amx_bf16.cpp
}

LASS_ENTRY_MODULE(_C)

TORCH_LIBRARY(lass_sparse_cpu, m) {
  // masked_linear with its gradient as one C++ autograd node (eager training, any device; x 2-D)
  m.def("masked_linear_autograd(Tensor x, Tensor weight, Tensor bits, Tensor? bias) -> Tensor");
  // masked_qkv_proj's node (x [B, T, D]); its forward is the public op (C++ on CUDA's cuBLAS
  // route, the Python body elsewhere)
  m.def("masked_qkv_autograd(Tensor x, Tensor weight, Tensor bits, Tensor? bias, int num_heads)"
        " -> (Tensor, Tensor, Tensor)");
  // masked_cast's node (its backward is the op again, with the weight's dtype)
  m.def("masked_cast_autograd(Tensor weight, Tensor bits, ScalarType dtype) -> Tensor");
  // segment tables whose values their builder registered (held weakly; any device): the CUDA
  // entries take a segmented call with a known table without reading it from the device
  m.def("remember_table(Tensor seg_offsets, Tensor seg_pair, int[] offsets, int[] pairs) -> ()");
  m.def("table_known(Tensor seg_offsets, Tensor seg_pair, int rows, int num_pairs) -> bool");
  // whether the bf16 kernels run on AMX tiles here (the CPU, the OS, $LASS_SPARSE_CPU_AMX)
  m.def("amx_bf16() -> bool", [] { return lass_sparse_cpu::has_amx_bf16(); });
}
