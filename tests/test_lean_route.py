"""api/fastpath's LeanRoute answers exactly as FastAPI's own handler does, and the whole app
answers the same with the fast path on and off (LLM_API_FAST_PATH).

Two apps with the same route, one with `LeanRoute` and one with FastAPI's `APIRoute`, both
included the way api/v1/router.include_v1 includes the /v1 routers (a prefix and a router-level
dependency), get the same requests; status, body and headers must match. A field validator
records pydantic's validation mode, which tells the two handlers apart: the lean one validates
the raw JSON (`json`), FastAPI validates the decoded dict (`python`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import orjson
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationInfo, field_validator

from llm_api.api.errors import install_error_handlers
from llm_api.api.fastpath import LeanRoute
from llm_api.api.v1.chat import router as chat
from llm_api.api.v1.completions import router as completions
from llm_api.core.exceptions import AuthenticationError
from llm_api.main import create_app
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.completions import CompletionRequest
from tests.conftest import MODEL, create_account, running_app
from tests.conftest import test_settings as settings_for

MODES: list[str] = []
CALLS: list[str] = []


class Item(BaseModel):
    name: str
    n: int = 1

    @field_validator("name")
    @classmethod
    def _record_mode(cls, value: str, info: ValidationInfo) -> str:
        MODES.append(info.mode)
        return value


class ItemOut(BaseModel):
    name: str
    n: int


async def caller(request: Request) -> str:
    CALLS.append("caller")
    if request.headers.get("x-deny"):
        raise AuthenticationError()
    return "someone"


async def context(request: Request) -> str:
    CALLS.append("context")
    return request.headers.get("x-ctx", "none")


async def nested(request: Request, who: Annotated[str, Depends(caller)]) -> str:
    """Depends on the router's dependency, as api/deps.get_inference on `authenticate`."""
    CALLS.append("nested")
    return f"{who} at {request.url.path}"


def build(route_class: type, fast_path: bool = True) -> FastAPI:
    router = APIRouter(route_class=route_class)

    @router.post("/items", response_model=ItemOut)
    async def create_item(
        body: Item,
        request: Request,
        response: Response,
        ctx: Annotated[str, Depends(context)],
        again: Annotated[str, Depends(caller)],  # solved once, as FastAPI caches it
        who: Annotated[str, Depends(nested)],
    ) -> Any:
        assert isinstance(request, Request)
        response.headers["x-ctx"] = ctx
        response.headers["x-who"] = who
        if body.name == "raw":
            return PlainTextResponse(f"raw {again}")
        if body.name == "created":
            response.status_code = 201
        return {"name": body.name, "n": body.n, "not_in_the_model": True}

    app = FastAPI()
    app.state.settings = SimpleNamespace(fast_path=fast_path)  # as main.create_app's Settings
    install_error_handlers(app)
    app.include_router(router, prefix="/v1", dependencies=[Depends(caller)])
    return app


JSON = {"content-type": "application/json"}
CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("valid", b'{"name": "a", "n": 2}', JSON),
    ("serialised through the response model", b'{"name": "b"}', JSON),
    ("a Response returned as is", b'{"name": "raw"}', JSON),
    ("sub-response status", b'{"name": "created"}', JSON),
    ("sub-response header", b'{"name": "c"}', {**JSON, "x-ctx": "abc"}),
    ("+json with a charset", b'{"name": "d"}', {"content-type": "application/x+json; charset=x"}),
    ("no content type", b'{"name": "e"}', {}),
    ("form content type", b'{"name": "f"}', {"content-type": "application/x-www-form-urlencoded"}),
    ("text content type", b'{"name": "g"}', {"content-type": "text/plain"}),
    ("empty body", b"", JSON),
    ("malformed JSON", b'{"name": ', JSON),
    ("not an object", b"[1, 2]", JSON),
    ("wrong type", b'{"name": "h", "n": "many"}', JSON),
    ("missing field", b'{"n": 3}', JSON),
    ("denied", b'{"name": "i"}', {**JSON, "x-deny": "1"}),
    ("denied and invalid", b'{"n": "x"}', {**JSON, "x-deny": "1"}),
    ("denied and malformed", b"{", {**JSON, "x-deny": "1"}),
]  # fmt: skip


