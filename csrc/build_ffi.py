"""cffi builder of the C extension ``fastrnn._cfused`` (API mode, out-of-line).

setup.py names it (``cffi_modules=["csrc/build_ffi.py:ffibuilder"]``), so
``pip install .`` / ``pip install -e .`` compile it; ``python
csrc/build_ffi.py`` builds it in place for development. The declarations
handed to cffi are the part of fastrnn.h between the cdef markers.

Compiler flags: -O3 -ffp-contract=fast (FMA where the CPU has it) and
-fno-trapping-math -fno-math-errno (lets the clamps and sqrt vectorise; FP
exception flags and errno are not part of fastrnn's contract). Never
-ffast-math: NaN and inf must propagate as in NumPy. No -march: the kernels
carry their own AVX2+FMA clones chosen at load time (see fastrnn.c), so a
wheel built here runs on any x86-64.
"""
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "fastrnn.h")
SOURCES = [os.path.join(HERE, "fastrnn.c")]
DEPENDS = [HEADER, os.path.join(HERE, "kernels.inc")]

if sys.platform == "win32":
    CFLAGS = ["/O2", "/fp:precise"]
    LIBRARIES = []
else:
    CFLAGS = ["-std=c99", "-O3", "-ffp-contract=fast", "-fno-trapping-math",
              "-fno-math-errno"]
    LIBRARIES = ["m"]


def cdef_text(path=HEADER):
    """The declarations between the cdef markers of fastrnn.h."""
    with open(path) as f:
        text = f.read()
    begin, end = "/* cdef-begin */", "/* cdef-end */"
    return text[text.index(begin) + len(begin):text.index(end)]


def _rel(path):
    """setuptools wants source paths relative to the project root (the
    working directory of setup.py); keep absolute ones elsewhere."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


def make_builder(path=_rel):
    """The FFI builder; path() maps each file path (relative for setup.py)."""
    builder = FFI()
    builder.cdef(cdef_text())
    builder.set_source(
        "fastrnn._cfused",
        '#include "fastrnn.h"',
        sources=[path(p) for p in SOURCES],
        depends=[path(p) for p in DEPENDS],
        include_dirs=[path(HERE)],
        extra_compile_args=CFLAGS,
        libraries=LIBRARIES,
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    # development build: compile under build/cffi, then put the module
    # beside the package sources (what `pip install -e .` also does)
    import shutil
    root = os.path.dirname(HERE)
    so = make_builder(path=lambda p: p).compile(
        tmpdir=os.path.join(root, "build", "cffi"), verbose=True)
    pkg = os.path.join(root, "fastrnn")
    for old in os.listdir(pkg):   # a stale build would shadow this one
        if old.startswith("_cfused") and old.endswith((".so", ".pyd")):
            os.remove(os.path.join(pkg, old))
    # the name setup.py gives it (cffi builds for the limited API)
    name = "_cfused.abi3.so" if os.name == "posix" else os.path.basename(so)
    dest = os.path.join(pkg, name)
    shutil.copyfile(so, dest)
    print("built", dest)
