"""Errors as each API family writes them, and pydantic's validation errors turned into one message naming the field.

An `ApiError` has a kind; each family maps the kind to its HTTP status and body:

    kind               TGI/SageMaker   OpenAI   llama.cpp   meaning
    validation         422             400      400         bad input (the message names the field and the limit)
    not_supported      422             400      501         e.g. infilling on a model without infilling tokens
    authentication     401             401      401         missing or wrong API key
    not_found          404             404      404         no such route, or (OpenAI) no such model
    method_not_allowed 405             405      405         the route exists for other methods
    payload_too_large  413             413      413         request body over --max-body-size
    overloaded         429             429      429         past --max-concurrent-requests (refused at once)
    unavailable        503             503      503         shutting down, or the engine has stopped
    generation         424             500      500         the engine failed while generating
    internal           500             500      500         a bug

    TGI        {"error": "...", "error_type": kind}
    OpenAI     {"error": {"message": "...", "type": "...", "param": "field" | null, "code": status}}
               (`code` is a string where OpenAI names the error: "model_not_found")
    llama.cpp  {"error": {"code": status, "message": "...", "type": "..."}}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.responses import JSONResponse

STATUS = {  # kind -> (TGI, OpenAI, llama.cpp)
    "validation": (422, 400, 400),
    "not_supported": (422, 400, 501),
    "authentication": (401, 401, 401),
    "not_found": (404, 404, 404),
    "method_not_allowed": (405, 405, 405),
    "payload_too_large": (413, 413, 413),
    "overloaded": (429, 429, 429),
    "unavailable": (503, 503, 503),
    "generation": (424, 500, 500),
    "internal": (500, 500, 500),
}
OPENAI_TYPES = {
    "validation": "invalid_request_error",
    "not_supported": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "invalid_request_error",
    "method_not_allowed": "invalid_request_error",
    "payload_too_large": "invalid_request_error",
    "overloaded": "overloaded_error",
    "unavailable": "unavailable_error",
    "generation": "server_error",
    "internal": "server_error",
}
LLAMACPP_TYPES = OPENAI_TYPES | {"not_supported": "not_supported_error", "not_found": "not_found_error"}


class ApiError(Exception):
    def __init__(
        self, kind: str, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.kind, self.message, self.param, self.code, self.headers = kind, message, param, code, headers


def invalid(param: str, message: str) -> ApiError:
    """A validation error about one field: `param: message`."""
    return ApiError("validation", f"{param}: {message}", param)


@dataclass(frozen=True)
class Family:
    """How one API family writes an error: its status for each kind and its body."""

    name: str
    column: int  # into STATUS
    body: Callable[[ApiError, int], dict]

    def status(self, err: ApiError) -> int:
        return STATUS[err.kind][self.column]

    def response(self, err: ApiError, headers: dict | None = None) -> JSONResponse:
        status = self.status(err)
        headers = (err.headers or {}) | (headers or {})
        if err.kind == "authentication":
            headers = {"WWW-Authenticate": "Bearer"} | (headers or {})
        return JSONResponse(self.body(err, status), status_code=status, headers=headers)


def _tgi_body(err: ApiError, status: int) -> dict:
    prefix = "Input validation error: " if err.kind == "validation" else ""
    return {"error": prefix + err.message, "error_type": err.kind}


TGI = Family("tgi", 0, _tgi_body)
OPENAI = Family(
    "openai",
    1,
    lambda err, status: {
        "error": {
            "message": err.message,
            "type": OPENAI_TYPES[err.kind],
            "param": err.param,
            "code": err.code or status,
        }
    },
)
LLAMACPP = Family(
    "llama.cpp",
    2,
    lambda err, status: {"error": {"code": status, "message": err.message, "type": LLAMACPP_TYPES[err.kind]}},
)


def from_pydantic(e: ValidationError, prefix: str = "") -> ApiError:
    """The first error of a failed validation, as `field.path: what is wrong (got value)`."""
    err = e.errors(include_url=False)[0]
    path = [str(p) for p in err["loc"] if not _is_type_tag(p)]
    param = ".".join([prefix] * bool(prefix) + path) or prefix or "body"
    msg = "field required" if err["type"] == "missing" else err["msg"]
    if err["type"] != "missing" and "input" in err and err["type"] not in ("unsupported",):
        msg += f" (got {_short(err['input'])})"
    return invalid(param, msg)


def _is_type_tag(part) -> bool:
    """pydantic puts union members and validator names into `loc` ("str", "list[int]", "function-after[...]")."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none"))


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
