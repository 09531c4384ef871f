"""Build llama.cpp's `llama-server` once, from the llama.cpp sources vendored in the
llama-cpp-python sdist we run, into a cache directory outside the repository.

Same sources as our in-process engine, so the comparison is engine against engine, not version
against version. Built under `nice -n 19` because the machine is shared.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

log = logging.getLogger("bench")

_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
DEFAULT_CMAKE_ARGS = f"-DCMAKE_C_FLAGS='{_NO_AMX}' -DCMAKE_CXX_FLAGS='{_NO_AMX}'"  # = Makefile's
CACHE_DIR = Path(os.environ.get("LLM_API_BENCH_CACHE", "~/.cache/llm-api-bench")).expanduser()


def llama_cpp_python_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def _sources(cache: Path, version: str) -> Path:
    src = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        # pip is the ordinary client for the registry; --no-binary gets the sdist, which
        # vendors the exact llama.cpp commit this llama-cpp-python release was built from.
        pkg = f"llama-cpp-python=={version}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        subprocess.run([*cmd, "--no-binary", ":all:", pkg, "-d", str(cache)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return src


def ensure_llama_server(cache: Path = CACHE_DIR) -> Path:
    """Return the path to a built llama-server binary, building it the first time (minutes)."""
    version = llama_cpp_python_version()
    # The same CPU flags our llama-cpp-python wheel was built with: the Makefile exports them;
    # run without make, the Makefile's default (a build with AMX kernels dies with SIGILL on
    # hosts whose CPU reports AMX that the hypervisor does not provide). One build per flag set.
    cpu_flags = shlex.split(os.environ.get("CMAKE_ARGS", DEFAULT_CMAKE_ARGS))
    tag = hashlib.sha256(" ".join(cpu_flags).encode()).hexdigest()[:8]
    build = cache / f"build-{version}-{tag}"
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    src = _sources(cache, version)
    log.info("building llama-server from %s (once; several minutes)", src)
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        *cpu_flags,
    ]
    nice = ["nice", "-n", "19"]
    subprocess.run(
        [*nice, "cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", *flags], check=True
    )
    jobs = str(os.cpu_count() or 1)
    subprocess.run(
        [*nice, "cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True
    )
    return binary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.stdout.write(f"{ensure_llama_server()}\n")
