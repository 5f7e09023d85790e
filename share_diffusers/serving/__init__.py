"""Serving Flux with Share styles: many users, each with a style, denoised together in one batch.

- :mod:`.schema`: the request and response bodies (OpenAI's ``/v1/images/generations`` plus Share fields);
- :mod:`.engine`: :class:`ServingEngine`, validation and one pipeline call for a batch of requests;
- :mod:`.batcher`: :class:`DynamicBatcher`, the bounded queue that gathers compatible requests;
- :mod:`.api`: :func:`create_app`, the FastAPI app; :mod:`.metrics`: its Prometheus metrics;
- :mod:`.server`: ``share-diffusers serve`` (``main(argv)``, also ``python -m share_diffusers.serving``);
- :mod:`.ray_app`: the same app as a Ray Serve deployment (``build_app(...)``), one replica per GPU.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client; Ray Serve for :mod:`.ray_app`).
"""

from __future__ import annotations

__all__ = ["DynamicBatcher", "ServingEngine", "create_app", "main"]


def __getattr__(name: str):
    # FastAPI, torch and diffusers load on first use: `share-diffusers --help` stays fast.
    if name == "main":
        from .server import main

        return main
    if name == "create_app":
        from .api import create_app

        return create_app
    if name == "ServingEngine":
        from .engine import ServingEngine

        return ServingEngine
    if name == "DynamicBatcher":
        from .batcher import DynamicBatcher

        return DynamicBatcher
    raise AttributeError(f"module 'share_diffusers.serving' has no attribute {name!r}")
