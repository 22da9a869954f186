// The fastdpo._C extension: each source file binds its own functions here.

#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_pack_planner(py::module_& m);
void bind_softmax_moments(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdpo's C++ helpers: the pack planner (first-fit-decreasing bins, LPT rank balancing) and "
            "the torch backend's softmax moments. Each has a Python twin with identical results.";
  bind_pack_planner(m);
  bind_softmax_moments(m);
}
