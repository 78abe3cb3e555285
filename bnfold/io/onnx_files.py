"""The one way bnfold reads an ``.onnx`` file: bounded, and never reaching outside it.

An ONNX tensor may keep its bytes in another file (``data_location: EXTERNAL`` with a
``location``). ONNX Runtime resolves that location itself, and when the model is handed
over as bytes it resolves it against the *current directory*: a crafted model could read
any file there and use its bytes as weights. So ONNX Runtime is never given a model with
an external reference: :func:`load_onnx_file` refuses external data (bnfold's own files
are self-contained), or, with ``allow_external_data=True``, reads it itself from inside
the model's own folder only (no absolute path, no ``..``, no symlink leading out, no
device) and returns the model with the data inlined.

"Anywhere" is every field of the ONNX schema that can hold a tensor (:func:`tensor_places`
walks the protobuf descriptors, so no place can be forgotten), and every tensor found is
checked before anything converts it (:func:`tensor_problem`: element type, dimensions, as
many stored values as declared), so a malformed weight is one clear error, never a
traceback deep in numpy or ONNX Runtime.
"""

from __future__ import annotations

import math
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePath
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto

from bnfold.errors import BnfoldError
from bnfold.io.files import MiB, describe_os_error, read_bounded

# protobuf cannot hold more than 2 GiB; the default bnfold model is 0.2 MB
MAX_ONNX_BYTES = 2048 * MiB


@dataclass(frozen=True)
class OnnxFile:
    """A loaded ``.onnx`` file: ``data`` is what to give ONNX Runtime (self-contained)."""

    path: Path
    proto: onnx.ModelProto
    file_bytes: bytes  # as read
    rewritten: bool  # external data was inlined or unknown fields dropped from ``proto``
    non_finite: tuple[str, ...] = ()  # floating weights holding NaN or infinity

    @cached_property
    def data(self) -> bytes:
        """The file's own bytes, or the model serialised again when it was rewritten: on
        first use only (serialising resnet50 costs ~0.3 s; a fold never needs it)."""
        return self.proto.SerializeToString() if self.rewritten else self.file_bytes


# ------------------------------------------------------------------ every tensor --


def _holds_tensors(desc, memo: dict[str, bool] | None = None) -> bool:
    """Whether a message of type ``desc`` can contain a ``TensorProto`` at any depth
    (decided from the protobuf schema itself, so a field added to ONNX is covered)."""
    memo = {} if memo is None else memo
    name = desc.full_name
    if name not in memo:
        memo[name] = False  # a cycle (GraphProto -> ... -> GraphProto) adds nothing new
        memo[name] = desc is TensorProto.DESCRIPTOR or any(
            f.message_type is not None and _holds_tensors(f.message_type, memo) for f in desc.fields
        )
    return memo[name]


_TENSOR_FIELDS: dict[str, list] = {}  # message type -> its fields that can hold a tensor


def _tensor_fields(desc) -> list:
    if desc.full_name not in _TENSOR_FIELDS:
        _TENSOR_FIELDS[desc.full_name] = [
            f for f in desc.fields if f.message_type is not None and _holds_tensors(f.message_type)
        ]
    return _TENSOR_FIELDS[desc.full_name]


def _label(item, index: int) -> str:
    name = getattr(item, "name", "")
    return f"[{name!r}]" if isinstance(name, str) and name else f"[{index}]"


class TensorPlace(NamedTuple):
    """A tensor stored in a model, and where: ``path`` for messages (e.g.
    ``model.graph.node['c'].attribute['value'].t``), ``fields`` the field names on the way
    (``('graph', 'node', 'attribute', 't')``)."""

    path: str
    fields: tuple[str, ...]
    tensor: TensorProto

    @property
    def is_weight(self) -> bool:
        """An initializer (of any graph), dense or the values of a sparse one."""
        return self.fields[-1:] == ("initializer",) or self.fields[-2:] == (
            "sparse_initializer",
            "values",
        )


def _walk(message, path: str, fields: tuple[str, ...]) -> Iterator[TensorPlace]:
    if isinstance(message, TensorProto):
        yield TensorPlace(path, fields, message)
        return
    for f in _tensor_fields(message.DESCRIPTOR):
        inner = (*fields, f.name)
        if f.is_repeated:
            for i, item in enumerate(getattr(message, f.name)):
                yield from _walk(item, f"{path}.{f.name}{_label(item, i)}", inner)
        elif message.HasField(f.name):
            yield from _walk(getattr(message, f.name), f"{path}.{f.name}", inner)


def tensor_places(proto: onnx.ModelProto) -> Iterator[TensorPlace]:
    """Every ``TensorProto`` stored anywhere in the model, with where it is: initializers
    (dense and sparse), node attributes of every kind, subgraphs, local functions and their
    default attributes, training info. Found by walking every field whose type can hold a
    tensor, as the protobuf schema says, not a list of places that could miss one."""
    yield from _walk(proto, "model", ())


def all_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor stored in the model (see :func:`tensor_places`)."""
    for place in tensor_places(proto):
        yield place.tensor


# sub-byte element types: bits per element in raw_data (absent from older onnx releases)
_PACKED_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(TensorProto, name)
}
_DATA_TYPES = frozenset(TensorProto.DataType.values()) - {TensorProto.UNDEFINED}


def tensor_problem(t: TensorProto, raw: bytes | None = None) -> str | None:
    """Why ``t`` is not a well-formed tensor (it must be inline: external data is inlined
    or refused first), or ``None``: a known element type, no negative dimension, no
    segments, and exactly as many stored values (``raw_data`` bytes or typed values) as its
    dimensions declare. A tensor that passes converts with ``numpy_helper.to_array``.
    ``raw``: its ``raw_data``, if the caller has it already (reading the field copies it)."""
    if t.data_type not in _DATA_TYPES:
        return f"has an unknown element type ({t.data_type})"
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        return f"has a negative dimension {dims}"
    if t.HasField("segment"):
        return "is stored in segments, which bnfold does not read"
    count = math.prod(dims)
    if t.HasField("raw_data"):
        if t.data_type == TensorProto.STRING:
            return "is a string tensor with raw_data"
        bits = _PACKED_BITS.get(
            t.data_type, 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        )
        want = (count * bits + 7) // 8
        size = len(t.raw_data if raw is None else raw)
        if size != want:
            return f"declares dims {dims} ({want:,} bytes) but holds {size:,} bytes"
    elif t.data_type == TensorProto.STRING or count:  # typed storage: one field per type
        try:
            stored = len(getattr(t, onnx.helper.tensor_dtype_to_field(t.data_type)))
        except (KeyError, ValueError):
            return f"has element type {t.data_type}, which bnfold cannot read"
        per = {4: 2, 2: 4}.get(_PACKED_BITS.get(t.data_type, 0), 1)  # values per stored int
        want = -(-count // per)
        if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
            want = 2 * count  # a real and an imaginary part per value
        if stored != want:
            return f"declares dims {dims} ({count:,} values) but holds {stored:,}"
    try:
        n = onnx.numpy_helper.to_array(t).size
    except Exception as e:  # numpy/ml_dtypes raise several types on malformed storage
        return f"cannot be read as dims {dims}: {first_line(e)}"
    if n != count:
        return f"declares dims {dims} ({count:,} values) but holds {n:,}"
    return None


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line (ONNX and ONNX Runtime messages run over several)."""
    text = " ".join(str(e).split())  # newlines and runs of spaces become one space
    return (text or type(e).__name__)[:limit]


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0


