"""Find and load TensorRT: the `tensorrt` module when installed, otherwise TensorRT for RTX.

TensorRT for RTX from PyPI (tensorrt-rtx-cu13-libs + tensorrt-rtx-cu13-bindings) installs the Python module
`tensorrt_rtx_bindings` (the same API as `tensorrt`) and its libraries in `tensorrt_rtx_libs/`, versioned names only
(`libtensorrt_rtx.so.1`). When the ONNX parser resolves a custom op to a plugin, the library dlopens the unversioned
`libtensorrt_rtx.so` through its own RPATH ($ORIGIN) and the process aborts ("terminate called") if that name does
not exist. LD_LIBRARY_PATH is read only when a process starts, so instead the libraries are loaded, before the
bindings load them, through symlinks in a private directory that also carries the unversioned name: $ORIGIN is then
that directory, and the dlopen finds the library that is already loaded.

All TensorRT objects of a process share one logger (TensorRT keeps the first one it is given); `capture()` collects
what it reports while a parse, build or deserialization runs, so failures can name TensorRT's own messages.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib
import importlib.util
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from adaskip.errors import AdaskipError

# (flavour, Python module, package holding its shared libraries) in order of preference
_CANDIDATES = (
    ("tensorrt", "tensorrt", None),
    ("tensorrt-rtx", "tensorrt_rtx", "tensorrt_rtx_libs"),
    ("tensorrt-rtx", "tensorrt_rtx_bindings", "tensorrt_rtx_libs"),
)


class TensorRTError(AdaskipError):
    """TensorRT is missing, or cannot parse, build or load an engine (the message carries TensorRT's words)."""


@dataclass(frozen=True)
class TensorRT:
    trt: Any  # the module
    flavour: str  # "tensorrt" | "tensorrt-rtx"
    module: str
    version: str
    logger: Any  # the process-wide CapturingLogger

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    def describe(self) -> dict[str, str]:
        return {"flavour": self.flavour, "module": self.module, "version": self.version}


@functools.lru_cache(maxsize=None)
def load_tensorrt() -> TensorRT:
    """Import TensorRT once per process (the first installed candidate) and make its ONNX parser's plugin path work."""
    problems = []
    for flavour, module, libs in _CANDIDATES:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            if libs:
                _preload(libs, module)
            mod = importlib.import_module(module)
        except (ImportError, OSError) as e:  # e.g. a placeholder wheel, or libraries for another CUDA
            problems.append(f"{module}: {e}")
            continue
        return TensorRT(mod, flavour, module, str(getattr(mod, "__version__", "unknown")), _make_logger(mod))
    found = f" ({'; '.join(problems)})" if problems else ""
    raise TensorRTError("TensorRT is not available: install the TensorRT extra (pip install 'adaskip[tensorrt]': "
                        f"TensorRT for RTX, which builds engines without a GPU) or NVIDIA's tensorrt wheel{found}")


def _preload(libs_package: str, module: str) -> None:
    if module in sys.modules or libs_package in sys.modules:  # loaded by someone else from its own directory
        _check_unversioned(libs_package)
        return
    spec = importlib.util.find_spec(libs_package)
    if spec is None or not spec.submodule_search_locations:
        return
    source = Path(list(spec.submodule_search_locations)[0])
    libs = sorted(source.glob("lib*.so.*"))
    if not libs:
        return
    private = Path(tempfile.mkdtemp(prefix="adaskip-trt-libs-"))
    atexit.register(shutil.rmtree, private, True)  # the symlinks must outlive every parse of this process
    for lib in libs:
        (private / lib.name).symlink_to(lib)
        unversioned = private / (lib.name.split(".so.")[0] + ".so")
        if not unversioned.exists():
            unversioned.symlink_to(lib)
    for lib in sorted(libs, key=lambda p: "parser" in p.name):  # the core library before the parser that needs it
        ctypes.CDLL(str(private / lib.name), mode=ctypes.RTLD_GLOBAL)


def _check_unversioned(libs_package: str) -> None:
    name = "libtensorrt_rtx.so"
    try:
        ctypes.CDLL(name)
    except OSError:
        raise TensorRTError(f"TensorRT for RTX was loaded before adaskip could prepare it ({libs_package} is already "
                            f"imported) and {name} cannot be found, which its ONNX parser needs for plugins: import "
                            f"adaskip.runtime.trt before TensorRT, or start Python with a directory holding {name} (a "
                            f"symlink to {name}.1) on LD_LIBRARY_PATH") from None


def _make_logger(trt: Any) -> Any:
    class CapturingLogger(trt.ILogger):
        """Keeps warnings and errors of the section being captured; prints nothing (errors reach the user through
        TensorRTError, warnings through the manifest)."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._lock = threading.Lock()
            self._sink: list[tuple[str, str]] | None = None

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) > int(trt.ILogger.Severity.WARNING):
                return
            with self._lock:
                if self._sink is not None:
                    self._sink.append((severity.name, msg))

        @contextlib.contextmanager
        def capture(self) -> Iterator[list[tuple[str, str]]]:
            sink: list[tuple[str, str]] = []
            with self._lock:
                previous, self._sink = self._sink, sink
            try:
                yield sink
            finally:
                with self._lock:
                    self._sink = previous

    return CapturingLogger()


def errors_of(messages: list[tuple[str, str]]) -> list[str]:
    return [m for severity, m in messages if severity in ("ERROR", "INTERNAL_ERROR")]


def warnings_of(messages: list[tuple[str, str]]) -> list[str]:
    """Distinct warnings, in order (TensorRT repeats some per input or per layer)."""
    return list(dict.fromkeys(m for severity, m in messages if severity == "WARNING"))
