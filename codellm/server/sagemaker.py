"""SageMaker's `POST /invocations`: a TGI body (the Hugging Face LLM container's contract), or an OpenAI
chat/completions body, which the same containers accept. Gated models (Code Llama's licence) answer 424
unless the caller passes `CustomAttributes="accept_eula=true"` (auth.py, `--require-eula`).
"""

from __future__ import annotations

from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from codellm.server import auth, openai_api, tgi
from codellm.server.endpoints import endpoint, read_json
from codellm.server.errors import TGI
from codellm.server.schemas import TGIRequest, parse
from codellm.server.service import Service


def routes(service: Service) -> list[Route]:
    return [Route("/invocations", endpoint(service, TGI, partial(invocations, service)), methods=["POST"])]


async def invocations(service: Service, request: Request):
    """SageMaker: TGI's body (or an OpenAI chat/completions one); gated models need accept_eula=true."""
    if service.require_eula and not auth.eula_accepted(request.headers.get(auth.EULA_HEADER)):
        return JSONResponse({"code": 424, "message": "prediction failure", "error": auth.EULA_MESSAGE}, status_code=424)
    body = await read_json(request, service.limits.max_body)
    if isinstance(body, dict) and "messages" in body:
        return await openai_api.chat(service, request, body, check_model=False)
    if isinstance(body, dict) and "prompt" in body and "inputs" not in body:
        return await openai_api.completions(service, request, body, check_model=False)
    req = parse(TGIRequest, body)
    if req.stream:
        return await tgi.generate_stream(service, request, req)
    return await tgi.generate(service, request, wrap=True, req=req)