def _inside_folder(location: str, folder: Path, where: str, tensor: str) -> Path:
    """``folder / location`` if it stays inside ``folder`` and is a regular file."""
    pure = PurePath(location)
    if "\0" in location:
        raise BnfoldError(f"{where}: tensor {tensor!r}: its external data location holds a NUL")
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
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise BnfoldError(f"{where}: tensor {t.name!r}: bad external data offset/length") from None
    size = source.stat().st_size
    if length is None:
        length = size - offset
    if offset < 0 or length < 0 or offset + length > size:
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
    places = list(tensor_places(proto))
    external = [(path, t) for path, _, t in places if _is_external(t)]
    if external and not allow_external_data:
        path, first = external[0]
        location = next((e.value for e in first.external_data if e.key == "location"), "")
        raise BnfoldError(
            f"{where}: tensor {first.name!r} ({path}) keeps its data in another file"
            f" ({location!r}); bnfold reads only self-contained ONNX files"
        )
    budget = MAX_ONNX_BYTES - len(raw)
    for _, t in external:
        budget -= _inline_external(t, p.parent, where, budget)
    non_finite = []
    for place in places:
        path, t = place.path, place.tensor
        stored = t.raw_data if t.HasField("raw_data") else None  # one copy, for both checks
        problem = tensor_problem(t, stored)
        if problem:
            raise BnfoldError(f"{where}: tensor {t.name!r} ({path}) {problem}"[:400])
        if place.is_weight and not _finite(t, stored):
            non_finite.append(t.name or path)
    # Fields this onnx release does not know are dropped: ONNX Runtime must not find in
    # them a tensor (and an external reference) that the walk above could not see. The
    # file's own bytes go to ONNX Runtime when nothing was dropped or inlined.
    unknown = has_unknown_fields(proto)
    if unknown:
        proto.DiscardUnknownFields()
    return OnnxFile(p, proto, raw, bool(external) or unknown, tuple(non_finite))


_MESSAGE_FIELDS: dict[str, list] = {}  # message type -> its message-typed fields


def _message_fields(desc) -> list:
    if desc.full_name not in _MESSAGE_FIELDS:
        _MESSAGE_FIELDS[desc.full_name] = [f for f in desc.fields if f.message_type is not None]
    return _MESSAGE_FIELDS[desc.full_name]


def has_unknown_fields(message) -> bool:
    """Whether ``message`` or any message inside it holds fields its schema does not
    know (a walk over the messages, never over tensor bytes: ~10 ms for resnet50, where
    comparing the serialised size would serialise all 100 MB)."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    stack = [message]
    while stack:
        m = stack.pop()
        if len(UnknownFieldSet(m)):
            return True
        for f in _message_fields(m.DESCRIPTOR):
            if f.is_repeated:
                stack.extend(getattr(m, f.name))
            elif m.HasField(f.name):
                stack.append(getattr(m, f.name))
    return False


# raw_data is little-endian whatever the machine (the ONNX spec)
_RAW_FLOATS = {TensorProto.FLOAT: "<f4", TensorProto.DOUBLE: "<f8", TensorProto.FLOAT16: "<f2"}


def _finite(t: TensorProto, raw: bytes | None) -> bool:
    """Whether a well-formed tensor (:func:`tensor_problem`) holds no NaN or infinity
    (``True`` for non-floating types); ``raw``: its ``raw_data``, read once by the caller."""
    if t.data_type in _RAW_FLOATS and raw is not None:
        values = np.frombuffer(raw, dtype=_RAW_FLOATS[t.data_type])
    elif t.data_type in (*_RAW_FLOATS, TensorProto.BFLOAT16):
        values = onnx.numpy_helper.to_array(t)
        if values.dtype.kind != "f":  # bfloat16 (ml_dtypes): numpy's isfinite needs floats
            values = values.astype(np.float32)
    else:
        return True
    return bool(np.isfinite(values).all())


def weight_count(proto: onnx.ModelProto) -> int:
    """Number of values in the graph's initializers (the model's weights)."""
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in proto.graph.initializer))


def structure_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its main graph's initializers (copying them would cost
    as much as the parameters: ~100 MB for resnet50); the caller adds what it needs.
    Every other field is kept (metadata, functions, training info, ...)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, lambda f: f.name != "graph")
    _copy_fields(model.graph, out.graph, lambda f: f.name != "initializer")
    return out


def _copy_fields(source, target, which) -> None:
    """Copy the fields set in the protobuf message ``source`` for which ``which(field
    descriptor)`` holds into ``target``."""
    for f, value in source.ListFields():
        if not which(f):
            continue
        if f.is_repeated:
            getattr(target, f.name).extend(value)
        elif f.message_type is not None:
            getattr(target, f.name).CopyFrom(value)
        else:
            setattr(target, f.name, value)


# an initializer up to this many values stays in a structure copy: shape computations read
# small constants' values (a Reshape's target shape), and they cost nothing to keep
SMALL_TENSOR = 64


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model``'s structure for passes that need types and shapes, not weights
    (shape inference, the onnx checker): initializers above :data:`SMALL_TENSOR` values
    become typed graph inputs, so no parameter is copied or serialised (resnet50: 100 MB)."""
    out = structure_copy(model)
    declared = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if math.prod(t.dims) <= SMALL_TENSOR:
            out.graph.initializer.append(t)
        elif t.name not in declared:
            info = onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            out.graph.input.append(info)
    return out


