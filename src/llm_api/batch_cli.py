"""`llm-api batch submit FILE --model M --wait`: a client of our own Batch API.

Uses aiohttp (already a runtime dependency) rather than the openai SDK so the server install
stays lean; the wire calls are the same ones `client.files` / `client.batches` make.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

TERMINAL = ("completed", "failed", "expired", "cancelled")


def prepare_lines(data: bytes, model: str | None, endpoint: str) -> bytes:
    """Set `model` on every line (when given) and fill in method/url/custom_id defaults, so a
    file of bare request bodies also works."""
    out: list[bytes] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        obj: dict[str, Any] = orjson.loads(raw)
        if "body" not in obj:
            obj = {"body": obj}
        obj.setdefault("custom_id", f"line-{number}")
        obj.setdefault("method", "POST")
        obj.setdefault("url", endpoint)
        if model:
            obj["body"]["model"] = model
        out.append(orjson.dumps(obj))
    return b"\n".join(out) + b"\n"


async def submit(
    path: Path,
    *,
    base_url: str,
    api_key: str,
    model: str | None,
    endpoint: str,
    wait: bool,
    output: Path | None,
    poll: float = 1.0,
) -> dict[str, Any]:
    console = Console(stderr=True)
    headers = {"Authorization": f"Bearer {api_key}"}
    data = prepare_lines(path.read_bytes(), model, endpoint)
    async with aiohttp.ClientSession(base_url=base_url.rstrip("/") + "/", headers=headers) as http:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", data, filename=path.name, content_type="application/jsonl")
        uploaded = await _json(await http.post("v1/files", data=form))
        batch = await _json(
            await http.post(
                "v1/batches",
                json={
                    "input_file_id": uploaded["id"],
                    "endpoint": endpoint,
                    "completion_window": "24h",
                },
            )
        )
        console.print(f"batch {batch['id']} created ({batch['request_counts']['total']} requests)")
        if not wait:
            return batch
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(batch["status"], total=batch["request_counts"]["total"])
            while batch["status"] not in TERMINAL:
                await asyncio.sleep(poll)
                batch = await _json(await http.get(f"v1/batches/{batch['id']}"))
                counts = batch["request_counts"]
                progress.update(
                    task,
                    completed=counts["completed"] + counts["failed"],
                    description=batch["status"],
                )
        if output is not None and batch.get("output_file_id"):
            resp = await http.get(f"v1/files/{batch['output_file_id']}/content")
            resp.raise_for_status()
            output.write_bytes(await resp.read())
            console.print(f"output written to {output}")
        return batch


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    async with resp:
        body = await resp.read()
        if resp.status >= 400:
            try:
                message = orjson.loads(body)["error"]["message"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                message = body.decode(errors="replace")[:500]
            raise SystemExit(f"error {resp.status}: {message}")
        result: dict[str, Any] = orjson.loads(body)
        return result
