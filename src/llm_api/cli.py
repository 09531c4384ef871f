"""The `llm-api` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llm_api.cli_accounts import audit_app, db_app, keys_app, users_app

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="llm-api: serve LLMs over an OpenAI-compatible API.",
)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Bind port (default 8000).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    config: Annotated[Path | None, typer.Option(help="Model registry file (YAML/TOML).")] = None,
) -> None:
    """Serve the API with uvicorn (use gunicorn.conf.py in production)."""
    import os

    import uvicorn

    from llm_api.core.config import Settings, is_loopback_host
    from llm_api.http_server import server_options

    if config is not None:
        os.environ["LLM_API_MODELS_FILE"] = str(config)
    settings = Settings()
    if not settings.auth_enabled and not is_loopback_host(host or settings.host):
        raise typer.BadParameter("LLM_API_AUTH_ENABLED=false needs a loopback --host")
    try:
        settings.refuse_public_bind(host or settings.host)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--host") from None
    uvicorn.run(
        "llm_api.main:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers or settings.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        # Bounded request heads, no proxy headers, no server header; the fast path's protocol.
        **server_options(settings.fast_path),
    )


@app.command()
def models(
    config: Annotated[Path | None, typer.Option(help="Model registry file (YAML/TOML).")] = None,
) -> None:
    """List the models in the registry."""
    from rich.console import Console
    from rich.table import Table

    from llm_api.core.config import Settings
    from llm_api.services.llm.registry import load_registry

    registry = load_registry(config or Settings().models_file)
    table = Table("id", "backend", "context", "tier", "concurrency", "source")
    for m in registry.models:
        source = m.gguf if m.backend == "llama_cpp" else (m.base_url or "")
        table.add_row(
            m.id, m.backend, str(m.context_length), m.tier, str(m.concurrency), source or ""
        )
    Console().print(table)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Batches run at once by this worker.")] = 1,
) -> None:
    """Run a Celery worker for batch jobs (needs LLM_API_REDIS_URL)."""
    from llm_api.worker.tasks import app as celery_app

    celery_app.worker_main(
        [
            "worker",
            "--pool=threads" if concurrency > 1 else "--pool=solo",
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
        ]
    )


batch_app = typer.Typer(no_args_is_help=True, help="Batch jobs through the Batch API.")
app.add_typer(batch_app, name="batch")


@batch_app.command("submit")
def batch_submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL requests.")],
    model: Annotated[str | None, typer.Option(help="Model for every line.")] = None,
    endpoint: Annotated[str, typer.Option(help="Endpoint of the lines.")] = "/v1/chat/completions",
    wait: Annotated[bool, typer.Option(help="Wait for the batch and show progress.")] = False,
    output: Annotated[Path | None, typer.Option(help="Where to write the results.")] = None,
    base_url: Annotated[str, typer.Option(envvar="LLM_API_BASE_URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[str, typer.Option(envvar="LLM_API_KEY", help="An API key.")] = "",
) -> None:
    """Upload FILE, create a batch, optionally wait for it and write the output file."""
    import asyncio

    from llm_api.batch_cli import submit

    if not api_key:
        raise typer.BadParameter("set --api-key or LLM_API_KEY")
    out = output or (file.with_suffix(".output.jsonl") if wait else None)
    batch = asyncio.run(
        submit(
            file,
            base_url=base_url,
            api_key=api_key,
            model=model,
            endpoint=endpoint,
            wait=wait,
            output=out,
        )
    )
    typer.echo(f"{batch['id']} {batch['status']}")
    if wait and batch["status"] != "completed":
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
