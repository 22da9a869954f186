// Softmax moments for the torch backend's logit statistics: per row of an fp32 logits chunk z and its
// exponentials e = exp(z - max), the three sums sum(z), sum(e * z) and sum(e * e), in one pass over both.
// Eager torch needs five passes and two temporaries for them, more than the matmul at small hidden sizes.
//
// The summation order is fixed, so that the numpy twin (fastdpo/ops/_moments.py) gives identical bits:
// element j of a row goes to lane j % 16 of its block of 256 elements; each block's lanes start at zero
// and add their 16 elements in order; the blocks' lanes are added in order into lanes that start at zero;
// the 16 lanes are then added left to right. Products are rounded to fp32 before they are added (no FMA
// contraction: setup.py compiles with -ffp-contract=off).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 256;
// Below this many elements a second thread costs more to start than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 20;

// Four 4-wide vectors hold the 16 lanes: plain SSE2 / NEON, so the wheel needs no newer instruction set.
typedef float Vec4 __attribute__((vector_size(16)));

struct Lanes {
  Vec4 z[4], ez[4], ee[4];
};

inline Vec4 load4(const float* p) {
  Vec4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

void add_group(Lanes& acc, const float* z, const float* e) {
  for (int q = 0; q < 4; ++q) {
    const Vec4 zv = load4(z + 4 * q), ev = load4(e + 4 * q);
    acc.z[q] += zv;
    acc.ez[q] += ev * zv;
    acc.ee[q] += ev * ev;
  }
}

void add_lanes(Lanes& acc, const Lanes& block) {
  for (int q = 0; q < 4; ++q) {
    acc.z[q] += block.z[q];
    acc.ez[q] += block.ez[q];
    acc.ee[q] += block.ee[q];
  }
}

float sum_lanes(const Vec4 (&lanes)[4]) {
  float values[kLanes];
  std::memcpy(values, lanes, sizeof values);
  float total = values[0];
  for (int64_t l = 1; l < kLanes; ++l) total += values[l];
  return total;
}

void moments_rows(const float* z, int64_t z_stride, const float* e, int64_t e_stride, int64_t cols,
                  float* out, int64_t out_stride, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* zr = z + r * z_stride;
    const float* er = e + r * e_stride;
    Lanes total = {};
    for (int64_t b0 = 0; b0 < cols; b0 += kBlock) {
      const int64_t b1 = std::min(cols, b0 + kBlock);
      Lanes block = {};
      int64_t j = b0;
      for (; j + kLanes <= b1; j += kLanes) add_group(block, zr + j, er + j);
      if (j < b1) {
        // The last, partial group: zeros fill its missing lanes, as the twin's zero padding does.
        float zpad[kLanes] = {}, epad[kLanes] = {};
        std::copy(zr + j, zr + b1, zpad);
        std::copy(er + j, er + b1, epad);
        add_group(block, zpad, epad);
      }
      add_lanes(total, block);
    }
    out[r] = sum_lanes(total.z);
    out[out_stride + r] = sum_lanes(total.ez);
    out[2 * out_stride + r] = sum_lanes(total.ee);
  }
}

// No forcecast: an array of another dtype is refused, never silently copied (out would be lost).
using F32Array = py::array_t<float, 0>;

void check_rows(const F32Array& a, const char* name) {
  // An empty array's strides are whatever numpy chose; only real elements need unit steps along a row.
  if (a.ndim() != 2 || (a.shape(0) > 0 && a.shape(1) > 1 && a.strides(1) != sizeof(float))) {
    throw py::value_error(std::string(name) + " must be a 2-D float32 array with contiguous rows");
  }
}

// Writes out[0] = sum(z), out[1] = sum(e * z), out[2] = sum(e * e), each over every row of z and e.
void softmax_moments(const F32Array& z, const F32Array& e, F32Array& out, int64_t threads) {
  check_rows(z, "z");
  check_rows(e, "e");
  const int64_t rows = z.shape(0), cols = z.shape(1);
  if (e.shape(0) != rows || e.shape(1) != cols) throw py::value_error("z and e must have the same shape");
  if (out.ndim() != 2 || out.shape(0) != 3 || out.shape(1) != rows ||
      (rows > 1 && out.strides(1) != sizeof(float))) {
    throw py::value_error("out must be a float32 [3, rows] array with contiguous rows");
  }
  const float* zp = z.data();
  const float* ep = e.data();
  float* op = out.mutable_data();
  const int64_t zs = z.strides(0) / sizeof(float), es = e.strides(0) / sizeof(float);
  const int64_t os = out.strides(0) / sizeof(float);
  const int64_t workers = std::clamp<int64_t>(
      std::min(threads, rows * cols / kMinElementsPerThread), 1, std::max<int64_t>(rows, 1));
  py::gil_scoped_release release;
  if (workers == 1) {
    moments_rows(zp, zs, ep, es, cols, op, os, 0, rows);
    return;
  }
  // Rows are independent, so splitting them over threads leaves every bit as it is.
  std::vector<std::thread> pool;
  const int64_t per = (rows + workers - 1) / workers;
  for (int64_t begin = 0; begin < rows; begin += per) {
    pool.emplace_back(moments_rows, zp, zs, ep, es, cols, op, os, begin, std::min(rows, begin + per));
  }
  for (auto& t : pool) t.join();
}

}  // namespace

void bind_softmax_moments(py::module_& m) {
  m.def("softmax_moments", &softmax_moments, py::arg("z"), py::arg("e"), py::arg("out"), py::arg("threads"),
        "Writes sum(z), sum(e * z) and sum(e * e) of each row of the float32 [rows, cols] arrays z and e "
        "into out[0], out[1], out[2] (out: float32 [3, rows]), in the fixed order the numpy twin "
        "fastdpo.ops._moments.softmax_moments_numpy repeats; rows are split over up to `threads` threads.");
}
