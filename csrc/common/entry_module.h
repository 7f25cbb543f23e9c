#pragma once
// Include once per extension, after defining LASS_ENTRY_BACKEND (the backend name its kernels
// serve, as the registry spells it): the state of entry.h and the Python module of the
// extension, LASS_ENTRY_MODULE(name) (PyInit_<name>) with set_forced / kernels_only.
#include <Python.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "common/entry.h"

#ifndef LASS_ENTRY_BACKEND
#error "define LASS_ENTRY_BACKEND before including common/entry_module.h"
#endif

namespace lass_sparse_entry {
static thread_local std::string t_forced;
static thread_local bool t_deferring = false;

void set_forced(std::string name) { t_forced = std::move(name); }

bool& deferring() { return t_deferring; }

bool forced_elsewhere() {
  if (!t_forced.empty()) return t_forced != LASS_ENTRY_BACKEND;
  const char* env = std::getenv("LASS_SPARSE_BACKEND");
  return env != nullptr && env[0] != '\0' && std::strcmp(env, LASS_ENTRY_BACKEND) != 0;
}

// entry.h's Option values, by the names <module>.set_option takes (same order as the enum).
static const char* const option_names[kNumOptions] = {
    "cublas_min_m.masked_linear", "cublas_min_m.masked_linear_dx",
    "cublas_min_m.masked_linear_dw", "cublas_min_m.masked_qkv_proj", "small_bwd_max_m"};
static std::atomic<int64_t> option_values[kNumOptions] = {{-1}, {-1}, {-1}, {-1}, {-1}};

int64_t option(Option opt) { return option_values[opt].load(std::memory_order_relaxed); }

// <module>.set_option(name, value) -> previous value (ValueError for an unknown name).
static PyObject* py_set_option(PyObject*, PyObject* args) {
  const char* name = nullptr;
  long long value = 0;
  if (!PyArg_ParseTuple(args, "sL", &name, &value)) return nullptr;
  for (int i = 0; i < kNumOptions; ++i) {
    if (std::strcmp(name, option_names[i]) == 0)
      return PyLong_FromLongLong(option_values[i].exchange(value));
  }
  PyErr_Format(PyExc_ValueError, "set_option: unknown option %s", name);
  return nullptr;
}

// <module>.set_forced(name): the backend use_backend() forces in this thread ("" when none).
static PyObject* py_set_forced(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  set_forced(name);
  Py_RETURN_NONE;
}

// <module>.kernels_only(flag) -> previous: while set, this thread's entries run their kernels
// and raise the kernels' own errors instead of deferring (the registry's choice of this backend,
// and tests of the kernels' checks).
static PyObject* py_kernels_only(PyObject*, PyObject* args) {
  int flag = 0;
  if (!PyArg_ParseTuple(args, "p", &flag)) return nullptr;
  const bool prev = std::exchange(deferring(), flag != 0);
  return PyBool_FromLong(prev);
}

static PyMethodDef module_methods[] = {
    {"set_forced", py_set_forced, METH_VARARGS,
     "set_forced(name): the backend forced in this thread ('' for none)"},
    {"kernels_only", py_kernels_only, METH_VARARGS,
     "kernels_only(flag) -> previous: entries run their kernels, never the op's Python body"},
    {"set_option", py_set_option, METH_VARARGS,
     "set_option(name, value) -> previous: an integer option of the entries (entry.h)"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace lass_sparse_entry

// Loading the module loads the library and its TORCH_LIBRARY blocks (as pytorch/extension-cpp).
// The name must match the extension's (setup.py); PyMODINIT_FUNC gives C linkage and default
// visibility.
#define LASS_ENTRY_MODULE(name)                                                               \
  PyMODINIT_FUNC PyInit_##name(void) {                                                        \
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, #name, nullptr, -1,        \
                                            lass_sparse_entry::module_methods};               \
    return PyModule_Create(&module_def);                                                      \
  }
