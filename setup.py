"""Build script: maps kernels/ to fastdpo.kernels and builds the optional C++ helpers (fastdpo._C)."""

import os

from setuptools import find_packages, setup

ext_modules = []
if os.environ.get("FASTDPO_NO_EXT", "0") != "1":
    try:
        from pybind11.setup_helpers import Pybind11Extension

        ext_modules.append(
            Pybind11Extension(
                "fastdpo._C",
                ["csrc/module.cpp", "csrc/pack_planner.cpp", "csrc/softmax_moments.cpp"],
                cxx_std=17,
                # No FMA contraction: the numpy twins round every product, and must give the same bits.
                extra_compile_args=["-O3", "-ffp-contract=off"],
                optional=True,
            )
        )
    except ImportError:  # pybind11 missing: the numpy twins take over, with identical output
        pass

setup(
    # Every package under fastdpo/ is found automatically; kernels/ is mapped in as fastdpo.kernels.
    packages=["fastdpo", *(f"fastdpo.{p}" for p in find_packages("fastdpo")), "fastdpo.kernels"],
    package_dir={"fastdpo": "fastdpo", "fastdpo.kernels": "kernels"},
    ext_modules=ext_modules,
)
