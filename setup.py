"""The C part of vnvdimm: the preload library (see vnvdimm/preload/), built with the system
compiler by `pip install`. It is a plain shared object for LD_PRELOAD, never imported by Python;
it is built as an extension only so that setuptools compiles and installs it with the package.

Optional: without a C compiler the install still succeeds (setuptools prints why the library
was not built), and `vnvdimm preload-path` and with-vnvdimm say that it is missing. Warnings
are errors only where VNVDIMM_WERROR=1 (CI, .ci/run): a user's newer compiler with a new
warning must not fail their install."""

import os

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "vnvdimm.preload._vnvdimm_preload",
    sources=["vnvdimm/preload/vnvdimm_preload.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=default",
                        *(["-Werror"] if os.environ.get("VNVDIMM_WERROR") == "1" else [])],
    libraries=["dl"],
    optional=True,
)])
