"""How many server processes to run, and with how many llama.cpp threads each (read by
gunicorn.conf.py; documented in docs/deployment.md).

The rule (the guide's): an upstream-only deployment is I/O-bound, so (2 × cores) + 1 workers.
With local models every worker loads its own copy of every local model, so the worker count is
the number of model copies memory allows: one unless you say otherwise, and the cores are split
between them so llama.cpp threads do not fight over the same cores.
Explicit settings win: LLM_API_WORKERS, then WEB_CONCURRENCY (set by Render, Heroku and others).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llm_api.core.config import Settings
from llm_api.services.llm.registry import Registry


@dataclass(frozen=True)
class ServingPlan:
    workers: int
    llama_threads: int | None  # None: no local models, nothing to split
    has_local_models: bool


def plan(settings: Settings, registry: Registry, cores: int, env: Mapping[str, str]) -> ServingPlan:
    local = any(m.backend == "llama_cpp" for m in registry.models)
    if "workers" in settings.model_fields_set:
        workers = settings.workers
    elif env.get("WEB_CONCURRENCY", "").isdigit() and int(env["WEB_CONCURRENCY"]) > 0:
        workers = int(env["WEB_CONCURRENCY"])
    else:
        workers = 1 if local else 2 * cores + 1
    threads = None
    if local:
        threads = settings.llama_threads or max(1, cores // workers)
    return ServingPlan(workers=workers, llama_threads=threads, has_local_models=local)
