"""api/lean_route.LeanRoute answers exactly as FastAPI's own handler does.

Two apps with the same route, one with `LeanRoute` and one with FastAPI's `APIRoute`, both
included the way api/v1/router.include_v1 includes the /v1 routers (a prefix and a router-level
dependency), get the same requests; status, body and headers must match. A field validator
records pydantic's validation mode, which tells the two handlers apart: the lean one validates
the raw JSON (`json`), FastAPI validates the decoded dict (`python`)."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationInfo, field_validator

from llm_api.api.errors import install_error_handlers
from llm_api.api.lean_route import LeanRoute
from llm_api.api.v1.endpoints import chat, completions
from llm_api.core.exceptions import AuthenticationError
from llm_api.main import create_app

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


def build(route_class: type) -> FastAPI:
    router = APIRouter(route_class=route_class)

    @router.post("/items", response_model=ItemOut)
    async def create_item(
        body: Item,
        request: Request,
        response: Response,
        ctx: Annotated[str, Depends(context)],
        again: Annotated[str, Depends(caller)],  # solved once, as FastAPI caches it
    ) -> Any:
        assert isinstance(request, Request)
        response.headers["x-ctx"] = ctx
        if body.name == "raw":
            return PlainTextResponse(f"raw {again}")
        if body.name == "created":
            response.status_code = 201
        return {"name": body.name, "n": body.n, "not_in_the_model": True}

    app = FastAPI()
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
        assert CALLS == fastapi_calls == ["caller", "context"], case  # each once, same order


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

    async def nested(who: Annotated[str, Depends(caller)]) -> str:
        return who

    @router.post("/d")
    async def with_nested_dependency(body: Item, who: Annotated[str, Depends(nested)]) -> str:
        return who

    assert [route.lean for route in router.routes] == [False, False, False]  # type: ignore[attr-defined]


def test_the_completion_routes_are_lean() -> None:
    create_app()  # includes them as served: /v1 prefix, `authenticate` from the router
    for route in (*chat.router.routes, *completions.router.routes):
        assert isinstance(route, LeanRoute)
        assert route.lean, route.path


def test_without_fastapis_route_context_it_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FastAPI that keeps included routes' context elsewhere gets its own handler, never a lean
    one that could miss the router's `authenticate`."""
    monkeypatch.setattr("llm_api.api.lean_route._CONTEXT_VAR", "_a_name_fastapi_does_not_have")
    router = APIRouter(route_class=LeanRoute)

    @router.post("/items")
    async def create_item(body: Item) -> dict[str, str]:
        return {"name": body.name}

    assert [route.lean for route in router.routes] == [False]  # type: ignore[attr-defined]
