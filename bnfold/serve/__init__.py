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

from bnfold.serve.http import create_app, create_fastapi_app
from bnfold.serve.model import LoadedModel, load_and_warm, load_model
from bnfold.serve.server import app_from_env, check_port, run_server
from bnfold.serve.settings import ServeSettings

__all__ = [
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
