"""Loading TFLite models: LiteRT first, ``tflite_runtime`` second, both imported lazily.

A Coral board may carry only ``tflite_runtime``; a workstation carries
``ai-edge-litert``. Both expose the same ``Interpreter`` and ``load_delegate``, and
both apply the XNNPACK delegate by default, which selfie segmentation needs for its
``Convolution2DTransposeBias`` op. Nothing here runs at import time.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_agent.errors import BadInput, DeviceError

log = logging.getLogger(__name__)

_RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def runtime() -> ModuleType:
    """The first TFLite runtime module that imports, or DeviceError naming both."""
    errors = []
    for name in _RUNTIMES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise DeviceError("no TFLite runtime: install ai-edge-litert (" + "; ".join(errors) + ")")


def load_interpreter(
    model_path: str | Path, *, threads: int, delegates: list[Any] | None = None
) -> Any:
    """An interpreter with tensors allocated, XNNPACK on ``threads`` threads (unless delegated)."""
    path = Path(model_path)
    if not path.is_file():
        raise BadInput(f"model file {path} not found (run `make models` to unpack it)")
    rt = runtime()
    try:
        interpreter = rt.Interpreter(
            model_path=str(path), num_threads=threads, experimental_delegates=delegates
        )
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise BadInput(f"model file {path} cannot be loaded: {_first_line(e)}") from None
    log.debug("loaded %s with %d threads via %s", path.name, threads, rt.__name__)
    return interpreter


def load_delegate(library: str, options: dict[str, str]) -> Any:
    """Load an external delegate, raising OSError or ValueError with the real cause.

    The shared library is opened with ctypes first: when it is missing that gives the
    loader's own message ("libedgetpu.so.1: cannot open shared object file ...") and
    avoids the runtime's half-built ``Delegate`` object complaining at garbage collection.
    """
    lib = ctypes.CDLL(library)
    if not hasattr(lib, "tflite_plugin_create_delegate"):
        raise ValueError(f"{library} is not a TFLite external delegate")
    return runtime().load_delegate(library, options)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
