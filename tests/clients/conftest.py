"""One live llm-api server (`llm-api serve`, real sockets, auth on, /metrics public) serving two
models: the built-in SmolLM2 (one slot, so a generation left running would block the next) and
`stub-tools`, a gateway entry whose upstream is the scripted tool-calling stub. Real clients —
the openai SDK, LangChain, pydantic-ai, the Vercel AI SDK in Node — talk to it over HTTP."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml

from llm_api.services.llm.registry import DEFAULT_MODEL_ID, builtin_registry
from tests.clients.tool_upstream import ToolScript, ToolUpstream
from tests.conftest import LiveServer, start_live_server

STUB_MODEL = "stub-tools"
DIRECT = os.environ.get("LLM_API_CLIENT_TESTS_DIRECT") == "1"


def local_model_entry() -> dict[str, Any]:
    """The built-in chat model's own registry entry (whatever it declares, capabilities
    included), narrowed to one slot with room for a 3500-token tool call."""
    entry = next(m for m in builtin_registry().models if m.id == DEFAULT_MODEL_ID)
    data: dict[str, Any] = entry.model_dump(mode="json", exclude_defaults=True)
    return data | {"slots": 1, "concurrency": 1, "context_length": 4096}


@pytest.fixture(scope="session")
def tool_upstream() -> Iterator[ToolUpstream]:
    upstream = ToolUpstream(ToolScript(calls=[])).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def tool_server(
    tmp_path_factory: pytest.TempPathFactory, tool_upstream: ToolUpstream
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("tool-clients")
    registry = tmp / "models.yaml"
    stub_entry = {
        "id": STUB_MODEL,
        "backend": "router",
        "concurrency": 64,
        "deployments": [{"base_url": tool_upstream.base_url}],
    }
    registry.write_text(yaml.safe_dump({"models": [local_model_entry(), stub_entry]}))
    server = start_live_server(
        tmp, env={"LLM_API_METRICS_PUBLIC": "true"}, args=["--config", str(registry)]
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def base_url(tool_server: LiveServer) -> str:
    return tool_server.base_url + "/v1"


@pytest.fixture(scope="session")
def sdk(tool_server: LiveServer, base_url: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=base_url, api_key=tool_server.api_key, max_retries=0)
    yield client
    client.close()


@pytest.fixture(scope="session")
def gateway_url(base_url: str, tool_upstream: ToolUpstream) -> str:
    """Where the tests send `stub-tools` requests: llm-api. With LLM_API_CLIENT_TESTS_DIRECT=1,
    the scripted upstream itself, bypassing llm-api: every gateway test passes so, which tells
    a failure of llm-api's relay from a fault of a test or its stub."""
    return tool_upstream.base_url if DIRECT else base_url


@pytest.fixture(scope="session")
def gateway_sdk(tool_server: LiveServer, gateway_url: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=gateway_url, api_key=tool_server.api_key, max_retries=0)
    yield client
    client.close()


@pytest.fixture
def script(tool_upstream: ToolUpstream) -> Iterator[ToolUpstream]:
    """The stub, its recorded requests cleared; a test sets `.script` before its calls."""
    tool_upstream.recorded.bodies.clear()
    tool_upstream.recorded.headers.clear()
    yield tool_upstream
    tool_upstream.script = ToolScript(calls=[])
