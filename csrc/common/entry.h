#pragma once
// Entries of the native kernels under the public op names (TORCH_LIBRARY_IMPL(lass_sparse, CPU)
// in csrc/cpu, (lass_sparse, CUDA) in csrc/cuda/binding.cpp): a call through torch.ops reaches
// them in one dispatcher trip. Each entry defers to the op's `.registry` overload (its Python
// body: the op's own checks and error wording, then the backend registry's choice) when
//   - another backend is forced for this thread (use_backend, or $LASS_SPARSE_BACKEND),
//   - the entry does not take the call (`takes`: e.g. more rows than the CUDA decode GEMV), or
//   - the kernel refuses the call (a dtype it does not take, a wrong shape): kernels check every
//     tensor before touching memory, so a refused call has changed nothing.
// While a thread runs a deferred body, entries run their kernel (no second deferral): the
// registry's choice of this backend lands here and a refusal raises the kernel's error, which
// the body words.
//
// Each extension has its own state (forced backend, deferral flag): it includes
// entry_module.h once, which defines the functions below (hidden: never shared across
// extensions) and the Python module with set_forced / kernels_only.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <utility>

#define LASS_HIDDEN __attribute__((visibility("hidden")))

namespace lass_sparse_entry {

// The backend forced from Python for this thread ("" for none; use_backend sets it).
LASS_HIDDEN void set_forced(std::string name);
// A backend other than this extension's is forced for this thread, or else by
// $LASS_SPARSE_BACKEND.
LASS_HIDDEN bool forced_elsewhere();
// This thread runs an op's Python body on behalf of an entry (or kernels_only is set).
LASS_HIDDEN bool& deferring();

// Integer options the Python side sets (<module>.set_option(name, value); -1 until set): the
// rows from which the CUDA entries take the "mask, then cuBLAS" route, per op, and the rows up
// to which dx / dW take the small-M kernels (lass_sparse/backends/cuda.py; -1: off).
enum Option : int {
  kCublasMinMLinear = 0,
  kCublasMinMDx,
  kCublasMinMDw,
  kCublasMinMQkv,
  kSmallBwdMaxM,
  kNumOptions
};
LASS_HIDDEN int64_t option(Option opt);

// The op's `.registry` overload (defined by lass_sparse/ops/schema.py from the op's own schema).
template <class Sig>
c10::TypedOperatorHandle<Sig> registry_overload(const char* op) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(op, "registry").typed<Sig>();
}

// The kernel when this backend should serve the call and takes it, else the op's body.
template <class Sig, class Kernel, class... Args>
decltype(auto) run_if_or_defer(bool takes, const c10::TypedOperatorHandle<Sig>& registry,
                               Kernel&& kernel, Args&&... args) {
  if (deferring()) return kernel();
  if (takes && !forced_elsewhere()) {
    try {
      return kernel();
    } catch (const c10::Error&) {  // refused: the body words the error or picks a backend
    }
  }
  struct Guard {
    bool prev = std::exchange(deferring(), true);
    ~Guard() { deferring() = prev; }
  } guard;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return registry.call(std::forward<Args>(args)...);
}

template <class Sig, class Kernel, class... Args>
decltype(auto) run_or_defer(const c10::TypedOperatorHandle<Sig>& registry, Kernel&& kernel,
                            Args&&... args) {
  return run_if_or_defer(true, registry, std::forward<Kernel>(kernel),
                         std::forward<Args>(args)...);
}

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return t->contiguous();
}
}  // namespace lass_sparse_entry
