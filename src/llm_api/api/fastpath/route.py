"""`LeanRoute`: FastAPI's route class with a shorter request handler for the completion routes.

FastAPI's generic handler does per request: content type parsing through `email.message`, stdlib
JSON decoding and a separate validation pass, dependency solving with its bookkeeping, telemetry
hooks and closures. `LeanRoute` is FastAPI's documented extension point for skipping that (a
custom `APIRoute.get_route_handler`): the route is declared as usual (path, body model, response
model, dependencies, OpenAPI all unchanged) and only the per-request work is shorter:

- the body is decoded and validated in one pass by the body model's `model_validate_json`;
- the declared dependency graph (the router's `authenticate`, then the endpoint's, and what they
  depend on) is solved by a small recursive solver: each dependency awaited once, with the
  `Request` and the values of its own dependencies, cached per request as FastAPI caches them.

It applies only where that is all a route needs: one JSON body model, `Request`/`Response`
parameters and `async` dependencies that take only the `Request` and other such dependencies
(api/deps.py, api/security.py). Any other route gets FastAPI's handler, decided once when the
route is built, and so does every route of an app with `LLM_API_FAST_PATH=false`. Every unusual
request goes through FastAPI's own handler too, so error responses are exactly FastAPI's: a
missing or non-JSON body, malformed JSON, a body that fails validation, and any active
dependency override.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import fastapi.routing
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, serialize_response
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llm_api.api.fastpath.switch import enabled

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
_CONTEXT_VAR = "_effective_route_context_var"  # FastAPI 0.163's, see _effective
DependencyCall = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _Node:
    """One dependency as the lean handler solves it: awaited with the `Request` (as
    `request_name`, if it takes it) and the values of `children`, each by its parameter name."""

    name: str | None  # the parameter it fills in its parent, None for a router dependency
    call: DependencyCall
    request_name: str | None
    children: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Step:
    """One dependency call, in the order FastAPI makes them: `args` name the dependencies (solved
    before it) whose values it takes, by parameter."""

    call: DependencyCall
    request_name: str | None
    args: tuple[tuple[str, DependencyCall], ...]


def _steps(nodes: list[_Node]) -> list[_Step]:
    """The graph as a list of calls: depth first, each dependency once (FastAPI's use_cache:
    one value per dependency per request), decided when the route is built."""
    steps: list[_Step] = []
    seen: set[DependencyCall] = set()

    def visit(node: _Node) -> None:
        if node.call in seen:
            return
        for child in node.children:
            visit(child)
        seen.add(node.call)
        args = tuple((child.name, child.call) for child in node.children if child.name)
        steps.append(_Step(node.call, node.request_name, args))

    for node in nodes:
        visit(node)
    return steps


class LeanRoute(APIRoute):
    lean: bool  # whether the handler built last is the lean one

    def get_route_handler(self) -> Handler:
        standard = super().get_route_handler()
        self.lean = False
        route = _effective(self)
        if route is None or not enabled(route.dependency_overrides_provider):
            return standard
        dependant: Dependant = route.dependant
        plan = _plan(dependant, route.body_field)
        if plan is None or not isinstance(route.response_class, DefaultPlaceholder):
            return standard
        body_name, model, dependencies = plan
        endpoint = dependant.call
        assert endpoint is not None
        request_name, response_name = dependant.request_param_name, dependant.response_param_name
        overrides_provider = route.dependency_overrides_provider
        field = route.response_field
        calls = _calls(dependencies)
        steps = _steps(dependencies)
        wanted = [(node.name, node.call) for node in dependencies if node.name is not None]

        async def handle(request: Request) -> Response:
            overrides = getattr(overrides_provider, "dependency_overrides", None)
            if overrides and not calls.isdisjoint(overrides):
                return await standard(request)
            raw = await request.body()  # cached on the request: `standard` can read it again
            if not raw or not _is_json(request.headers.get("content-type")):
                return await standard(request)
            try:
                body = model.model_validate_json(raw)
            except ValidationError:
                return await standard(request)  # FastAPI's error, unchanged
            solved: dict[DependencyCall, Any] = {}
            for step in steps:  # the router's first, as FastAPI orders them
                kwargs = {name: solved[call] for name, call in step.args}
                if step.request_name is not None:
                    kwargs[step.request_name] = request
                solved[step.call] = await step.call(**kwargs)
            values: dict[str, Any] = {name: solved[call] for name, call in wanted}
            values[body_name] = body
            if request_name is not None:
                values[request_name] = request
            sub_response: Response | None = None
            if response_name is not None:
                sub_response = values[response_name] = Response()
                del sub_response.headers["content-length"]
                sub_response.status_code = None  # type: ignore[assignment]
            result = await endpoint(**values)
            if isinstance(result, Response):
                return result
            # A returned model (the non-streaming answer): FastAPI's own serialisation.
            content = await serialize_response(
                field=field,
                response_content=result,
                include=route.response_model_include,
                exclude=route.response_model_exclude,
                by_alias=route.response_model_by_alias,
                exclude_unset=route.response_model_exclude_unset,
                exclude_defaults=route.response_model_exclude_defaults,
                exclude_none=route.response_model_exclude_none,
                dump_json=field is not None,
            )
            status = (
                (sub_response.status_code if sub_response else None) or route.status_code or 200
            )
            response = (
                Response(content, status_code=status, media_type="application/json")
                if field is not None  # FastAPI's fast path: pydantic wrote the JSON bytes
                else JSONResponse(content, status_code=status)
            )
            if not is_body_allowed_for_status_code(status):
                response.body = b""
            if sub_response is not None:
                response.headers.raw.extend(sub_response.headers.raw)
            return response

        self.lean = True  # the handler built last (tests read it)
        return handle


def _effective(route: APIRoute) -> Any:
    """The route as included, with its router's prefix and dependencies (`authenticate`): FastAPI
    0.163 builds an included route's handler with this context set, and the route itself when it
    is not included. None if this FastAPI keeps it elsewhere: then FastAPI's own handler, never a
    lean one that might miss a router dependency (deny by default, api/security.py)."""
    var = getattr(fastapi.routing, _CONTEXT_VAR, None)
    if var is None:
        return None
    context = var.get()
    return context if context is not None and context.original_route is route else route


def _plan(dependant: Dependant, body_field: Any) -> tuple[str, type[BaseModel], list[_Node]] | None:
    """(body parameter, body model, dependency graph), or None when the route needs anything
    the lean handler does not do."""
    if (
        _has_parameters(dependant)
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or len(dependant.body_params) != 1
        or body_field is None
        or not inspect.iscoroutinefunction(dependant.call)
    ):
        return None
    param = dependant.body_params[0]
    model = param.field_info.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or param.alias != param.name:
        return None
    dependencies: list[_Node] = []
    for sub in dependant.dependencies:
        node = _node(sub)
        if node is None:
            return None
        dependencies.append(node)
    return param.name, model, dependencies


def _node(sub: Dependant) -> _Node | None:
    """`sub` as the lean handler solves it, or None if it takes anything but the `Request` and
    other such dependencies (FastAPI's handler then serves the route)."""
    call = sub.call
    if (
        call is None
        or not inspect.iscoroutinefunction(call)
        or not sub.use_cache
        or _has_parameters(sub)
        or sub.body_params
        or sub.background_tasks_param_name
        or sub.security_scopes_param_name
        or sub.websocket_param_name
        or sub.http_connection_param_name
        or sub.response_param_name
    ):
        return None
    children: list[_Node] = []
    for child in sub.dependencies:
        node = _node(child)
        if node is None or node.name is None:
            return None
        children.append(node)
    taken = len(children) + (sub.request_param_name is not None)
    if taken != len(inspect.signature(call).parameters):  # something FastAPI fills otherwise
        return None
    return _Node(sub.name, call, sub.request_param_name, tuple(children))


def _has_parameters(dependant: Dependant) -> bool:
    return bool(
        dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
    )


def _calls(nodes: list[_Node] | tuple[_Node, ...]) -> set[DependencyCall]:
    """Every dependency of the graph: an override of any of them sends the request to
    FastAPI's handler."""
    out: set[DependencyCall] = set()
    for node in nodes:
        out.add(node.call)
        out |= _calls(node.children)
    return out


def _is_json(content_type: str | None) -> bool:
    """What FastAPI decodes as JSON: application/json or application/*+json (any parameters);
    anything else takes FastAPI's own path."""
    if not content_type:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )
