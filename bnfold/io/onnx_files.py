"""The one way bnfold reads an ``.onnx`` file: bounded, and never reaching outside it.

An ONNX tensor may keep its bytes in another file (``data_location: EXTERNAL`` with a
``location``). ONNX Runtime resolves that location itself, and when the model is handed
over as bytes it resolves it against the *current directory*: a crafted model could read
any file there and use its bytes as weights. So ONNX Runtime is never given a model with
an external reference: :func:`load_onnx_file` refuses external data (bnfold's own files
are self-contained), or, with ``allow_external_data=True``, reads it itself from inside
the model's own folder only (no absolute path, no ``..``, no symlink leading out, no
device) and returns the model with the data inlined.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import onnx
from onnx import TensorProto

from bnfold.errors import BnfoldError
from bnfold.io.files import MiB, bytes_sha256, describe_os_error, read_bounded

# protobuf cannot hold more than 2 GiB; the default bnfold model is 0.2 MB
MAX_ONNX_BYTES = 2048 * MiB


@dataclass(frozen=True)
class OnnxFile:
    """A loaded ``.onnx`` file: ``data`` is what to give ONNX Runtime (self-contained)."""

    path: Path
    proto: onnx.ModelProto
    data: bytes
    sha256: str  # of the file as it is on disk


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def all_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor stored in the model: initializers (dense and sparse), node attributes
    (``Constant`` values), subgraphs (``If``/``Loop``/``Scan``) and local functions."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0


def _inside_folder(location: str, folder: Path, where: str, tensor: str) -> Path:
    """``folder / location`` if it stays inside ``folder`` and is a regular file."""
    pure = PurePath(location)
    if not location or pure.is_absolute() or ".." in pure.parts or "\\" in location:
        raise BnfoldError(
            f"{where}: tensor {tensor!r} points outside the model's folder ({location!r})"
        )
    target = folder / pure
    try:
        real, real_folder = target.resolve(strict=True), folder.resolve(strict=True)
    except OSError as e:
        raise BnfoldError(
            f"{where}: external data of tensor {tensor!r} ({location!r}): {describe_os_error(e)}"
        ) from None
    if not real.is_relative_to(real_folder):  # a symlink out of the folder
        raise BnfoldError(
            f"{where}: tensor {tensor!r} points outside the model's folder ({location!r} leads"
            " elsewhere)"
        )
    if not stat.S_ISREG(real.stat().st_mode):
        raise BnfoldError(f"{where}: external data of tensor {tensor!r} is not a regular file")
    return real


def _inline_external(t: TensorProto, folder: Path, where: str, budget: int) -> int:
    """Read ``t``'s external bytes (from inside ``folder``) into ``raw_data``; returns the
    number of bytes read, at most ``budget``."""
    info = {e.key: e.value for e in t.external_data}
    source = _inside_folder(info.get("location", ""), folder, where, t.name)
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
    except ValueError:
        raise BnfoldError(f"{where}: tensor {t.name!r}: bad external data offset/length") from None
    size = source.stat().st_size
    if length < 0:
        length = size - offset
    if offset < 0 or offset + length > size:
        raise BnfoldError(f"{where}: tensor {t.name!r}: external data lies beyond its file")
    if length > budget:
        raise BnfoldError(
            f"{where}: the model with its external data exceeds {MAX_ONNX_BYTES:,} bytes"
        )
    with open(source, "rb") as f:
        f.seek(offset)
        t.raw_data = f.read(length)
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    return length


def load_onnx_file(path: str | Path, *, allow_external_data: bool = False) -> OnnxFile:
    """Read an ``.onnx`` file so that ONNX Runtime can never be led to read another file.

    The file is read with a bound (``MAX_ONNX_BYTES``) and parsed. A tensor whose data is
    external is refused (``BnfoldError``), unless ``allow_external_data``: then its bytes
    are read here, only from a regular file inside the model's own folder (never through
    an absolute path, ``..`` or a symlink out of it), and inlined. ``OnnxFile.data`` is
    the self-contained model to pass to ``onnxruntime.InferenceSession``.
    """
    p = Path(path)
    raw = read_bounded(p, MAX_ONNX_BYTES, "an ONNX file")
    where = str(p)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(raw)
    except Exception as e:  # protobuf's DecodeError, or a RuntimeWarning-turned-error
        raise BnfoldError(
            f"{where}: not a readable ONNX model (truncated, corrupt or not ONNX): {e}"[:300]
        ) from None
    external = [t for t in all_tensors(proto) if _is_external(t)]
    if external and not allow_external_data:
        first = external[0]
        location = next((e.value for e in first.external_data if e.key == "location"), "")
        raise BnfoldError(
            f"{where}: tensor {first.name!r} keeps its data in another file ({location!r});"
            " bnfold reads only self-contained ONNX files"
        )
    data = raw
    if external:
        budget = MAX_ONNX_BYTES - len(raw)
        for t in external:
            budget -= _inline_external(t, p.parent, where, budget)
        data = proto.SerializeToString()
    return OnnxFile(p, proto, data, bytes_sha256(raw))


def non_finite_initializers(proto: onnx.ModelProto) -> list[str]:
    """Names of the floating-point initializers that hold a NaN or an infinity."""
    bad = []
    floats = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
    for t in proto.graph.initializer:
        if t.data_type in floats and not np.isfinite(onnx.numpy_helper.to_array(t)).all():
            bad.append(t.name)
    return bad


def weight_count(proto: onnx.ModelProto) -> int:
    """Number of values in the graph's initializers (the model's weights)."""
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in proto.graph.initializer))