# element types ONNX Runtime takes from numpy arrays without a conversion
_ARRAY_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64,
    TensorProto.INT32, TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL,
})  # fmt: skip
# where a weight given apart "lives": ONNX Runtime replaces every such tensor with the
# array given for it before it would read anything (it never opens this name)
IN_MEMORY = "bnfold-in-memory"


@dataclass(frozen=True)
class ModelApart:
    """A model whose large weights are held apart as arrays: ``structure`` has, in their
    place, stubs marked as external data at :data:`IN_MEMORY` (every field but the
    values), ``arrays`` their values by name. Folding, ONNX Runtime's sessions
    (``SessionOptions.add_external_initializers``) and the float64 evaluator all read the
    arrays, so no pass copies resnet50's 100 MB of weights through protobuf; :meth:`save`
    writes the self-contained model straight from them."""

    structure: onnx.ModelProto
    arrays: dict[str, np.ndarray]  # read-only: shared

    def structure_bytes(self) -> bytes:
        """The structure serialised, for an ONNX Runtime session given :attr:`arrays`."""
        return self.structure.SerializeToString()

    def whole(self) -> onnx.ModelProto:
        """The self-contained model: every stub given its array's values."""
        out = onnx.ModelProto()
        out.CopyFrom(self.structure)
        for t in out.graph.initializer:
            if is_stub(t):
                _fill_stub(t, self.arrays[t.name])
        return out

    def save(self, path: str | Path) -> None:
        """Write the self-contained model to ``path`` (the caller makes that atomic): the
        bytes of ``whole().SerializeToString()``, written piece by piece with each weight
        straight from its array. Serialising the whole model instead costs a copy of
        every weight and a buffer of the model's size (resnet50: 0.3 s, 200 MB)."""
        with open(path, "wb") as f:
            for piece in self.serialized_pieces():
                f.write(piece)

    def serialized_pieces(self) -> list[bytes | memoryview]:
        """The serialised model as pieces, whose concatenation is the model's protobuf
        encoding: each message's fields in field-number order, as protobuf writes them,
        with the graph's initializers (field 5) streamed between the fields before and
        after them, and a weight's values (``raw_data``, field 9) between its own."""
        entries: list[bytes | memoryview] = []
        for t in self.structure.graph.initializer:
            if is_stub(t):
                data = _little_endian_bytes(self.arrays[t.name])
                before, after = _around(t, _RAW_DATA, drop=_STUB_FIELDS)
                body = [before, _length_delimited(_RAW_DATA, len(data)), data, after]
            else:
                body = [t.SerializeToString()]
            entries += [_length_delimited(_INITIALIZER, sum(map(len, body))), *body]
        before, after = _around(self.structure.graph, _INITIALIZER)
        graph = [before, *entries, after]
        before, after = _around(self.structure, _GRAPH)
        return [before, _length_delimited(_GRAPH, sum(map(len, graph))), *graph, after]


