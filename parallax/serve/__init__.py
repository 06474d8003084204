"""Serving: ``parallax serve``, an OpenAI-compatible HTTP server over the paged engine.

async_engine: the engine loop in its own thread, requests in and results out through asyncio, per-request
cancellation; metrics: the Prometheus metrics; protocol: the OpenAI request schemas and their validation;
app: the FastAPI application (routes, streaming, API key, limits, errors); cli: ``parallax serve``.
"""
