// Pack planner for fastdpo: first-fit-decreasing bin packing of DPO pairs and LPT balancing of bins
// over ranks. The numpy twin in fastdpo/packing.py produces identical output, tie for tie.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <queue>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

// Max segment tree over bin capacities. Every leaf starts at the full budget, so the leftmost leaf that
// fits an item is either an open bin or the first unopened one: opening a bin needs no special case.
class CapacityTree {
 public:
  CapacityTree(int64_t num_leaves, int64_t budget) {
    while (size_ < num_leaves) size_ <<= 1;
    tree_.assign(2 * size_, budget);
  }

  // Index of the leftmost leaf whose capacity is >= need; the caller guarantees one exists.
  int64_t leftmost_fit(int64_t need) const {
    int64_t node = 1;
    while (node < size_) node = tree_[2 * node] >= need ? 2 * node : 2 * node + 1;
    return node - size_;
  }

  int64_t capacity(int64_t leaf) const { return tree_[leaf + size_]; }

  void take(int64_t leaf, int64_t amount) {
    int64_t node = leaf + size_;
    tree_[node] -= amount;
    for (node >>= 1; node >= 1; node >>= 1) tree_[node] = std::max(tree_[2 * node], tree_[2 * node + 1]);
  }

 private:
  int64_t size_ = 1;
  std::vector<int64_t> tree_;
};

struct Plan {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
};

// Pair indices sorted by length, longest first, equal lengths in index order (the documented tie-break).
std::vector<int64_t> longest_first(const int64_t* tokens, int64_t n, int64_t max_len) {
  std::vector<int64_t> sorted(n);
  if (max_len <= 4 * n + 65536) {
    // Counting sort: linear, stable, and far faster than a comparison sort for token-count keys.
    std::vector<int64_t> start(max_len + 2, 0);
    for (int64_t i = 0; i < n; ++i) ++start[max_len - tokens[i] + 1];
    std::partial_sum(start.begin(), start.end(), start.begin());
    for (int64_t i = 0; i < n; ++i) sorted[start[max_len - tokens[i]]++] = i;
    return sorted;
  }
  std::vector<std::pair<int64_t, int64_t>> keys(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = {-tokens[i], i};
  std::sort(keys.begin(), keys.end());
  for (int64_t i = 0; i < n; ++i) sorted[i] = keys[i].second;
  return sorted;
}

Plan first_fit_decreasing(const int64_t* tokens, int64_t n, int64_t budget) {
  const std::vector<int64_t> sorted = longest_first(tokens, n, budget);
  // First fit leaves at most one bin half empty, which bounds the bins to open.
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += tokens[i];
  CapacityTree tree(std::max<int64_t>(std::min(n, 2 * (total / budget) + 2), 1), budget);

  std::vector<int64_t> bin_of(n);
  int64_t num_bins = 0;
  for (int64_t k = 0; k < n;) {
    // A run of equal lengths fills each chosen bin as far as it goes: bins left of it stay too full, so
    // one-by-one first fit would pick the same bin again.
    const int64_t size = tokens[sorted[k]];
    const int64_t bin = tree.leftmost_fit(size);
    const int64_t fit = tree.capacity(bin) / size;
    int64_t placed = 0;
    for (; k < n && placed < fit && tokens[sorted[k]] == size; ++k, ++placed) bin_of[sorted[k]] = bin;
    tree.take(bin, placed * size);
    num_bins = std::max(num_bins, bin + 1);
  }

  // Counting sort by bin, visiting pairs in planning order, so each bin lists its pairs as they were placed.
  Plan plan{std::vector<int64_t>(num_bins + 1, 0), std::vector<int64_t>(n)};
  for (int64_t i = 0; i < n; ++i) ++plan.offsets[bin_of[i] + 1];
  std::partial_sum(plan.offsets.begin(), plan.offsets.end(), plan.offsets.begin());
  std::vector<int64_t> cursor(plan.offsets.begin(), plan.offsets.end() - 1);
  for (int64_t i : sorted) plan.order[cursor[bin_of[i]]++] = i;
  return plan;
}

std::vector<int64_t> longest_processing_time(const int64_t* tokens, int64_t m, int64_t num_groups) {
  std::vector<int64_t> sorted(m);
  std::iota(sorted.begin(), sorted.end(), 0);
  std::stable_sort(sorted.begin(), sorted.end(), [tokens](int64_t a, int64_t b) { return tokens[a] > tokens[b]; });

  // Min-heap on (load, group): the least-loaded group wins, the lowest group index breaks ties.
  using Entry = std::pair<int64_t, int64_t>;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (int64_t g = 0; g < num_groups; ++g) heap.emplace(0, g);
  std::vector<int64_t> group_of(m);
  for (int64_t i : sorted) {
    auto [load, group] = heap.top();
    heap.pop();
    group_of[i] = group;
    heap.emplace(load + tokens[i], group);
  }
  return group_of;
}

I64Array to_array(const std::vector<int64_t>& values) {
  I64Array out(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), out.mutable_data());
  return out;
}

void check_1d(const I64Array& array, const char* name) {
  if (array.ndim() != 1) {
    throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(array.ndim()) + " dims");
  }
}

py::tuple plan_bins(const I64Array& pair_tokens, int64_t budget) {
  check_1d(pair_tokens, "pair_tokens");
  if (budget <= 0) throw py::value_error("budget must be positive, got " + std::to_string(budget));
  const int64_t n = pair_tokens.shape(0);
  const int64_t* tokens = pair_tokens.data();
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] <= 0) {
      throw py::value_error("pair " + std::to_string(i) + " has " + std::to_string(tokens[i]) +
                            " tokens, expected a positive count");
    }
    if (tokens[i] > budget) {
      throw py::value_error("pair " + std::to_string(i) + " has " + std::to_string(tokens[i]) +
                            " tokens, more than the budget of " + std::to_string(budget));
    }
  }
  Plan plan;
  {
    py::gil_scoped_release release;
    plan = first_fit_decreasing(tokens, n, budget);
  }
  return py::make_tuple(to_array(plan.offsets), to_array(plan.order));
}

I64Array balance_bins(const I64Array& bin_tokens, int64_t num_groups) {
  check_1d(bin_tokens, "bin_tokens");
  if (num_groups <= 0) throw py::value_error("num_groups must be positive, got " + std::to_string(num_groups));
  const int64_t m = bin_tokens.shape(0);
  const int64_t* tokens = bin_tokens.data();
  for (int64_t i = 0; i < m; ++i) {
    if (tokens[i] < 0) {
      throw py::value_error("bin " + std::to_string(i) + " has " + std::to_string(tokens[i]) +
                            " tokens, expected a non-negative count");
    }
  }
  std::vector<int64_t> groups;
  {
    py::gil_scoped_release release;
    groups = longest_processing_time(tokens, m, num_groups);
  }
  return to_array(groups);
}

}  // namespace

void bind_pack_planner(py::module_& m) {
  m.def("plan_bins", &plan_bins, py::arg("pair_tokens"), py::arg("budget"),
        "First-fit-decreasing packing of pairs into bins of at most `budget` tokens.\n\n"
        "Returns (bin_offsets int64[n_bins+1], order int64[n]): bin b holds pairs "
        "order[bin_offsets[b]:bin_offsets[b+1]], in placement order.");
  m.def("balance_bins", &balance_bins, py::arg("bin_tokens"), py::arg("num_groups"),
        "LPT assignment of bins to groups: largest bin first, to the least-loaded group (lowest index on "
        "ties). Returns int64[m] group of each bin.");
}