# field numbers of onnx.proto (ModelProto.graph, GraphProto.initializer, TensorProto.raw_data)
_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
# a stub's fields that a weight with values does not have
_STUB_FIELDS = frozenset({"external_data", "data_location"})
# the fields that hold a tensor's values (a stub has none of them)
_TENSOR_VALUES = frozenset({
    "float_data", "int32_data", "string_data", "int64_data", "raw_data", "double_data",
    "uint64_data", "external_data", "data_location",
})  # fmt: skip


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of ``n >= 0``."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(number: int, size: int) -> bytes:
    """The key and length that precede the ``size`` bytes of field ``number`` (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(size)


def _around(message, number: int, drop: frozenset[str] = frozenset()) -> tuple[bytes, bytes]:
    """``message``'s fields numbered below and above ``number`` (but ``drop``), each part
    serialised: the bytes that come before and after field ``number``."""
    parts = type(message)(), type(message)()
    for part, below in zip(parts, (True, False), strict=True):
        _copy_fields(
            message,
            part,
            lambda f, below=below: (
                f.name not in drop and f.number != number and (f.number < number) == below
            ),
        )
    return parts[0].SerializeToString(), parts[1].SerializeToString()


def _little_endian_bytes(a: np.ndarray) -> memoryview:
    """The array's values as ``raw_data`` holds them (little-endian, C order), uncopied
    where they are already so."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a).cast("B")


def _fill_stub(t: TensorProto, value: np.ndarray) -> None:
    """Turn the stub ``t`` into the tensor holding ``value``."""
    for name in _STUB_FIELDS:
        t.ClearField(name)
    t.raw_data = bytes(_little_endian_bytes(value))


def is_stub(t: TensorProto) -> bool:
    """Whether ``t`` is a stub of a weight given apart (:class:`ModelApart`)."""
    return t.data_location == TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == IN_MEMORY for e in t.external_data
    )


def stored_array(t: TensorProto) -> np.ndarray:
    """The values ``t`` stores in the model. Never a stub's: those are held apart, and
    ``numpy_helper`` would look for a file of the stub's location (a bug: raised)."""
    if is_stub(t):
        raise ValueError(f"tensor {t.name!r} is held apart: its array was not given")
    return onnx.numpy_helper.to_array(t)


def _shared(value: np.ndarray) -> np.ndarray:
    """``value`` made read-only: a weight held apart is shared by the fold, both ONNX
    Runtime sessions and the float64 evaluation, so nothing may change it in place."""
    value.setflags(write=False)
    return value


def _keeps_apart(data_type: int, dims) -> bool:
    """Whether a weight goes apart as an array: a large one ONNX Runtime takes from numpy
    as it is (small ones stay in the structure, where shape inference reads them)."""
    return math.prod(dims) > SMALL_TENSOR and data_type in _ARRAY_TYPES


def _add_stub(graph: onnx.GraphProto, tensor: TensorProto) -> None:
    """Add ``tensor`` to ``graph``'s initializers as a stub: all but its values."""
    stub = graph.initializer.add()
    _copy_fields(tensor, stub, lambda f: f.name not in _TENSOR_VALUES)
    stub.data_location = TensorProto.EXTERNAL
    stub.external_data.add(key="location", value=IN_MEMORY)


def add_weight(graph: onnx.GraphProto, arrays: dict[str, np.ndarray], name: str, value) -> None:
    """Add the initializer ``name`` = ``value`` (an array) to ``graph``: a large one as a
    stub with its array in ``arrays`` (as :func:`weights_apart` does), a small one stored."""
    data_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    if _keeps_apart(data_type, value.shape):
        arrays[name] = _shared(value)
        _add_stub(graph, TensorProto(name=name, data_type=data_type, dims=value.shape))
    else:
        # add() + CopyFrom: append() of a tensor built elsewhere costs 4x as much
        graph.initializer.add().CopyFrom(onnx.numpy_helper.from_array(value, name))


def weights_apart(model: onnx.ModelProto) -> ModelApart:
    """``model`` with its large initializers held apart as arrays (:class:`ModelApart`):
    ONNX Runtime then never parses the weights from protobuf (resnet50's session: ~0.5 s
    from the full bytes, ~0.2 s this way), and the arrays serve the float64 evaluator and
    the fold too. A stub is marked as external data, which ONNX Runtime requires of a
    tensor it replaces (and checks against the array: name, type, shape)."""
    out = structure_copy(model)
    arrays: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        if _keeps_apart(t.data_type, t.dims):
            arrays[t.name] = _shared(onnx.numpy_helper.to_array(t))
            _add_stub(out.graph, t)
        else:
            out.graph.initializer.append(t)
    return ModelApart(out, arrays)
