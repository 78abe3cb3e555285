"""bnfold: train a BatchNorm character MLP, fold its BatchNorms (in it, in any torch module,
in any ONNX file), prove the folded network computes the same thing, export, sample.

The Python API, one import::

    import bnfold

    run = bnfold.train(steps=300)                # ./models/bn.pt
    folded = bnfold.fold(run.path)               # ./models/folded.pt, verified
    print(bnfold.verify(run.path, folded.path))  # as `bnfold verify` prints it

Functions: :func:`train`, :func:`report`, :func:`fold`, :func:`verify`, :func:`export`,
:func:`sample` (:mod:`bnfold.api`). ``import bnfold`` stays fast: torch, ONNX and pydantic
are imported by the functions that need them.
"""

from __future__ import annotations

import importlib

from bnfold.version import __version__

# Three API functions share their names with subpackages (bnfold.fold, bnfold.report,
# bnfold.verify). Python binds a subpackage to its parent's attribute when it is first
# imported, so they are imported here (empty __init__s: free), before the functions bind
# the names: any later `import bnfold.fold.modules` leaves `bnfold.fold` the function.
for _package in ("fold", "report", "verify"):
    importlib.import_module(f"bnfold.{_package}")

from bnfold import api  # noqa: E402
from bnfold.api import *  # noqa: E402, F403 (the API's names, listed once: api.__all__)
from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.mlp.config import TrainConfig  # noqa: E402 (torch-free)

# the public names: the API's functions and results (its DEFAULT_* paths stay in bnfold.api)
__all__ = [
    "BnfoldError",
    "TrainConfig",
    "__version__",
    *(name for name in api.__all__ if not name.startswith("DEFAULT_")),
]
