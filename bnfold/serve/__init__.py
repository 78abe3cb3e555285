"""``bnfold serve``: sample names over HTTP, with step-level batching across requests.

One module per concern:

* :mod:`~bnfold.serve.settings` - every limit, passed to worker processes as JSON;
* :mod:`~bnfold.serve.model` - loading the model and what ``/v1/model`` shows;
* :mod:`~bnfold.serve.schema` - the one strict request schema (body and query), the 422s;
* :mod:`~bnfold.serve.batcher` - the batching loop (admit / step / deliver) and the
  engine pool's memory bound;
* :mod:`~bnfold.serve.service` - readiness, admission (429), deadline (504), answers;
* :mod:`~bnfold.serve.metrics` - the Prometheus metrics;
* :mod:`~bnfold.serve.http` - the FastAPI app (every route, ``/v1/names`` included) and
  the thin ASGI layer in front (latency, body limit, a shortcut into the same endpoint);
* :mod:`~bnfold.serve.protocol` - the connection edge: header size and time, body time;
* :mod:`~bnfold.serve.server` - uvicorn's options, the port check, signals, the worker factory.

Names depend only on (model, seed, options): every name has its own random stream, and a
row's logits do not depend on which other rows share its forward pass (small passes are
padded, as the CLI pads them), so a request gives the same names alone or in a crowd, and
the same as ``bnfold sample`` (``tests/test_serve.py`` checks both).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# where each public name lives; a module is imported on first use (PEP 562), so that
# `bnfold.serve.settings` (the CLI's defaults) loads without FastAPI, uvicorn and the model
_EXPORTS = {
    "LoadedModel": "bnfold.serve.model",
    "ServeSettings": "bnfold.serve.settings",
    "app_from_env": "bnfold.serve.server",
    "check_port": "bnfold.serve.server",
    "create_app": "bnfold.serve.http",
    "create_fastapi_app": "bnfold.serve.http",
    "load_and_warm": "bnfold.serve.model",
    "load_model": "bnfold.serve.model",
    "run_server": "bnfold.serve.server",
}
__all__ = [  # the keys of _EXPORTS, spelled out for readers and linters
    "LoadedModel",
    "ServeSettings",
    "app_from_env",
    "check_port",
    "create_app",
    "create_fastapi_app",
    "load_and_warm",
    "load_model",
    "run_server",
]

if TYPE_CHECKING:
    from bnfold.serve.http import create_app, create_fastapi_app
    from bnfold.serve.model import LoadedModel, load_and_warm, load_model
    from bnfold.serve.server import app_from_env, check_port, run_server
    from bnfold.serve.settings import ServeSettings


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bnfold.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
