"""Builds octoquant._C: the CPU int8 kernels (C++17, intrinsics, runtime ISA dispatch; no torch C++ API)."""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

ext = Pybind11Extension(
    "octoquant._C",
    ["octoquant/kernels/csrc/int8_kernels.cpp"],
    cxx_std=17,
    # No -march: each kernel carries its own target attribute and is chosen at run time by CPU features.
    # -ffp-contract=off: the epilogue's multiply and add stay separate IEEE ops, like the reference.
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
)
# optional: a machine without a compiler still installs; octoquant then uses the reference kernels (logged once).
ext.optional = True

setup(ext_modules=[ext])
