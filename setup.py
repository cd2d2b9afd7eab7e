"""Builds normlab's C++ kernels (src/normlab/nn/csrc: BatchNorm, the diagnostics' statistics)
against the installed torch.

The kernels need torch at build time: ``pip install --no-build-isolation`` (as the
Makefile does) with torch installed first. Where torch is not importable, as in
an isolated build, normlab installs without them and runs on ATen
operators (``normlab.nn.kernel``).
"""

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    setup()
else:
    kernel = CppExtension(
        "normlab.nn._kernels_cpu",
        ["src/normlab/nn/csrc/batchnorm.cpp", "src/normlab/nn/csrc/stats.cpp"],
        extra_compile_args=["-O3", "-fopenmp"],
    )
    setup(ext_modules=[kernel], cmdclass={"build_ext": BuildExtension})
