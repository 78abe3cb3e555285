"""ONNX Runtime backend of :mod:`bnfold.runtime.infer`: an ``.onnx`` file written by
``bnfold export``.

Everything the predictor needs (vocabulary, block_size, folded or not) comes from the file's
own metadata, and is checked against the graph's input and output shapes, so a file whose
metadata is missing or disagrees with its graph is refused with one clear error naming it.

Single-example latency is dominated by per-call overhead, not arithmetic (the folded network
is ~47k multiply-adds), so ``logits`` keeps the per-call path short: one session with one
intra-op thread and sequential execution, a pre-built ``RunOptions`` and output-name list,
an id range check that costs one reduction (or a few Python comparisons for a single row),
and only ONNX Runtime's public API (``InferenceSession.run`` with the prebuilt output-name
list and run options; ``benchmarks/sampler.py`` measures it against the alternatives).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.io.files import bytes_sha256
from bnfold.io.onnx_files import load_onnx_file, weight_count
from bnfold.mlp.data import END, Vocab
from bnfold.runtime.ort_session import cpu_session
from bnfold.runtime.predictor import Predictor
from bnfold.runtime.twins import OnnxTwin, onnx_twin

FORMAT = "bnfold-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "contexts"
OUTPUT_NAME = "logits"

# metadata_props keys written by bnfold.pipeline.export; all values are strings (JSON where
# structured)
REQUIRED_KEYS = ("format", "format_version", "vocabulary", "end_token", "block_size", "folded")
OPTIONAL_JSON_KEYS = ("model_config", "verification")

_SMALL = 64  # up to this many ids, a Python min/max beats a numpy reduction


def parse_metadata(meta: dict[str, str], where: str) -> dict:
    """The bnfold metadata of an ONNX file as Python values; ``BnfoldError`` if missing/bad."""
    if meta.get("format") != FORMAT:
        raise BnfoldError(
            f"{where}: not a bnfold ONNX file (no '{FORMAT}' metadata; write one with"
            " `bnfold export`)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BnfoldError(f"{where}: ONNX metadata is missing {', '.join(missing)}")
    if meta["format_version"] != str(FORMAT_VERSION):
        raise BnfoldError(
            f"{where}: bnfold ONNX format version {meta['format_version']!r} is not supported"
            f" (this bnfold reads version {FORMAT_VERSION})"
        )
    out: dict = {}
    try:
        chars = json.loads(meta["vocabulary"])
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise ValueError("vocabulary is not a JSON list of strings")
        out["vocab"] = Vocab(tuple(chars))
        out["end_token"] = int(meta["end_token"])
        out["block_size"] = int(meta["block_size"])
        if meta["folded"] not in ("true", "false"):
            raise ValueError(f"folded must be 'true' or 'false', got {meta['folded']!r}")
        out["folded"] = meta["folded"] == "true"
        for k in OPTIONAL_JSON_KEYS:
            out[k] = json.loads(meta[k]) if k in meta else None
    except (ValueError, TypeError, BnfoldError) as e:
        raise BnfoldError(f"{where}: bad ONNX metadata: {e}") from None
    if out["end_token"] != END:
        raise BnfoldError(
            f"{where}: end token index {out['end_token']} is not supported (bnfold uses {END})"
        )
    if out["block_size"] < 1:
        raise BnfoldError(f"{where}: bad ONNX metadata: block_size {out['block_size']} < 1")
    cfg = out["model_config"]
    if cfg is not None:
        if not isinstance(cfg, dict):
            raise BnfoldError(f"{where}: bad ONNX metadata: model_config is not a JSON object")
        for key, want in (("vocab_size", out["vocab"].size), ("block_size", out["block_size"])):
            if key in cfg and cfg[key] != want:
                raise BnfoldError(
                    f"{where}: inconsistent ONNX metadata: model_config {key} {cfg[key]} != {want}"
                )
    for k in ("source_checkpoint", "source_sha256", "bnfold_version", "data_sha256"):
        out[k] = meta.get(k)
    return out


class OnnxPredictor(Predictor):
    """An ``.onnx`` file from ``bnfold export``, run by ONNX Runtime on the CPU.

    Args:
        path: the file (used for messages only when ``model_bytes`` is given).
        threads: ORT intra-op threads (1 is fastest for single examples and small batches).
        model_bytes: the serialized model, to run one that is not on disk (yet).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1, *, model_bytes: bytes | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if model_bytes is None:
            if not self.path.exists():
                raise BnfoldError(f"{self.path}: no such ONNX file")
            if self.path.is_dir():
                raise BnfoldError(f"{self.path}: is a directory, not an ONNX file")
            onnx_file = load_onnx_file(self.path)  # bounded; never reads another file
            bad = onnx_file.non_finite
            if bad:
                raise BnfoldError(
                    f"{self.path}: the weights hold NaN or infinite values"
                    f" ({', '.join(bad[:3])}): the model it was exported from diverged"
                )
            model_bytes, proto = onnx_file.data, onnx_file.proto
        else:
            proto = onnx.ModelProto.FromString(model_bytes)
        self.parameters = weight_count(proto)
        self.proto = proto  # for the float64 twin (verification); small for these models
        self.sha256 = bytes_sha256(model_bytes)
        self.threads = threads
        try:
            self.session = cpu_session(model_bytes, threads)
        except BnfoldError:
            raise
        except Exception as e:  # ORT raises its own types for unparsable/invalid models
            text = str(e).strip()
            reason = text.splitlines()[0] if text else type(e).__name__
            raise BnfoldError(
                f"{self.path}: not a readable ONNX model (truncated, corrupt or not ONNX):"
                f" {reason[:200]}"
            ) from None
        meta = parse_metadata(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        self.metadata = meta
        self.vocab = meta["vocab"]
        self.block_size = meta["block_size"]
        self.folded = meta["folded"]
        self._check_signature()
        self._outputs = [OUTPUT_NAME]
        self._vocab_size = self.vocab.size
        self._run_options = ort.RunOptions()
        self._run = self.session.run

    def _check_signature(self) -> None:
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        where = str(self.path)
        if len(ins) != 1 or ins[0].name != INPUT_NAME:
            raise BnfoldError(
                f"{where}: expected one input named {INPUT_NAME!r}, got {[i.name for i in ins]}"
            )
        if not any(o.name == OUTPUT_NAME for o in outs):
            raise BnfoldError(
                f"{where}: no output named {OUTPUT_NAME!r} (got {[o.name for o in outs]})"
            )
        inp = ins[0]
        out = next(o for o in outs if o.name == OUTPUT_NAME)
        if inp.type != "tensor(int64)":
            raise BnfoldError(f"{where}: input {INPUT_NAME!r} is {inp.type}, expected int64")
        if out.type != "tensor(float)":
            raise BnfoldError(f"{where}: output {OUTPUT_NAME!r} is {out.type}, expected float32")
        if len(inp.shape) != 2 or len(out.shape) != 2:
            raise BnfoldError(
                f"{where}: expected input [batch, block_size] and output [batch, vocab], got"
                f" {inp.shape} and {out.shape}"
            )
        if isinstance(inp.shape[0], int) or isinstance(out.shape[0], int):
            raise BnfoldError(f"{where}: the batch dimension is fixed, expected a dynamic one")
        if inp.shape[1] != self.block_size:
            raise BnfoldError(
                f"{where}: inconsistent: metadata block_size {self.block_size} but the graph"
                f" input is {inp.shape}"
            )
        if out.shape[1] != self.vocab.size:
            raise BnfoldError(
                f"{where}: inconsistent: metadata vocabulary has {self.vocab.size} tokens but"
                f" the graph output is {out.shape}"
            )

    def float64_twin(self) -> OnnxTwin | None:
        return onnx_twin(self.proto)

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        x = contexts
        if type(x) is not np.ndarray or x.dtype != np.int64:
            x = np.asarray(x)
            if x.size and x.dtype.kind not in "iu":
                raise BnfoldError(f"context ids must be integers, got dtype {x.dtype}")
            x = x.astype(np.int64)
        if x.ndim != 2 or x.shape[1] != self.block_size:
            raise BnfoldError(
                f"contexts must have shape (batch, {self.block_size}), got {tuple(x.shape)}"
            )
        n, v = x.size, self._vocab_size
        if n > _SMALL:  # negative ids wrap to huge unsigned values: one reduction checks both
            if int(x.view(np.uint64).max()) >= v:
                raise BnfoldError(f"context ids must lie in [0, {v})")
        elif n:
            for i in x.ravel().tolist():
                if not 0 <= i < v:
                    raise BnfoldError(f"context ids must lie in [0, {v})")
        return self._run(self._outputs, {INPUT_NAME: x}, self._run_options)[0]
