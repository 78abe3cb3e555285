"""The request and answer schemas of ``/v1/names``: one strict pydantic model, validated
once, for the JSON body of POST and the query string of GET alike.

Strict means a value must already be of its field's type: ``"count": "2"``, ``"count":
true`` and ``"new_only": "yes"`` are refused (pydantic's strict mode). A query string
has only text, so :func:`decode_query` first turns each value into the JSON type its field
declares, by a strict grammar (decimal digits for integers, ``true``/``false`` for
booleans, a plain decimal number for floats: no ``1_0``, no ``inf``); a value that does
not match stays text, and the model refuses it with the field's own message. Both paths
then meet :func:`validate`, and the sampler's own check (prefix characters, min vs max
length) maps to the same 422 shape, field by field.

The defaults are those of :class:`~bnfold.sampling.options.SampleOptions`, stated there
once; only ``seed`` differs (the service draws a random one when it is absent).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from bnfold.errors import BnfoldError
from bnfold.sampling.options import BOUNDS, MAX_LENGTH_CAP, SampleOptions

MAX_TEMPERATURE = 100.0  # the service's own caps, on top of the sampler's BOUNDS
MAX_TOP_K = 1_000_000
RETRY_AFTER = "1"  # seconds, for 429 and 503
_DEFAULT = SampleOptions()


def request_model(max_count: int) -> type[BaseModel]:
    """The request schema (JSON body or query string), with this server's count cap; the
    ranges are the sampler's :data:`~bnfold.sampling.options.BOUNDS`."""
    d, b = _DEFAULT, BOUNDS
    return create_model(
        "NamesRequest",
        __config__=ConfigDict(extra="forbid", strict=True),
        count=(
            int,
            Field(
                d.count,
                **b["count"].field(hi=max_count),
                description=f"Names to sample (at most {max_count}).",
            ),
        ),
        seed=(
            int | None,
            Field(
                None,
                **b["seed"].field(),
                description="Random seed; a random one (below 2**53) when omitted.",
            ),
        ),
        temperature=(
            float,
            Field(
                d.temperature,
                **b["temperature"].field(hi=MAX_TEMPERATURE),
                allow_inf_nan=False,
                description="0 = greedy (argmax); otherwise softmax(logits / temperature).",
            ),
        ),
        top_k=(
            int | None,
            Field(
                d.top_k,
                **b["top_k"].field(hi=MAX_TOP_K),
                description="Sample only among the k most likely tokens; all when omitted.",
            ),
        ),
        top_p=(
            float | None,
            Field(
                d.top_p,
                **b["top_p"].field(),
                allow_inf_nan=False,
                description="Nucleus sampling: the smallest set of mass >= p; all when omitted.",
            ),
        ),
        prefix=(
            str,
            Field(d.prefix, max_length=MAX_LENGTH_CAP, description="Start every name with this."),
        ),
        min_length=(int, Field(d.min_length, **b["min_length"].field())),
        max_length=(int, Field(d.max_length, **b["max_length"].field())),
        new_only=(bool, Field(d.new_only, description="Only names in none of train/dev/test.")),
    )


# --------------------------------------------------------------------------- query strings

_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|-?\.[0-9]+([eE][-+]?[0-9]+)?")
_BOOL = {"true": True, "false": False}


def _query_types(model: type[BaseModel]) -> dict[str, str]:
    """Each field's JSON type: "integer", "number", "boolean" or "string"."""
    kinds = {}
    for name, prop in model.model_json_schema()["properties"].items():
        types = [t.get("type") for t in prop.get("anyOf", [prop])]
        kinds[name] = next(t for t in types if t != "null")
    return kinds


def decode_query(query: bytes, kinds: dict[str, str]) -> dict[str, Any]:
    """A query string -> the JSON-typed dict it stands for (strict grammar, see the module);
    a repeated field keeps its last value, as FastAPI does."""
    out: dict[str, Any] = {}
    for key, text in urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        kind = kinds.get(key)
        value: Any = text
        if kind == "integer" and _INT.fullmatch(text):
            value = int(text)
        elif kind == "number" and _FLOAT.fullmatch(text):
            value = float(text)
        elif kind == "boolean" and text in _BOOL:
            value = _BOOL[text]
        elif kind is not None and kind != "string" and text == "null":
            value = None
        out[key] = value
    return out


# ------------------------------------------------------------------------------ answers


class Answer(NamedTuple):
    """A rendered answer: status, JSON body bytes, whether to send ``Retry-After``."""

    status: int
    body: bytes
    retry: bool = False


def error(status: int, detail: str, retry: bool = False) -> Answer:
    return Answer(status, orjson.dumps({"detail": detail}), retry)


def invalid(errors: list[dict]) -> Answer:
    """422 in FastAPI's shape: ``{"detail": [{"loc", "msg", "type"}, ...]}``."""
    return Answer(422, orjson.dumps({"detail": errors}))


def field_errors(exc: ValidationError, where: str, max_count: int) -> list[dict]:
    out = []
    for e in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [where, *(x if isinstance(x, int) else str(x) for x in e["loc"])]
        msg = e["msg"]
        if loc[1:] == ["count"] and e["type"] == "less_than_equal":
            msg = f"count must be at most {max_count} on this server (max-count)"
        out.append({"loc": loc, "msg": msg, "type": e["type"]})
    return out


# the option a SampleOptions.check message starts with -> its field
_OPTION_FIELDS = {
    "count": "count",
    "seed": "seed",
    "temperature": "temperature",
    "top-k": "top_k",
    "top-p": "top_p",
    "prefix": "prefix",
    "min-length": "min_length",
    "max-length": "max_length",
}


def option_error(exc: BnfoldError, where: str) -> list[dict]:
    """A sampler check's message as a field error (the field its message starts with)."""
    msg = str(exc)
    field = _OPTION_FIELDS.get(msg.split(" ", 1)[0])
    return [{"loc": [where, field] if field else [where], "msg": msg, "type": "value_error"}]


# ------------------------------------------------------------------- the one request path


class RequestParser:
    """Body or query -> validated request fields, or the 422 answer (one model for both)."""

    def __init__(self, max_count: int):
        self.max_count = max_count
        self.model = request_model(max_count)
        self._kinds = _query_types(self.model)

    def body(self, raw: bytes) -> dict | Answer:
        return self._validate(raw or b"{}", "body", json=True)

    def query(self, raw: bytes) -> dict | Answer:
        return self._validate(decode_query(raw, self._kinds), "query", json=False)

    def _validate(self, data: Any, where: str, json: bool) -> dict | Answer:
        try:
            valid = self.model.model_validate_json if json else self.model.model_validate
            req = valid(data)
        except ValidationError as exc:
            return invalid(field_errors(exc, where, self.max_count))
        return req.__dict__


# --------------------------------------------------------------- documented answer models


class NameItem(BaseModel):
    name: str
    label: str
    logprob: float
    index: int


class NamesResponse(BaseModel):
    names: list[NameItem]
    count: int
    seed: int
    model_sha256: str
    options: dict[str, Any]


class ErrorResponse(BaseModel):
    detail: str


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationErrorItem]


ERRORS = {
    408: {"model": ErrorResponse, "description": "Request body not received in time"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ValidationErrorResponse, "description": "Invalid options"},
    429: {"model": ErrorResponse, "description": "Queue full: retry after Retry-After seconds"},
    503: {"model": ErrorResponse, "description": "Not ready (loading or draining)"},
    504: {"model": ErrorResponse, "description": "Deadline exceeded"},
}
