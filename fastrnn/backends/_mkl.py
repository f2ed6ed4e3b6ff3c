"""Optional Intel MKL for the numba backend's matrix products.

`pip install -e ".[mkl]"` installs the `mkl` wheel, which puts the single
dynamic library `libmkl_rt.so.3` (`mkl_rt.2.dll`, `libmkl_rt.2.dylib`) in
`<sys.prefix>/lib` (`Library/bin` on Windows). This module finds it, loads it
with ctypes, configures it, and exposes the addresses of the C functions the
compiled kernels call (`cblas_?gemm`, and the packed-GEMM API
`cblas_?gemm_pack_get_size`, `cblas_?gemm_pack`, `cblas_?gemm_compute`).
It does not import numba; the kernels receive the addresses as int64 numbers
(numba_cpu.py), so numba's on-disk cache of the kernels stays valid across
processes.

Configuration, before the first MKL call (each one only when the user has
not chosen otherwise through MKL's own environment variable):
- interface LP64 (32-bit integers: the kernels pass int32 sizes);
- threading layer TBB (`MKL_THREADING_LAYER`), with `libtbb` (the `tbb`
  wheel, a dependency of the `mkl` wheel) loaded first: MKL exits the
  process when it cannot load its TBB layer. The kernels split the work over
  the cores themselves (prange) and call MKL from every chunk, so each chunk
  sets MKL to one thread for its own thread (`MKL_Set_Num_Threads_Local`,
  whose address is `set_threads_local`): MKL never starts threads inside
  them, whatever the layer.
  Why not SEQUENTIAL: libmkl_rt loads its libraries with global symbols,
  and a library loaded later that links MKL statically with exported
  symbols (PyTorch's CPU wheel) then calls this MKL. PyTorch sets its
  thread count from mkl_get_max_threads(), which is 1 under SEQUENTIAL:
  measured here, torch's LSTM training step ran 1.9x slower (one thread)
  when fastrnn had loaded MKL sequential before torch ran, and as fast as
  without it (2 threads) with the TBB layer. Not INTEL either: it would
  load Intel's OpenMP runtime next to the GNU one of torch and numba.
  Without a loadable libtbb the layer is SEQUENTIAL (and `note` says so).
- the instruction set is left to MKL. On AMD CPUs MKL loads its generic
  kernel library (libmkl_def) whatever MKL_ENABLE_INSTRUCTIONS or
  mkl_enable_instructions(AVX2) say (the call returns 0 there); measured on
  the 2-core AMD EPYC (Zen 2) dev machine with MKL 2026.2, single-threaded
  sgemm at (8..32 x 128..512) x (.. x 512..2048) ran at the same 31-70
  GFLOP/s with and without MKL_ENABLE_INSTRUCTIONS=AVX2, so nothing is set.

`load()` returns the loaded library (an `Mkl`), or raises `MklUnavailable`
whose message says why (not installed, wrong interface, ...). `status()`
never raises: `(ok, reason)`.
"""
import ctypes
import ctypes.util
import os
import site
import sys

__all__ = ["Mkl", "MklUnavailable", "load", "status", "candidates"]

# mkl_service.h
INTERFACE_LP64 = 0
THREADING = {0: "INTEL", 1: "SEQUENTIAL", 2: "PGI", 3: "GNU", 4: "TBB"}
THREADING_SEQUENTIAL, THREADING_TBB = 1, 4
# mkl_cblas.h
ROW_MAJOR = 101
NO_TRANS, TRANS = 111, 112
PACKED = 151
A_MATRIX, B_MATRIX = 161, 162

_NAMES = {"linux": ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"),
          "darwin": ("libmkl_rt.2.dylib", "libmkl_rt.dylib"),
          "win32": ("mkl_rt.2.dll", "mkl_rt.dll")}
_TBB_NAMES = {"linux": ("libtbb.so.12",), "darwin": ("libtbb.12.dylib",),
              "win32": ("tbb12.dll",)}


class MklUnavailable(RuntimeError):
    pass


def _lib_dirs():
    """<prefix>/lib (Library/bin on Windows) of this interpreter's prefixes
    and of the user base: where the mkl and tbb wheels put their libraries."""
    out = []
    sub = ("Library", "bin") if sys.platform == "win32" else ("lib",)
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix,
              getattr(site, "USER_BASE", None) or ""):
        d = os.path.join(p, *sub) if p else ""
        if d and d not in out:
            out.append(d)
    return out


def candidates():
    """Paths where the mkl wheel (or a conda MKL) puts libmkl_rt, in order:
    <prefix>/lib (Library/bin on Windows) for this interpreter's prefixes
    and the user base, then bare names for the dynamic loader's own search
    (LD_LIBRARY_PATH, ...). $FASTRNN_MKL_LIB, when set, is the only one."""
    explicit = os.environ.get("FASTRNN_MKL_LIB")
    if explicit:
        return [explicit]
    names = _NAMES.get(sys.platform, _NAMES["linux"])
    out = [os.path.join(d, n) for d in _lib_dirs() for n in names]
    out.extend(names)
    found = ctypes.util.find_library("mkl_rt")
    if found:
        out.append(found)
    return out


