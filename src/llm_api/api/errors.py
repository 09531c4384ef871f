"""Exception handlers, registered in layers: our APIError taxonomy, then framework errors
(validation, HTTP), then a last-resort handler. Every body is OpenAI's error object; none carries
a stack trace, a file path or an upstream URL. Under /v1/messages the same errors take
Anthropic's shape (`anthropic_error`)."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount

from llm_api.core.exceptions import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServerError,
)

log = structlog.get_logger(__name__)


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status_code, headers=headers, media_type="application/json"
    )


def error_response(exc: APIError) -> Response:
    return json_response(exc.to_dict(), exc.status_code, exc.headers)


# Anthropic's error types by our status; its "overloaded" status is 529 (our admission's 503).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
ANTHROPIC_PREFIX = "/v1/messages"


def anthropic_error(exc: APIError) -> tuple[int, dict[str, Any]]:
    """(status, body) of an error in Anthropic's shape (the /v1/messages family)."""
    status = exc.status_code
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    body = {"type": "error", "error": {"type": kind, "message": exc.message}}
    return (529 if status == 503 else status), body


def _respond(request: Request, exc: APIError) -> Response:
    """The error in the shape of the family the path belongs to."""
    if request.url.path.startswith(ANTHROPIC_PREFIX):
        status, body = anthropic_error(exc)
        return json_response(body, status, exc.headers)
    return error_response(exc)


# Pydantic names union branches and validators in `loc` ("str", "list[TextPart]",
# "constrained-str", "function-after[...]"); they are not part of the request's field path.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or "[" in part or "-" in part


def _param(loc: tuple[Any, ...]) -> str | None:
    """A validation error's location as OpenAI writes `param`: `messages[0].content`."""
    out = ""
    for p in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _is_type_tag(str(p)):
            out += f".{p}" if out else str(p)
    return out or None


def validation_to_api_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("Invalid request.")
    if any(e.get("type") == "json_invalid" for e in errors):
        return InvalidRequestError("We could not parse the JSON body of your request.")
    for e in errors:
        ctx_error = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_error, APIError):  # raised inside a model validator
            return ctx_error
    # For a union (content: str | list of parts) pydantic reports every branch; the deepest
    # error is the one that names what is actually wrong (`messages[0].content[0].type`).
    err = max(errors, key=lambda e: len(_param(tuple(e.get("loc", ()))) or ""))
    param = _param(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "Invalid value")).removeprefix("Value error, ")
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):  # a content part's
        param = f"{param}.type" if param else "type"
        msg = f"Invalid value for '{param}': not a supported type."
    elif err.get("type") == "missing":
        msg = f"Missing required parameter: '{param}'."
    else:
        msg = f"Invalid value for '{param}': {msg}." if param else f"{msg}."
    return InvalidRequestError(msg, param=param)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _respond(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return _respond(request, validation_to_api_error(exc))


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's 405 names only the methods of
    the first route that matched the path, but `/v1/keys` (GET, POST) is two routes, and
    RFC 9110 wants `Allow` to list them all. FastAPI nests included routers, so ask each
    top-level route whether it would take the request with another method."""
    allowed = []
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(
            not isinstance(route, Mount) and route.matches(probe)[0] == Match.FULL
            for route in request.app.router.routes
        ):
            allowed.append(method)
    return ", ".join(allowed)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    api: APIError
    if exc.status_code == 404:
        api = NotFoundError("Not found.")
    elif exc.status_code == 413:
        api = PayloadTooLargeError(str(exc.detail))
    else:
        api = APIError(str(exc.detail))
        api.status_code = exc.status_code
        api.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        api.code = None
    api.headers = dict(exc.headers or {})
    if exc.status_code == 405:
        api.headers["Allow"] = _allowed_methods(request) or api.headers.get("Allow", "")
    return _respond(request, api)


async def _client_gone(_: Request, exc: Exception) -> Response:
    # Nobody reads this response; answering here keeps a disconnect out of the error log
    # (an exception reaching Starlette's last-resort handler is logged and re-raised).
    return Response(status_code=499)


async def _unhandled(request: Request, exc: Exception) -> Response:
    # The route template, not the raw path: a path can carry what a client should not have
    # put there (a token, a password), and the access log keys on the template too.
    route = request.scope.get("route")
    log.error("unhandled_error", path=getattr(route, "path", "<unmatched>"), exc_info=exc)
    return _respond(request, ServerError("The server had an error processing your request."))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unhandled)
