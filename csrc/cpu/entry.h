#pragma once
// The C++ kernels are registered under the public op names (TORCH_LIBRARY_IMPL(lass_sparse,
// CPU)): a CPU call through torch.ops reaches them in one dispatcher trip. Each entry defers to
// the op's `.registry` overload (its Python body: the op's own checks and error wording, then
// the backend registry's choice) when
//   - another backend is forced for this thread (use_backend, or $LASS_SPARSE_BACKEND), or
//   - the kernel refuses the call (a dtype it does not take, a wrong shape): kernels check every
//     tensor before touching memory, so a refused call has changed nothing.
// While a thread runs a deferred body, entries run their kernel (no second deferral): the
// registry's "cpu" choice lands here and a refusal raises the kernel's error, which the body
// words.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <utility>

namespace lass_sparse_cpu {

// The backend forced from Python for this thread ("" for none; use_backend sets it).
void set_forced(std::string name);
// A backend other than "cpu" is forced for this thread, or else by $LASS_SPARSE_BACKEND.
bool forced_elsewhere();
// This thread runs an op's Python body on behalf of an entry.
bool& deferring();

// The op's `.registry` overload (defined by lass_sparse/ops.py from the op's own schema).
template <class Sig>
c10::TypedOperatorHandle<Sig> registry_overload(const char* op) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(op, "registry").typed<Sig>();
}

template <class Sig, class Kernel, class... Args>
decltype(auto) run_or_defer(const c10::TypedOperatorHandle<Sig>& registry, Kernel&& kernel,
                            Args&&... args) {
  if (deferring()) return kernel();
  if (!forced_elsewhere()) {
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

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return t->contiguous();
}
}  // namespace lass_sparse_cpu
