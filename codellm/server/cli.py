"""`codellm serve`: load the model, bind, print one line when ready, serve until SIGTERM/SIGINT.

    codellm serve --model models/default --port 8080 --api-key-file keys.txt
    -> codellm serve: listening on http://127.0.0.1:8080        (stdout, flushed, once ready)

Shutdown on SIGTERM or SIGINT: stop accepting connections, answer new requests on open connections
with 503, let running requests finish for up to --shutdown-grace seconds, then cancel them (streams end
with an error event), and exit 0. A second signal cancels at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path

from codellm.errors import UserError


def add_parser(subparsers) -> None:
    from codellm.options import add_engine_options, add_model_options

    p = subparsers.add_parser(
        "serve", help="HTTP server: OpenAI, TGI, SageMaker and llama.cpp /infill APIs, a playground page at /"
    )
    g = p.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)"
    )
    g.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    g.add_argument("--model-id", help="model name in responses and /v1/models (default: the model directory's name)")
    g.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another name OpenAI requests may give as `model` (repeatable; the first is the default name when "
        "--model-id is unset); any other name is a 404 model_not_found",
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every route but /health, /ping and / (repeatable)",
    )
    g.add_argument(
        "--api-key-file",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="file of API keys, one per line (repeatable)",
    )
    g.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=128,
        help="generation requests at once; more are refused with 429 at once (default: 128)",
    )
    g.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="prompt + new tokens per request (default: the model's context)",
    )
    g.add_argument("--max-stop-sequences", type=int, default=4, help="stop strings per request (default: 4)")
    g.add_argument("--max-best-of", type=int, default=2, help="largest TGI best_of (default: 2, as TGI)")
    g.add_argument("--max-body-size", default="2M", metavar="SIZE", help="largest request body (default: 2M)")
    g.add_argument(
        "--require-eula",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SageMaker /invocations needs `X-Amzn-SageMaker-Custom-Attributes: accept_eula=true` "
        "(default: when the model card gates the model, e.g. `license: llama2`)",
    )
    g.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running requests may finish before they are cancelled (default: 10)",
    )
    g.add_argument("--no-access-log", action="store_true", help="no JSON access-log line per request on stderr")
    g.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="requests decoded together, one KV slot each (default: 16; --kv-memory may allow fewer)",
    )
    add_model_options(p)
    add_engine_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    from codellm.engine import Engine, EngineRunner
    from codellm.options import default_model_path, load, parse_size
    from codellm.server import auth
    from codellm.server.service import Limits, Service

    for name in ("max_concurrent_requests", "max_batch", "max_stop_sequences", "max_best_of"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if any(not name.strip() for name in args.served_model_name):
        raise UserError("--served-model-name must not be empty")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535] (got {args.port})")
    if args.shutdown_grace < 0:
        raise UserError(f"--shutdown-grace must be >= 0 (got {args.shutdown_grace})")
    keys = auth.load_keys(args.api_key, args.api_key_file)
    max_body = parse_size(args.max_body_size)
    model_dir = args.model or default_model_path()
    model, tok = load(args)
    context = model.cfg.max_seq_len
    if args.max_total_tokens is not None and not 2 <= args.max_total_tokens <= context:
        raise UserError(
            f"--max-total-tokens must be in [2, {context}], the model's context (got {args.max_total_tokens})"
        )
    context = args.max_total_tokens or context
    kv_memory = parse_size(args.kv_memory) if args.kv_memory else None
    engine = Engine(model, tok, max_batch=args.max_batch, max_len=context, kv_memory=kv_memory, compile=args.compile)
    sock = bind(args.host, args.port)
    limits = Limits(
        context=context,
        max_concurrent=args.max_concurrent_requests,
        max_stop=args.max_stop_sequences,
        max_best_of=args.max_best_of,
        max_body=max_body,
    )
    require_eula = auth.eula_required(Path(model_dir)) if args.require_eula is None else args.require_eula
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    service = Service(
        EngineRunner(engine),
        tok,
        args.model_id or (args.served_model_name or [Path(model_dir).resolve().name])[0],
        limits,
        api_keys=keys,
        require_eula=require_eula,
        dtype=dtype,
        device=args.device,
        served_names=args.served_model_name,
    )
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{sock.getsockname()[1]}"
    serve(service, sock, url, args.shutdown_grace, None if args.no_access_log else sys.stderr)


def bind(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(service, sock: socket.socket, url: str, grace: float, access_log) -> None:
    import uvicorn

    from codellm.server.app import build_app

    class Server(uvicorn.Server):
        """uvicorn's server with our signals: drain, then cancel after the grace period; exit 0, not re-raise."""

        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.on_signal, sig)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

        def on_signal(self, sig: int) -> None:
            if self.should_exit:
                self.force_exit = True
                service.cancel_all()
                return
            print(
                f"codellm serve: {signal.Signals(sig).name}: shutting down (running requests get {grace:g} s)",
                file=sys.stderr,
                flush=True,
            )
            self.should_exit = True
            service.begin_shutdown()
            asyncio.get_running_loop().call_later(grace, service.cancel_all)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"codellm serve: listening on {url}", flush=True)

    config = uvicorn.Config(
        build_app(service, access_log),
        http="h11",
        ws="none",
        loop="asyncio",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=grace + 30,
    )
    Server(config).run(sockets=[sock])
