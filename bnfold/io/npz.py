"""Reading a user's ``.npz`` file of arrays with a bound on what it may make bnfold hold.

``numpy.load`` trusts the file: a header declaring a huge shape allocates that shape before
reading a byte, a zip member that inflates to gigabytes (a "zip bomb") is inflated whole,
and a ``.npy``, a bad CRC or a corrupt deflate stream end in tracebacks of four different
types. :func:`read_npz` reads the zip itself: every member's *declared* size, and then the
bytes actually inflated, count against one budget; each array's header is parsed and its
shape checked against the bytes the member holds before any array exists; anything else is
one ``BnfoldError`` naming the file.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.io.files import MiB, read_bounded

# what an --inputs file may hold, compressed (the file) and inflated (its arrays together)
MAX_NPZ_BYTES = 1024 * MiB
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
# a bad CRC or directory, a corrupt deflate stream, a truncated member, an unknown method
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError)


def _array(name: str, data: bytes, where: str) -> np.ndarray:
    """One ``.npy`` member as an array, its header checked against its bytes first."""
    f = io.BytesIO(data)
    try:
        major, minor = np.lib.format.read_magic(f)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif (major, minor) == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {major}.{minor} is not supported")
    except (ValueError, TypeError, SyntaxError, EOFError) as e:
        raise BnfoldError(f"{where}: array {name!r}: bad .npy header: {str(e)[:150]}") from None
    if dtype.hasobject:
        raise BnfoldError(f"{where}: array {name!r} holds Python objects; give numeric arrays")
    body = memoryview(data)[f.tell() :]
    want = math.prod(shape) * dtype.itemsize
    if len(body) != want:
        raise BnfoldError(
            f"{where}: array {name!r}: its header declares shape {list(shape)} of {dtype}"
            f" ({want:,} bytes) but it holds {len(body):,} bytes"
        )
    flat = np.frombuffer(body, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def read_npz(path, limit: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (``np.savez``/``np.savez_compressed``), by name.

    The file and its arrays together hold at most ``limit`` bytes; a ``.npy``, a file that
    is not a zip, a member that is not a ``.npy``, a bad CRC, a corrupt compressed stream,
    a header whose shape disagrees with the member's bytes and an object array are each
    refused with one ``BnfoldError``.
    """
    where = str(path)
    raw = read_bounded(path, limit, "an .npz file")
    if raw.startswith(_NPY_MAGIC):
        raise BnfoldError(
            f"{where}: is a .npy file (one array); give an .npz (numpy.savez) with one array"
            " per graph input"
        )
    if not raw.startswith(_ZIP_MAGICS):
        raise BnfoldError(f"{where}: not an .npz file (not a zip archive)")
    arrays: dict[str, np.ndarray] = {}
    budget = limit
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            members = z.infolist()
            declared = sum(m.file_size for m in members)
            if declared > limit:
                raise BnfoldError(
                    f"{where}: its arrays would take {declared:,} bytes, more than an .npz"
                    f" file may hold ({limit:,})"
                )
            for m in members:
                if m.is_dir() or not m.filename.endswith(".npy"):
                    raise BnfoldError(f"{where}: member {m.filename!r} is not a .npy array")
                with z.open(m) as member:
                    data = member.read(budget + 1)  # the declared size may lie: bound it
                if len(data) > budget:
                    raise BnfoldError(f"{where}: its arrays inflate to more than {limit:,} bytes")
                budget -= len(data)
                name = m.filename.removesuffix(".npy")
                if name in arrays:
                    raise BnfoldError(f"{where}: holds array {name!r} twice")
                arrays[name] = _array(name, data, where)
    except BnfoldError:
        raise
    except _DAMAGED as e:
        raise BnfoldError(f"{where}: a damaged .npz file: {str(e)[:150]}") from None
    return arrays
