"""Builds normlab's C++ BatchNorm kernel (src/normlab/nn/csrc) against the installed torch.

The kernel needs torch at build time: ``pip install --no-build-isolation`` (as the
Makefile does) with torch installed first. Where torch is not importable, as in
an isolated build, normlab installs without it and its BatchNorm runs on ATen
operators (``normlab.nn.kernel``).
"""

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    setup()
else:
    kernel = CppExtension(
        "normlab.nn._batchnorm_cpu",
        ["src/normlab/nn/csrc/batchnorm.cpp"],
        extra_compile_args=["-O3", "-fopenmp"],
    )
    setup(ext_modules=[kernel], cmdclass={"build_ext": BuildExtension})
