"""OpenAI-shaped errors: every non-2xx answer is `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError`; the app's exception handler (and the streaming response, before its
200 went out) turns it into JSON. Pydantic validation errors become a 400 naming the field.
"""
from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.responses import Response

# status -> OpenAI error type (the names the official clients map to exception classes)
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    content = json.dumps(error_body(status, message, param), ensure_ascii=False).encode()
    return Response(content, status_code=status, headers=headers, media_type="application/json")


def api_error_response(err: APIError) -> Response:
    return error_response(err.status, err.message, err.param, err.headers)


def from_validation_error(err: ValidationError) -> APIError:
    """The first pydantic error, as a 400 naming the field path (`messages.0.role`)."""
    first = err.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",)) or None
    msg = first.get("msg", "invalid value")
    detail = f"{param}: {msg}" if param else msg
    more = len(err.errors()) - 1
    if more:
        detail += f" (and {more} more error{'s' if more > 1 else ''})"
    return APIError(400, detail, param)
