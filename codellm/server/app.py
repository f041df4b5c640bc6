"""The ASGI app: every route, the playground page, health and metrics, and a JSON access log.

    GET  /                      playground page (codellm/server/static/playground.html)      open
    GET  /health, /ping         200 when ready; 503 while shutting down or after an engine failure  open
    GET  /info                  TGI's model info                                              key
    GET  /metrics               Prometheus text format (metrics.py)                           key
    POST /generate, /generate_stream, /                               tgi.py                  key
    POST /invocations                                                 sagemaker.py            key + EULA
    GET  /v1/models; POST /v1/completions, /v1/chat/completions       openai_api.py           key
    POST /infill                                                      infill_api.py           key
    GET  /v1/models/{id}                                              openai_api.py           key

Any other path is a 404, and a known path with another method a 405, in the family's error shape: OpenAI's
under /v1/, llama.cpp's for /infill, TGI's elsewhere.

"key": needs `Authorization: Bearer KEY` when the server has API keys. Each request ends with one JSON
line on stderr: time, method, route, status, duration_ms, client, and for generation the prompt and
completion tokens, finish reason, whether it streamed, and an error or a disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from datetime import UTC, datetime
from functools import partial
from importlib import resources
from time import perf_counter

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import codellm
from codellm.server import infill_api, openai_api, sagemaker, tgi
from codellm.server.endpoints import endpoint
from codellm.server.errors import LLAMACPP, OPENAI, TGI, ApiError
from codellm.server.service import Service

PAGE = "static/playground.html"


def build_app(service: Service, access_log=sys.stderr):
    """The whole server as an ASGI app (wrapped in the access log / metrics middleware)."""
    get = lambda path, fn, auth=True: Route(
        path, endpoint(service, TGI, partial(fn, service), auth_required=auth), methods=["GET"]
    )
    routes = [
        get("/", page, auth=False),
        get("/health", health, auth=False),
        get("/ping", health, auth=False),
        get("/info", info),
        get("/metrics", metrics),
        *tgi.routes(service),
        *sagemaker.routes(service),
        *openai_api.routes(service),
        *infill_api.routes(service),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.runner.close, 30)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: no_route})
    return Observe(app, service, {r.path for r in routes}, access_log)


async def no_route(request: Request, exc: HTTPException) -> Response:
    """Starlette's 404 (no such path) and 405 (not for this method) as JSON in the path's API family's shape."""
    path, method = request.url.path, request.method
    family = OPENAI if path.startswith("/v1/") else LLAMACPP if path.startswith("/infill") else TGI
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        err = ApiError(
            "method_not_allowed",
            f"{method} {path}: method not allowed (allowed: {allowed})",
            None,
            headers={"Allow": allowed},
        )
    elif exc.status_code == 404:
        err = ApiError("not_found", f"{method} {path}: no such route", None)
    else:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    return family.response(err)


async def page(service: Service, request: Request) -> Response:
    """Read at each request, so the page can be edited (or installed) while the server runs."""
    try:
        html = resources.files("codellm.server").joinpath(PAGE).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return PlainTextResponse(
            f"the playground page is not installed (codellm/server/{PAGE} is missing); the API routes work without it",
            status_code=404,
        )
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


async def health(service: Service, request: Request) -> Response:
    if service.healthy:
        return Response(status_code=200)
    return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)


async def info(service: Service, request: Request) -> Response:
    limits = service.limits
    return JSONResponse(
        {
            "model_id": service.model_id,
            "model_sha": None,
            "model_dtype": service.dtype,
            "model_device_type": service.device,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": limits.max_concurrent,
            "max_best_of": limits.max_best_of,
            "max_stop_sequences": limits.max_stop,
            "max_input_tokens": limits.context - 1,
            "max_total_tokens": limits.context,
            "max_client_batch_size": limits.max_prompts,
            "validation_workers": 1,
            "max_batch_size": service.runner.engine.scheduler.max_batch,
            "infilling": service.tok.has_infilling,
            "router": "codellm",
            "version": codellm.__version__,
            "sha": None,
            "docker_label": None,
        }
    )


async def metrics(service: Service, request: Request) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


class Observe:
    """ASGI middleware: request metrics and one access-log line per HTTP request, after its last byte."""

    def __init__(self, app, service: Service, paths: set[str], log):
        self.app, self.service, self.paths, self.log = app, service, paths, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        notes = scope.setdefault("codellm", {})
        status, t0 = 500, perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = perf_counter() - t0
            route = scope["path"] if scope["path"] in self.paths else "other"
            self.service.metrics.request(route, status, seconds)
            if self.log is not None:
                client = scope.get("client")
                line = {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1e3, 1),
                    "client": client[0] if client else None,
                } | notes
                self.log.write(json.dumps(line) + "\n")
                self.log.flush()
