"""The OpenAPI document as the server really answers.

FastAPI documents a 422 `HTTPValidationError` on every operation with parameters, but
api/errors.py turns validation failures into 400 with the OpenAI error object. Here 422 becomes
400 with that object, every other error status is covered by a `default` response of the same
shape, and FastAPI's validation schemas are dropped. Generated once, then cached by FastAPI.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from llm_api.api.errors import ANTHROPIC_PREFIX
from llm_api.schemas.common import ErrorResponse

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
# The /v1/messages family answers errors in Anthropic's shape (api/errors.anthropic_error).
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}


def _error(description: str, schema: dict[str, Any] = _ERROR_REF) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
        for path, operations in spec.get("paths", {}).items():
            anthropic = path.startswith(ANTHROPIC_PREFIX)
            schema = _ANTHROPIC_ERROR if anthropic else _ERROR_REF
            shape = "an Anthropic error object" if anthropic else "an OpenAI error object"
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = _error("Invalid request (`invalid_request_error`).", schema)
                responses.setdefault("default", _error(f"An error, as {shape}.", schema))
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error_schema.pop("$defs", {}))
        schemas["ErrorResponse"] = error_schema
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