class Mkl:
    """The loaded library: `path`, `version`, `threading`, `note`, and the
    int64 addresses `gemm[dtype]`, `pack[dtype]`, `compute[dtype]`
    (dtype 'f' float32 / 'd' float64) and `set_threads_local`."""

    def __init__(self, lib, path):
        self.lib = lib
        self.path = path
        self._configure()
        self.gemm, self.pack, self.compute, self._get_size = {}, {}, {}, {}
        for t, c in (("f", "s"), ("d", "d")):
            self.gemm[t] = self._addr(f"cblas_{c}gemm")
            self.pack[t] = self._addr(f"cblas_{c}gemm_pack")
            self.compute[t] = self._addr(f"cblas_{c}gemm_compute")
            fn = getattr(lib, f"cblas_{c}gemm_pack_get_size")
            fn.restype = ctypes.c_size_t
            fn.argtypes = [ctypes.c_int] * 4
            self._get_size[t] = fn
        self.set_threads_local = self._addr("MKL_Set_Num_Threads_Local")
        buf = ctypes.create_string_buffer(256)
        try:
            lib.MKL_Get_Version_String(buf, 256)
            self.version = buf.value.decode(errors="replace").strip()
        except Exception:
            self.version = "?"

    def _addr(self, name):
        try:
            return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value
        except AttributeError:
            raise MklUnavailable(f"{self.path} has no {name}") from None

    def _configure(self):
        lib = self.lib
        # sizes are passed as 32-bit ints by the kernels
        if "MKL_INTERFACE_LAYER" in os.environ and \
                os.environ["MKL_INTERFACE_LAYER"].upper().split(",")[0] != "LP64":
            raise MklUnavailable(
                "MKL_INTERFACE_LAYER=" + os.environ["MKL_INTERFACE_LAYER"]
                + ": fastrnn calls MKL with 32-bit integers (LP64)")
        lib.MKL_Set_Interface_Layer.argtypes = [ctypes.c_int]
        lib.MKL_Set_Interface_Layer.restype = ctypes.c_int
        got = lib.MKL_Set_Interface_Layer(INTERFACE_LP64)
        if got != INTERFACE_LP64:
            raise MklUnavailable(f"MKL interface layer is {got}, not LP64 "
                                 "(already set in this process)")
        # threading: TBB (SEQUENTIAL without libtbb) unless the user chose
        self.note = ""
        lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
        lib.MKL_Set_Threading_Layer.restype = ctypes.c_int
        env = os.environ.get("MKL_THREADING_LAYER")
        if env:
            if env.strip().upper() == "TBB" and not self._load_tbb():
                raise MklUnavailable("MKL_THREADING_LAYER=TBB but libtbb "
                                     "cannot be loaded")
            self.threading = f"{env.strip().upper()} (MKL_THREADING_LAYER)"
        elif self._load_tbb():
            code = lib.MKL_Set_Threading_Layer(THREADING_TBB)
            self.threading = THREADING.get(code, str(code))
        else:
            code = lib.MKL_Set_Threading_Layer(THREADING_SEQUENTIAL)
            self.threading = THREADING.get(code, str(code))
            self.note = ("libtbb not found, so MKL is sequential: a library "
                         "loaded later that uses MKL (torch) runs on one thread")

    def _load_tbb(self):
        """Load libtbb (for MKL's TBB layer) from beside libmkl_rt, the
        prefixes' lib directories, or the loader's search; True if loaded."""
        names = _TBB_NAMES.get(sys.platform, _TBB_NAMES["linux"])
        dirs = [os.path.dirname(self.path)] if os.path.isabs(self.path) else []
        paths = [os.path.join(d, n) for d in dirs + _lib_dirs() for n in names]
        for p in paths + list(names):
            if os.path.isabs(p) and not os.path.exists(p):
                continue
            try:
                self._tbb = ctypes.CDLL(p)
                return True
            except OSError:
                pass
        return False

    def pack_size(self, dtype_char, identifier, m, n, k):
        """Bytes of a packed matrix (cblas_?gemm_pack_get_size)."""
        return int(self._get_size[dtype_char](identifier, m, n, k))

    def describe(self):
        v = self.version
        if "Version " in v:
            v = v.split("Version ", 1)[1].split("-", 1)[0].split(" ", 1)[0]
        return f"MKL {v}, threading {self.threading}" + (
            f" ({self.note})" if self.note else "")


_state = {}


def load():
    """The configured library (loaded once per process), or MklUnavailable."""
    if "mkl" in _state:
        return _state["mkl"]
    if "error" in _state:
        raise MklUnavailable(_state["error"])
    tried = []
    lib = path = None
    for cand in candidates():
        if os.path.isabs(cand) and not os.path.exists(cand):
            continue
        try:
            lib = ctypes.CDLL(cand)
            path = cand
            break
        except OSError as e:
            tried.append(f"{cand}: {e}")
    try:
        if lib is None:
            where = (f"FASTRNN_MKL_LIB={os.environ['FASTRNN_MKL_LIB']}"
                     if os.environ.get("FASTRNN_MKL_LIB") else
                     f"no libmkl_rt in {os.path.join(sys.prefix, 'lib')} nor "
                     "on the loader's path")
            raise MklUnavailable(
                f"MKL is not installed ({where}; pip install -e \".[mkl]\" "
                "or pip install mkl)"
                + (f"; tried {'; '.join(tried)}" if tried else ""))
        _state["mkl"] = Mkl(lib, path)
    except MklUnavailable as e:
        _state["error"] = str(e)
        raise
    except Exception as e:  # a broken install: unexpected symbols, ...
        _state["error"] = f"{type(e).__name__}: {e}"
        raise MklUnavailable(_state["error"]) from e
    return _state["mkl"]


def status():
    """(True, description) when MKL loads, else (False, reason)."""
    try:
        return True, load().describe()
    except MklUnavailable as e:
        return False, str(e)
