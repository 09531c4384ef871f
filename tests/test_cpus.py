"""llama.cpp threads follow the CPUs this process may use (core/cpus.py), and OpenMP spins only
~10 µs at a barrier, set before llama.cpp's OpenMP runtime loads (services/llm/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_api.core.cpus import available_cpus


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", None), ("150000 100000", 1), ("100000 100000", 1), ("50000 100000", 1)],
)
def test_cgroup_v2_quota_caps_the_affinity(tmp_path: Path, cpu_max: str, expected: int) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (expected if expected is not None else affinity)


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))  # -1: no quota
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1


def test_affinity_limits_threads(tmp_path: Path) -> None:
    """Under `taskset -c 0` the process may use one CPU whatever the host has."""
    code = (
        "import os; os.sched_setaffinity(0, {0}); "
        "from llm_api.core.cpus import available_cpus; print(available_cpus())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_openmp_spins_briefly_unless_the_operator_says_otherwise() -> None:
    code = (
        "import os, llm_api.services.llm.backends.llama_batched; "
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.stdout.split() == ["1000", "None"], run.stderr
    for name, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")):
        own = {**env, name: value}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=own)
        expected = ["None", value] if name == "OMP_WAIT_POLICY" else [value, "None"]
        assert run.stdout.split() == expected, run.stderr
