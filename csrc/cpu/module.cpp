// The Python module lass_sparse._C, and the per-thread forced backend the entries read (entry.h).
// The C++ kernels register under the public op names (lass_sparse::*, schemas in
// lass_sparse/ops.py) in their own files; lass_sparse_cpu holds only the eager training node.
#include <Python.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "entry.h"

namespace lass_sparse_cpu {
static thread_local std::string t_forced;
static thread_local bool t_deferring = false;

void set_forced(std::string name) { t_forced = std::move(name); }

bool& deferring() { return t_deferring; }

bool forced_elsewhere() {
  if (!t_forced.empty()) return t_forced != "cpu";
  const char* env = std::getenv("LASS_SPARSE_BACKEND");
  return env != nullptr && env[0] != '\0' && std::strcmp(env, "cpu") != 0;
}
}  // namespace lass_sparse_cpu

extern "C" {
// _C.set_forced(name): the backend use_backend() forces in this thread ("" when none).
static PyObject* py_set_forced(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  lass_sparse_cpu::set_forced(name);
  Py_RETURN_NONE;
}

// _C.kernels_only(flag) -> previous: while set, this thread's entries run their kernels and raise
// the kernels' own errors instead of deferring (tests of the kernels' checks).
static PyObject* py_kernels_only(PyObject*, PyObject* args) {
  int flag = 0;
  if (!PyArg_ParseTuple(args, "p", &flag)) return nullptr;
  const bool prev = std::exchange(lass_sparse_cpu::deferring(), flag != 0);
  return PyBool_FromLong(prev);
}

static PyMethodDef methods[] = {
    {"set_forced", py_set_forced, METH_VARARGS,
     "set_forced(name): the backend forced in this thread ('' for none)"},
    {"kernels_only", py_kernels_only, METH_VARARGS,
     "kernels_only(flag) -> previous: entries run their kernels, never the op's Python body"},
    {nullptr, nullptr, 0, nullptr}};

// Loading the module loads the library and its TORCH_LIBRARY blocks (as pytorch/extension-cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lass_sparse_cpu, m) {
  // masked_linear with its gradient as one C++ autograd node (eager CPU training; x 2-D)
  m.def("masked_linear_autograd(Tensor x, Tensor weight, Tensor bits, Tensor? bias) -> Tensor");
}
