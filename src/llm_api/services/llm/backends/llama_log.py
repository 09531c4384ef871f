"""llama.cpp's log lines into Python logging (logger `llama_cpp`), at their real levels.

Why not llama-cpp-python's own callback (`llama_cpp._logger`, installed when it is imported):
it maps ggml's log levels as they were before ggml added DEBUG (its table reads 1 = INFO,
2 = WARN, 3 = ERROR, 4 = DEBUG; ggml.h now says 1 = DEBUG, 2 = INFO, 3 = WARN, 4 = ERROR), so
with `verbose` off it prints every warning straight to stderr and drops every error. Through
here warnings and errors reach the app's structured logs like any other library's; llama.cpp's
INFO lines (hundreds per model load) go to DEBUG, as quiet as `verbose=False` meant.

A cut-short `llama_decode` (engine/interrupt.py) is expected, not a fault: the lines llama.cpp
logs for it (the cells it drops, at WARN; the aborted graph, status 1, and return code 2, at
ERROR) go to DEBUG too.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import llama_cpp

logger = logging.getLogger("llama_cpp")

_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_CONT = 5  # continues the previous line
_ABORTED = (
    "removing memory module entries",
    "failed with error 1",  # GGML_STATUS_ABORTED
    "compute status: 1",
    "failed to decode, ret = 2",
)

_lock = threading.Lock()
_pending: list[str] = []
_pending_level = logging.DEBUG


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _on_log(level: int, text: bytes, _data: ctypes.c_void_p) -> None:
    global _pending_level
    piece = text.decode("utf-8", errors="replace")
    with _lock:  # llama.cpp may log from any thread, a line in several pieces
        if level != _CONT:
            _pending_level = _LEVELS.get(level, logging.ERROR)
        _pending.append(piece)
        if not piece.endswith("\n"):
            return
        line, lvl = "".join(_pending).rstrip(), _pending_level
        _pending.clear()
    if any(marker in line for marker in _ABORTED):
        lvl = logging.DEBUG
    if line and logger.isEnabledFor(lvl):
        logger.log(lvl, line)


def install() -> None:
    """Route llama.cpp's logging here (again: importing llama-cpp-python installs its own)."""
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))