async def call(app: FastAPI, body: bytes, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/v1/items", content=body, headers=headers)


@pytest.mark.parametrize(("case", "body", "headers"), CASES, ids=[c[0] for c in CASES])
async def test_answers_as_fastapi_does(case: str, body: bytes, headers: dict[str, str]) -> None:
    lean_app, fastapi_app = build(LeanRoute), build(APIRoute)
    CALLS.clear()
    fastapi_answer = await call(fastapi_app, body, headers)
    fastapi_calls = list(CALLS)
    CALLS.clear()
    lean_answer = await call(lean_app, body, headers)
    assert lean_answer.status_code == fastapi_answer.status_code, case
    assert lean_answer.content == fastapi_answer.content, case
    assert lean_answer.headers == fastapi_answer.headers, case
    if fastapi_answer.status_code < 300:
        assert CALLS == fastapi_calls == ["caller", "context", "nested"], case  # once each


async def test_a_valid_request_takes_the_lean_path() -> None:
    MODES.clear()
    answer = await call(build(LeanRoute), b'{"name": "a"}', JSON)
    assert answer.status_code == 200
    assert MODES == ["json"]  # validated once, from the raw bytes
    MODES.clear()
    answer = await call(build(APIRoute), b'{"name": "a"}', JSON)
    assert answer.status_code == 200
    assert MODES == ["python"]


async def test_a_dependency_override_is_honoured() -> None:
    app = build(LeanRoute)

    async def overridden(request: Request) -> str:
        return "overridden"

    app.dependency_overrides[context] = overridden
    MODES.clear()
    answer = await call(app, b'{"name": "a"}', JSON)
    assert answer.headers["x-ctx"] == "overridden"
    assert MODES == ["python"]  # FastAPI's handler, which applies overrides


def test_routes_it_cannot_serve_get_fastapis_handler() -> None:
    router = APIRouter(route_class=LeanRoute)

    @router.post("/q")
    async def with_query(body: Item, limit: int = 3) -> dict[str, int]:
        return {"limit": limit}

    @router.get("/g")
    async def without_body() -> dict[str, int]:
        return {}

    async def by_header(x_who: Annotated[str, Header()]) -> str:
        return x_who

    async def nested_header(who: Annotated[str, Depends(by_header)]) -> str:
        return who

    @router.post("/d")
    async def with_nested_header(body: Item, who: Annotated[str, Depends(nested_header)]) -> str:
        return who

    def sync_dependency(request: Request) -> str:
        return "sync"

    @router.post("/s")
    async def with_sync_dependency(body: Item, s: Annotated[str, Depends(sync_dependency)]) -> str:
        return s

    assert [route.lean for route in router.routes] == [False] * 4  # type: ignore[attr-defined]


def test_the_completion_routes_are_lean_routes() -> None:
    """Which handler each app builds for them is checked by sending requests (below):
    `lean` tells only the handler built last, and apps share the route objects."""
    create_app()  # includes them as served: /v1 prefix, `authenticate` from the router
    for route in (*chat.router.routes, *completions.router.routes):
        assert isinstance(route, LeanRoute)


def test_without_fastapis_route_context_it_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FastAPI that keeps included routes' context elsewhere gets its own handler, never a lean
    one that could miss the router's `authenticate`."""
    monkeypatch.setattr("llm_api.api.fastpath.route._CONTEXT_VAR", "_a_name_fastapi_does_not_have")
    router = APIRouter(route_class=LeanRoute)

    @router.post("/items")
    async def create_item(body: Item) -> dict[str, str]:
        return {"name": body.name}

    assert [route.lean for route in router.routes] == [False]  # type: ignore[attr-defined]


async def test_with_the_fast_path_off_it_is_fastapis_handler() -> None:
    MODES.clear()
    answer = await call(build(LeanRoute, fast_path=False), b'{"name": "a"}', JSON)
    assert answer.status_code == 200
    assert MODES == ["python"]


# --- the whole app, fast path on and off ----------------------------------------------------


class Sends:
    """ASGI middleware counting the `http.response.body` messages of each response."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counting(message: Any) -> None:
            if message["type"] == "http.response.body":
                self.bodies += 1
            await send(message)

        await self.app(scope, receive, counting)


def _normalised(response: httpx.Response) -> Any:
    """The body without what differs per request (ids, timestamps)."""

    def scrub(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: scrub(v) for k, v in obj.items() if k not in ("id", "created")}
        if isinstance(obj, list):
            return [scrub(v) for v in obj]
        return obj

    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        return [e if e == "[DONE]" else scrub(orjson.loads(e)) for e in events]
    return scrub(response.json())


REQUESTS: list[tuple[str, str, dict[str, Any] | bytes]] = [
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi."}]}),
    (
        "chat stream",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Say hi."}], "stream": True},
    ),
    ("completion", "/v1/completions", {"prompt": "One, two,"}),
    ("completion stream", "/v1/completions", {"prompt": "One, two,", "stream": True}),
    ("bad parameter", "/v1/chat/completions", {"messages": [], "temperature": 9}),
    ("malformed", "/v1/chat/completions", b'{"messages": '),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "nope"}),
]


async def test_the_app_answers_the_same_with_the_fast_path_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same requests to two apps with the real model, LLM_API_FAST_PATH on and off: same
    status, headers and body (ids and timestamps aside). And each app took its own path: the
    lean handler validates the raw JSON, and the fast stream response ends in one send fewer."""
    validated: list[str] = []
    for model in (ChatCompletionRequest, CompletionRequest):
        original = model.model_validate_json.__func__  # type: ignore[attr-defined]

        def spy(cls: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            validated.append(cls.__name__)
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(model, "model_validate_json", classmethod(spy))
    answers: dict[bool, list[tuple[int, dict[str, str], Any]]] = {}
    bodies: dict[bool, int] = {}
    lean: dict[bool, list[str]] = {}
    for fast in (True, False):
        async with running_app(settings_for(tmp_path / str(fast), fast_path=fast)) as app:
            account = await create_account(app)
            counted = Sends(app)
            transport = httpx.ASGITransport(app=counted)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                answers[fast] = []
                validated.clear()
                for _, path, body in REQUESTS:
                    if isinstance(body, dict):
                        body = orjson.dumps(
                            {"model": MODEL, "max_tokens": 6, "temperature": 0, **body}
                        )
                    answer = await http.post(
                        path, content=body, headers={**JSON, **account.headers}
                    )
                    headers = {
                        k: v for k, v in answer.headers.items() if k not in ("date", "x-request-id")
                    }
                    answers[fast].append((answer.status_code, headers, _normalised(answer)))
                bodies[fast] = counted.bodies
                lean[fast] = list(validated)
    for (case, _, _), on, off in zip(REQUESTS, answers[True], answers[False], strict=True):
        assert on == off, case
    assert [a[0] for a in answers[True]] == [200, 200, 200, 200, 400, 400, 404]
    # The lean handler ran only with the fast path on, for both routes (and handed the two bad
    # bodies on to FastAPI's handler after its one try).
    chat_, completion = "ChatCompletionRequest", "CompletionRequest"
    assert lean[True] == [chat_, chat_, completion, completion, chat_, chat_, completion]
    assert lean[False] == []
    assert bodies[True] < bodies[False]  # FinalFrame: the end of a stream rides its last frame
