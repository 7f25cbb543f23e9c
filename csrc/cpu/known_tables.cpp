// Segment tables whose values their builder registered (lass_sparse/ops/segments.py remember():
// the tables the nn layers build on the host for mixed-pair batches and never change). The CUDA
// extension asks `table_known` before it takes a segmented call straight from the dispatcher:
// a known table needs no device->host read and no Python check. Tables are held weakly (an
// entry dies with its tensors) and compared by identity, as the Python memo does.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "common/message.h"

namespace lass_sparse_cpu {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Known {
  WeakImpl offs, pairs;
  int64_t rows;      // seg_offsets[-1]: the rows of x the table describes
  int64_t pair_end;  // max(seg_pair) + 1: the bank needs at least this many pairs
};

constexpr size_t kMaxKnown = 512;  // the oldest entries go first beyond this
std::mutex known_mu;
std::vector<Known> known;

bool is(const WeakImpl& w, const at::Tensor& t) {
  const auto strong = w.lock();  // null once the tensor is gone
  return strong && strong.get() == t.unsafeGetTensorImpl();
}

void remember_table(const at::Tensor& seg_offsets, const at::Tensor& seg_pair,
                    at::IntArrayRef offsets, at::IntArrayRef pairs) {
  const char* op = "remember_table";
  LASS_CHECK(seg_offsets.dim() == 1 && seg_pair.dim() == 1 &&
                 seg_offsets.numel() == static_cast<int64_t>(offsets.size()) &&
                 seg_pair.numel() == static_cast<int64_t>(pairs.size()) &&
                 offsets.size() == pairs.size() + 1,
             op, ": seg_offsets [S+1] and seg_pair [S] must match the values given (",
             offsets.size(), " offsets, ", pairs.size(), " pairs), got ", seg_offsets.sizes(),
             " and ", seg_pair.sizes());
  LASS_CHECK(offsets[0] == 0, op, ": seg_offsets must start at 0, got ", offsets[0]);
  for (size_t s = 0; s + 1 < offsets.size(); ++s)
    LASS_CHECK(offsets[s] <= offsets[s + 1], op, ": seg_offsets must be non-decreasing");
  int64_t pair_end = 0;
  for (const int64_t p : pairs) {
    LASS_CHECK(p >= 0, op, ": seg_pair ids must be >= 0, got ", p);
    pair_end = std::max(pair_end, p + 1);
  }
  Known entry{WeakImpl(seg_offsets.getIntrusivePtr()), WeakImpl(seg_pair.getIntrusivePtr()),
              offsets.back(), pair_end};
  const std::lock_guard<std::mutex> lock(known_mu);
  known.erase(std::remove_if(known.begin(), known.end(),
                             [&](const Known& e) {
                               return e.offs.expired() || e.pairs.expired() ||
                                      is(e.offs, seg_offsets);
                             }),
              known.end());
  if (known.size() >= kMaxKnown) known.erase(known.begin());
  known.push_back(std::move(entry));
}

// The table was registered and describes `rows` rows of pair ids below `num_pairs`.
bool table_known(const at::Tensor& seg_offsets, const at::Tensor& seg_pair, int64_t rows,
                 int64_t num_pairs) {
  LASS_CHECK(seg_offsets.dim() == 1 && seg_pair.dim() == 1, "table_known: seg_offsets and "
             "seg_pair must be 1-D, got ", seg_offsets.sizes(), " and ", seg_pair.sizes());
  LASS_CHECK(rows >= 0 && num_pairs >= 0, "table_known: rows and num_pairs must be >= 0, got ",
             rows, " and ", num_pairs);
  const std::lock_guard<std::mutex> lock(known_mu);
  for (auto it = known.rbegin(); it != known.rend(); ++it) {
    if (is(it->offs, seg_offsets))
      return is(it->pairs, seg_pair) && it->rows == rows && it->pair_end <= num_pairs;
  }
  return false;
}

}  // namespace

TORCH_LIBRARY_IMPL(lass_sparse_cpu, CompositeExplicitAutograd, m) {
  m.impl("remember_table", &remember_table);
  m.impl("table_known", &table_known);
}

}  // namespace lass_sparse_cpu
