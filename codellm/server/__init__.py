"""`codellm serve`: one HTTP server speaking the APIs code tools already use, over one batching engine.

    cli.py         `codellm serve` options, model loading, bind, signals (drain, then cancel), the ready line
    app.py         the route table, playground page, /health /ping /info /metrics, JSON access log
    tgi.py         TGI: /generate, /generate_stream, POST /
    sagemaker.py   SageMaker /invocations (TGI or OpenAI bodies; EULA header)
    openai_api.py  OpenAI: /v1/completions (with `suffix` = infilling), /v1/chat/completions, /v1/models[/{id}]
    infill_api.py  llama.cpp: /infill with input_extra (repository context within a token budget)
    schemas.py     request bodies as pydantic models (types, ranges, what is not supported)
    prompts.py     request fields -> prompt ids (through codellm.formats) and SamplingParams
    scoring.py     prompt log-probabilities (TGI decoder_input_details, OpenAI echo with logprobs)
    service.py     shared state: admission (429), engine requests seen from asyncio, disconnects, shutdown
    endpoints.py   what every route shares: API key, JSON body within the size limit, error envelopes
    errors.py      ApiError and each family's error body and status codes
    sse.py         server-sent events and a streaming response that always cleans up
    metrics.py     Prometheus metrics
    auth.py        API keys (constant-time) and the SageMaker EULA attribute
    static/        playground.html, served at GET /

The wire formats and the pitfalls they avoid are described in shared/docs/SERVING.md.
"""
