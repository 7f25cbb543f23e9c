#pragma once
// masked_adamw_ for both native backends: the checks that do not depend on the device (the
// hyperparameters, the no-aliasing rule) and the entry under the public name. Shared by the CPU
// kernel (csrc/cpu/adamw.cpp) and the CUDA binding.
#include <ATen/ATen.h>

#include "common/entry.h"    // run_or_defer
#include "common/message.h"  // LASS_CHECK

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lass_sparse_entry {

inline void check_adamw_lists_and_hparams(at::TensorList params, at::TensorList grads,
                                          at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                          const c10::List<std::optional<at::Tensor>>& bits,
                                          double lr, double beta1, double beta2, double eps,
                                          double weight_decay, int64_t step) {
  const size_t n = params.size();
  LASS_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  bits.size() == n,
              "masked_adamw_: all lists must have one length");
  LASS_CHECK(step >= 1, "masked_adamw_: step must be >= 1, got ", step);
  LASS_CHECK(std::isfinite(lr) && lr >= 0.0, "masked_adamw_: lr must be finite and >= 0, got ",
              lr);
  LASS_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
              "masked_adamw_: betas must be in [0, 1), got ", beta1, ", ", beta2);
  LASS_CHECK(std::isfinite(eps) && eps >= 0.0 && std::isfinite(weight_decay) &&
                  weight_decay >= 0.0,
              "masked_adamw_: eps and weight_decay must be finite and >= 0, got ", eps, ", ",
              weight_decay);
}

// A written tensor (param, exp_avg, exp_avg_sq) must not share memory with any other listed
// tensor: a duplicate param, or state aliasing another tensor, would be updated twice. Grads are
// read only and may alias each other. All tensors are contiguous here (checked before).
inline void check_adamw_no_overlap(at::TensorList params, at::TensorList grads,
                                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs) {
  struct Span {
    uintptr_t lo, hi;
    bool written;
  };
  std::vector<Span> spans;
  spans.reserve(4 * params.size());
  auto add = [&spans](const at::Tensor& t, bool written) {
    if (t.numel() == 0) return;
    const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.push_back({lo, lo + static_cast<uintptr_t>(t.numel() * t.element_size()), written});
  };
  for (size_t i = 0; i < params.size(); ++i) {
    add(params[i], true);
    add(exp_avgs[i], true);
    add(exp_avg_sqs[i], true);
    add(grads[i], false);
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  uintptr_t any_end = 0, written_end = 0;
  for (const Span& s : spans) {
    LASS_CHECK(!((s.written && s.lo < any_end) || s.lo < written_end),
                "masked_adamw_: two listed tensors share memory (a duplicate parameter, or "
                "optimizer state aliasing another tensor); every param, exp_avg and exp_avg_sq "
                "must be its own tensor");
    any_end = std::max(any_end, s.hi);
    if (s.written) written_end = std::max(written_end, s.hi);
  }
}

using AdamWKernel = void (*)(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                             const c10::List<std::optional<at::Tensor>>&, double, double, double,
                             double, double, int64_t, bool);

// The entry of a masked_adamw_ kernel under the public name (entry.h: the kernel, or the op's
// Python body).
template <AdamWKernel Kernel>
void adamw_entry(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& bits,
                 double lr, double beta1, double beta2, double eps, double weight_decay,
                 int64_t step, bool maximize) {
  static const auto registry =
      registry_overload<decltype(adamw_entry<Kernel>)>("lass_sparse::masked_adamw_");
  run_or_defer(
      registry,
      [&] {
        Kernel(params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps, weight_decay,
               step, maximize);
      },
      params, grads, exp_avgs, exp_avg_sqs, bits, lr, beta1, beta2, eps, weight_decay, step,
      maximize);
}
}  // namespace lass_sparse_entry
