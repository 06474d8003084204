"""Serving: ``parallax serve``, an OpenAI-compatible HTTP server over the paged engine.

    parallax serve --hf DIR --port 8000 --api-key KEY --lora support=ADAPTER_DIR
    # then any OpenAI client: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    #   .completions.create(model="DIR", prompt=..., stream=True); model="support" for the adapter

async_engine: the engine loop in its own thread, requests in and results out through asyncio, per-request
cancellation; metrics: the Prometheus metrics; protocol: the OpenAI request schemas and their validation;
errors: the OpenAI error objects; streaming: what part of a growing text may be sent, SSE; replies: the
answers, whole or streamed; app: the FastAPI application (routes, API key, body limit, error handlers);
cli: ``parallax serve`` (uvicorn, graceful SIGTERM).
"""
