"""Build of the optional C extension fastrnn._cfused; every other piece of
metadata lives in pyproject.toml (cffi's cffi_modules needs a setup.py).

The extension is optional: where it cannot be compiled (no C compiler, no
Python headers) the build warns and fastrnn installs without it; the
reason is written to fastrnn/_cfused_build_error.txt, and
fastrnn.available_backends()["c"] reports it.
"""
import os
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import (BaseError, CCompilerError, CompileError,
                                   ExecError, LinkError, PlatformError)
    _BUILD_ERRORS = (BaseError, CCompilerError, CompileError, ExecError,
                     LinkError, PlatformError)
except ImportError:  # setuptools < 59
    from distutils.errors import (CCompilerError, CompileError,
                                  DistutilsError)
    _BUILD_ERRORS = (CCompilerError, CompileError, DistutilsError)
_BUILD_ERRORS += (OSError,)  # e.g. the compiler executable is missing

ERROR_FILE = "_cfused_build_error.txt"


class OptionalBuildExt(build_ext):
    """build_ext that never fails the installation: a failure is reported
    as a warning and recorded beside the package."""

    def _package_dir(self):
        if self.inplace:
            return self.get_finalized_command("build_py").get_package_dir("fastrnn")
        return os.path.join(self.build_lib, "fastrnn")

    def _failed(self, error):
        if self._error is None:   # keep the first, root cause
            self._error = f"{type(error).__name__}: {error}"
            warnings.warn("fastrnn: the optional C extension fastrnn._cfused "
                          f"could not be built ({self._error}); fastrnn is "
                          "installed without the 'c' backend")

    def run(self):
        self._error = None
        for ext in self.extensions:
            ext.optional = True   # an editable install then skips its copy
        try:
            super().run()
        except _BUILD_ERRORS as e:
            self._failed(e)
        path = os.path.join(self._package_dir(), ERROR_FILE)
        if self._error is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(self._error + "\n")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except _BUILD_ERRORS as e:
            self._failed(e)

    def get_outputs(self):
        # only what was actually built
        return [p for p in super().get_outputs() if os.path.exists(p)]


setup(
    cmdclass={"build_ext": OptionalBuildExt},
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
)
