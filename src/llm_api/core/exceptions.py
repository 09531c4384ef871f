"""One error taxonomy. Each `APIError` knows its HTTP status and OpenAI `type`/`code`/`param`;
`api/errors.py` renders them (and framework errors) as OpenAI's error object, and the SSE
encoder turns the same objects into an error frame.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    status_code: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "Invalid or missing credentials.", **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class PaymentRequiredError(APIError):
    status_code = 402
    type = "insufficient_quota"
    code = "paid_subscription_required"


class PermissionDeniedError(APIError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class ConflictError(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InsufficientQuotaError(APIError):
    """A budget is spent (OpenAI's shape for an exhausted quota): 429, not retried by the SDKs
    (`x-should-retry: false`)."""

    status_code = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class ServerError(APIError):
    status_code = 500
    type = "server_error"
    code = "internal_error"


class UpstreamError(APIError):
    """An upstream model server failed; the message never carries its URL or key."""

    status_code = 502
    type = "server_error"
    code = "upstream_error"


class OverloadedError(APIError):
    status_code = 503
    type = "server_error"
    code = "server_is_overloaded"

    def __init__(self, message: str, retry_after: int = 1, **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, **kw)


class ServiceUnavailableError(OverloadedError):
    code = "service_unavailable"


class UpstreamTimeoutError(APIError):
    status_code = 504
    type = "server_error"
    code = "upstream_timeout"
