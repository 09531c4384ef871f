"""gunicorn settings for production: `gunicorn -c gunicorn.conf.py` (no --reload, ever).

Every value can be overridden on the command line or with GUNICORN_CMD_ARGS. Worker count and
llama.cpp threads follow llm_api.core.serving.plan (see docs/deployment.md):
  upstream-only registry → (2 × cores) + 1 workers; local models → one worker per model copy
  (LLM_API_WORKERS, default 1), the cores split between them.
"""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Any

from llm_api.core import worker_readiness
from llm_api.core.config import Settings
from llm_api.core.cpus import available_cpus
from llm_api.core.serving import plan
from llm_api.services.llm.registry import load_registry

_settings = Settings()
_plan = plan(_settings, load_registry(_settings.models_file), available_cpus(), os.environ)
if _plan.llama_threads is not None:
    os.environ.setdefault("LLM_API_LLAMA_THREADS", str(_plan.llama_threads))

# Prometheus multiprocess mode: every worker writes its metrics to files in this directory and
# /metrics merges them. It must be set before any worker imports prometheus_client.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="llm-api-prom-"))

wsgi_app = "llm_api.asgi:app"
worker_class = "llm_api.gunicorn_worker.Worker"  # uvicorn's, with a bounded request head
workers = _plan.workers
# PORT: what PaaS platforms (Render, Railway, Heroku) tell the app to listen on.
_port = os.environ.get("PORT")
bind = os.environ.get(
    "GUNICORN_BIND", f"0.0.0.0:{_port}" if _port else f"{_settings.host}:{_settings.port}"
)
preload_app = False  # each worker loads its own models; llama.cpp state does not survive fork

# Recycle workers now and then (slow leaks); jitter so they do not all restart at once. With local
# models a restart reloads the model, so recycle far less often.
max_requests = int(
    os.environ.get("GUNICORN_MAX_REQUESTS", 10_000 if _plan.has_local_models else 1000)
)
max_requests_jitter = max(1, max_requests // 10)

# For uvicorn workers `timeout` is a heartbeat sent from the event loop, not a request deadline:
# a stream of any length is fine as long as the loop runs. A stuck loop is killed after this.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 120))
# SIGTERM → drain (LLM_API_DRAIN_TIMEOUT) → exit; gunicorn must wait longer before SIGKILL.
graceful_timeout = int(_settings.drain_timeout) + 15
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", 5))

accesslog = None  # llm-api writes its own access log (middleware/access_log.py)
errorlog = "-"
loglevel = _settings.log_level.lower()
# The server itself believes no X-Forwarded-For: the app's ProxyHeadersMiddleware does that,
# only for LLM_API_TRUSTED_PROXIES (walked right to left). Gunicorn's default would trust loopback.
forwarded_allow_ips = ""
if os.path.isdir("/dev/shm"):  # noqa: S108 - gunicorn's documented choice in containers
    worker_tmp_dir = "/dev/shm"  # noqa: S108 - heartbeat file off the (possibly slow) container disk


def on_starting(server: Any) -> None:
    """Refuse a public bind with the development JWT secret (`--bind` on the command line wins
    over `bind` above, so the final addresses are checked here). A fresh start must not merge
    stale values or readiness of a previous run's workers."""
    from gunicorn.util import parse_address

    for address in server.cfg.bind if server is not None else ():
        parsed = parse_address(address)
        if isinstance(parsed, tuple):  # a unix socket (a path) serves this machine only
            try:
                _settings.refuse_public_bind(str(parsed[0]))
            except ValueError as exc:
                raise SystemExit(f"Refusing to bind {address}: {exc}") from None
    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(path)
    worker_readiness.clear(os.environ["PROMETHEUS_MULTIPROC_DIR"])


def post_fork(server: Any, worker: Any) -> None:
    """Tell the worker how many workers /ready must wait for (core/worker_readiness.py)."""
    os.environ[worker_readiness.WORKERS_ENV] = str(server.num_workers)


def child_exit(server: Any, worker: Any) -> None:
    """Drop the dead worker's live gauges (requests running/waiting, memory) and readiness."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
    worker_readiness.clear(os.environ["PROMETHEUS_MULTIPROC_DIR"], worker.pid)
