"""The C part of vnvdimm: the preload library (see vnvdimm/preload/), built with the system
compiler by `pip install`. It is a plain shared object for LD_PRELOAD, never imported by Python;
it is built as an extension only so that setuptools compiles and installs it with the package."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "vnvdimm.preload._vnvdimm_preload",
    sources=["vnvdimm/preload/vnvdimm_preload.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=default"],
    libraries=["dl"],
)])
