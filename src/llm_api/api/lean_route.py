"""`LeanRoute`: FastAPI's route class with a shorter request handler for the completion routes.

FastAPI's generic handler does per request: content type parsing through `email.message`, stdlib
JSON decoding and a separate validation pass, dependency solving with its bookkeeping, telemetry
hooks and closures. Skipping that measured ~13% of the gateway's CPU per proxied stream
(~300 µs of ~2,300 on a slow 2-core host; bench/RESULTS.md, issue 9). `LeanRoute` is
FastAPI's documented extension point for this (a custom `APIRoute.get_route_handler`): the route
is declared as usual (path, body model, response model, dependencies, OpenAPI all unchanged) and
only the per-request work is shorter:

- the body is decoded and validated in one pass by the body model's `model_validate_json`;
- router and endpoint dependencies are awaited directly with the `Request`, once each.

It applies only where that is all a route needs: one JSON body model, `Request`/`Response`
parameters and dependencies that take just the `Request` (api/deps.py, api/security.py). Any
other route gets FastAPI's handler, decided once when the route is built. Every unusual request
goes through FastAPI's own handler too, so error responses are exactly FastAPI's: a missing or
non-JSON body, malformed JSON, a body that fails validation, and any active dependency override.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import fastapi.routing
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, serialize_response
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
_CONTEXT_VAR = "_effective_route_context_var"  # FastAPI 0.163's, see _effective
RequestDependency = Callable[[Request], Awaitable[Any]]


class LeanRoute(APIRoute):
    lean: bool  # whether the handler built last is the lean one

    def get_route_handler(self) -> Handler:
        standard = super().get_route_handler()
        self.lean = False
        route = _effective(self)
        if route is None:
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
        calls = {call for _, call in dependencies}

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
            values: dict[str, Any] = {body_name: body}
            solved: dict[RequestDependency, Any] = {}
            for name, call in dependencies:  # the router's first, as FastAPI orders them
                value = solved[call] if call in solved else await call(request)
                solved[call] = value
                if name is not None:
                    values[name] = value
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


def _plan(
    dependant: Dependant, body_field: Any
) -> tuple[str, type[BaseModel], list[tuple[str | None, RequestDependency]]] | None:
    """(body parameter, body model, [(parameter or None, dependency)]), or None when the route
    needs anything the lean handler does not do."""
    if (
        dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
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
    dependencies: list[tuple[str | None, RequestDependency]] = []
    for sub in dependant.dependencies:
        if not _takes_only_request(sub):
            return None
        assert sub.call is not None
        dependencies.append((sub.name, sub.call))
    return param.name, model, dependencies


def _takes_only_request(sub: Dependant) -> bool:
    return (
        sub.call is not None
        and inspect.iscoroutinefunction(sub.call)
        and sub.request_param_name is not None
        and sub.use_cache
        and len(inspect.signature(sub.call).parameters) == 1
        and not (
            sub.dependencies
            or sub.path_params
            or sub.query_params
            or sub.header_params
            or sub.cookie_params
            or sub.body_params
        )
    )


def _is_json(content_type: str | None) -> bool:
    """What FastAPI decodes as JSON: application/json or application/*+json (any parameters);
    anything else takes FastAPI's own path."""
    if not content_type:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )
