"""An OpenAI-compatible HTTP API (`dsv4-openai`) in front of the dsv4 Triton ensemble.

A client of Triton like the rest of `dsv4.client`: each request is one gRPC stream to the
running server, so Triton's batching, limits, metrics and cancellation apply unchanged.

    from dsv4.client.openai_server import OpenAIServerConfig, create_app
    app = create_app(OpenAIServerConfig(triton_url="127.0.0.1:8001"))   # an ASGI app for uvicorn
"""

from __future__ import annotations

from .app import create_app
from .config import OpenAIServerConfig

__all__ = ["OpenAIServerConfig", "create_app"]
