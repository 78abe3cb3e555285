"""Loading the model a worker serves, and what ``/v1/model`` shows about it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.runtime.infer import load_predictor
from bnfold.runtime.predictor import Predictor
from bnfold.sampling.engine import engine_kind
from bnfold.sampling.sample import Labeler, SampleOptions, load_labeler, sample_names
from bnfold.serve.settings import ServeSettings


@dataclass
class LoadedModel:
    predictor: Predictor
    labeler: Labeler
    info: dict[str, Any]

    @property
    def sha256(self) -> str:
        """The model file's sha256 (the predictor's: stated once)."""
        return self.predictor.sha256


def load_model(settings: ServeSettings) -> LoadedModel:
    """Load the predictor and the novelty labeler; collect what ``/v1/model`` shows."""
    path = Path(settings.model)
    predictor = load_predictor(path)
    labeler = load_labeler(predictor, settings.words)
    meta = predictor.metadata
    info = {
        "name": path.name,
        "sha256": predictor.sha256,
        "backend": predictor.backend,
        "folded": bool(predictor.folded),
        "vocabulary": list(predictor.vocab.chars),
        "vocab_size": predictor.vocab.size,
        "end_token": 0,
        "block_size": predictor.block_size,
        "parameters": predictor.parameters,
        "model_config": meta.get("model_config"),
        "verification": meta.get("verification"),
        "source_checkpoint": meta.get("source_checkpoint"),
        "source_sha256": meta.get("source_sha256"),
        "bnfold_version": meta.get("bnfold_version"),
        "data_sha256": predictor.data_sha256,
        "words": {
            "file": Path(settings.words).name,
            "sha256": labeler.sha256,
            "verified": labeler.verified,
        },
        "service": {
            "batching": "step" if settings.batching else "off",
            "engine": engine_kind(settings.engine, predictor.vocab.size, predictor.block_size),
            "max_count": settings.max_count,
            "queue_size": settings.queue_size,
            "deadline_seconds": settings.deadline,
            "max_body_bytes": settings.max_body,
            "max_rows_per_step": settings.max_rows,
            "table_mb": settings.table_mb,
            "memory_mb": settings.memory_mb,
            "ort_threads": predictor.threads,
        },
    }
    return LoadedModel(predictor, labeler, info)


def warm_up(model: LoadedModel, settings: ServeSettings) -> None:
    """Run the sampler and the largest forward step once, so the first requests are fast."""
    p = model.predictor
    sample_names(p, SampleOptions(count=64, seed=0), model.labeler, engine="network")
    p.logits(np.zeros((settings.max_rows, p.block_size), dtype=np.int64))


def load_and_warm(settings: ServeSettings) -> LoadedModel:
    model = load_model(settings)
    warm_up(model, settings)
    return model
