"""Reading and writing files safely: bounded reads, outputs checked before work starts,
atomic writes that never leave half a file (nor stale temp files) behind.

Every way the file system can say no (a missing folder, a file where a folder should be, a
folder where a file should be, no permission, a full disk) becomes one ``BnfoldError``
naming the path, never an ``OSError`` traceback.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bnfold.errors import BnfoldError

MiB = 1 << 20
# A temp file of a writer that left no live process behind is stale; one without a
# process id (bnfold < 0.1.1 wrote those) is stale once it is this old.
STALE_TEMP_SECONDS = 3600


def describe_os_error(e: OSError) -> str:
    """``e`` as a short reason, e.g. ``no space left on device``."""
    if e.errno is not None and e.errno in errno.errorcode:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


def bytes_sha256(data: bytes) -> str:
    """The hex sha256 of ``data``: how bnfold names a file's contents."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of the file at ``path``, read in 1 MiB chunks (for files bnfold does
    not otherwise read; a file it reads is hashed from the bytes it read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def read_bounded(
    path: str | Path,
    limit: int,
    what: str,
    missing: str | None = None,
    directory: str | None = None,
) -> bytes:
    """The bytes of ``path``, ``what`` (e.g. "a words file") of at most ``limit`` bytes.

    Refuses a missing path, a directory and a device (``/dev/zero`` never ends) with one
    clear line, and reads a pipe only up to ``limit + 1`` bytes, so no input can make bnfold
    read without bound. ``missing`` / ``directory``: the caller's own words (after
    ``PATH: ``) for a missing path and a directory.
    """
    p = Path(path)
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a parent is a file
        raise BnfoldError(f"{p}: {missing or f'no such file (expected {what})'}") from None
    except OSError as e:
        raise BnfoldError(f"{p}: cannot read it: {describe_os_error(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BnfoldError(f"{p}: {directory or f'is a directory, not {what}'}")
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        raise BnfoldError(f"{p}: is a device, not {what}")
    if stat.S_ISREG(st.st_mode) and st.st_size > limit:
        raise BnfoldError(f"{p}: {st.st_size:,} bytes, more than {what} may hold ({limit:,})")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BnfoldError(f"{p}: cannot read it: {describe_os_error(e)}") from None
    if len(data) > limit:
        raise BnfoldError(f"{p}: more than {what} may hold ({limit:,} bytes)")
    return data


def check_output_dir(path: str | Path) -> Path:
    """Refuse, before any work is done, an output folder that cannot be made or written:
    ``path`` or one of its parents is a file, or the nearest existing one is read-only."""
    p = Path(path)
    for parent in (p, *p.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                if parent == p:
                    raise BnfoldError(f"{p}: exists and is not a folder; give an output folder")
                raise BnfoldError(f"{p}: cannot be made: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise BnfoldError(f"{p}: cannot write there ({parent} is not writable)")
            break
    return p


def check_output_file(path: str | Path) -> Path:
    """Refuse, before any work is done, an output file path that cannot be written: it is a
    folder, or its folder cannot be made or written (see :func:`check_output_dir`)."""
    p = Path(path)
    if p.is_dir():
        raise BnfoldError(f"{p}: is a directory; give a file path to write")
    check_output_dir(p.parent)
    return p


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete temp files that an interrupted :func:`atomic_write` of ``path`` left behind
    (the writer was killed): those whose process is gone, or, without a process id, that
    are older than ``STALE_TEMP_SECONDS``. A live writer's temp file is left alone."""
    path = Path(path)
    removed = []
    prefix = _temp_prefix(path)
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for tmp in candidates:
        if not tmp.name.endswith(".tmp"):
            continue
        pid_text = tmp.name[len(prefix) :].split("-", 1)[0]
        try:
            if pid_text.isdigit() and "-" in tmp.name[len(prefix) :]:
                if _process_alive(int(pid_text)):
                    continue
            elif time.time() - tmp.stat().st_mtime < STALE_TEMP_SECONDS:
                continue
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            continue
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: a crash or Ctrl-C leaves
    either the old file or the new one, never half of one. Temp files of earlier writers
    that were killed are removed first. An ``OSError`` (full disk, no permission, a folder
    in the way) becomes one ``BnfoldError`` naming ``path``; nothing is left behind."""
    path = Path(path)
    tmp, _ = _temp_beside(path)
    try:
        _fill(tmp, write)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise BnfoldError(f"{path}: cannot write: {describe_os_error(e)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _temp_beside(path: Path) -> tuple[str, Path | None]:
    """A new empty temp file in ``path``'s folder (made if missing; stale temp files of
    killed writers removed), and the first folder this made (``None``: none)."""
    if path.is_dir():
        raise BnfoldError(f"{path}: is a directory; cannot write a file there")
    made = next((p for p in reversed(path.parents) if not p.exists()), None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        # the writer's pid in the name tells a later writer whether this file is stale
        fd, tmp = tempfile.mkstemp(
            prefix=f"{_temp_prefix(path)}{os.getpid()}-", suffix=".tmp", dir=path.parent
        )
        os.close(fd)
        # mkstemp's file is private (0600); the result is an ordinary, shareable file.
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise BnfoldError(f"{path}: cannot write: {describe_os_error(e)}") from None
    return tmp, made


def _fill(tmp: str, write: Callable[[str], None]) -> None:
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


class BackgroundWrite:
    """:func:`atomic_write` in two steps, so that making and writing a large file overlaps
    other work (verifying it): ``write(temp_path)`` fills a temp file beside ``path``, then
    it goes to disk (fsync), in a thread started at once; :meth:`commit` waits for it and
    renames the temp file over ``path`` (or raises what ``write`` raised); :meth:`discard`
    waits and removes it, and the folders it made. Until :meth:`commit`, nothing at
    ``path`` has changed."""

    def __init__(self, path: str | Path, write: Callable[[str], None]):
        self.path = Path(path)
        self._tmp, self._made = _temp_beside(self.path)
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._write, args=(write,), name="bnfold-write", daemon=True
        )
        self._thread.start()

    def _write(self, write: Callable[[str], None]) -> None:
        try:
            _fill(self._tmp, write)
        except BaseException as e:  # reported by commit(), in the caller's thread
            self._error = e

    def commit(self) -> Path:
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.discard()
            raise BnfoldError(f"{self.path}: cannot write: {describe_os_error(e)}") from None
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        self._thread.join()
        Path(self._tmp).unlink(missing_ok=True)
        if self._made is not None:  # the folders made for the file, innermost first
            for folder in (self.path.parent, *self.path.parent.parents):
                with contextlib.suppress(OSError):
                    folder.rmdir()
                if folder == self._made:
                    break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------- staged output sets --

_STAGING = ".staging-"


class StagedOutputs:
    """A set of output files written together and moved into ``target`` (a folder) only
    when all of them are good, so a run that fails half-way never leaves new files beside
    old ones.

    The files are written into a hidden folder beside ``target`` (in its parent, so on the
    same file system and every move is one atomic rename; inside ``target`` when that is a
    mount point). :meth:`commit` moves every staged file into place and removes the folder;
    :meth:`discard` removes it and whatever is in it. A staging folder left by a killed
    process is removed by the next :class:`StagedOutputs` of the same ``target``.
    """

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.kept = False  # a failed commit could not be undone: the old files are here
        parent = self.target.resolve().parent
        prefix = f".{self.target.resolve().name or 'out'}{_STAGING}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if self.target.is_dir() and self.target.stat().st_dev != parent.stat().st_dev:
                parent = self.target.resolve()  # a mount point: renames cannot leave it
            _remove_stale_staging(parent, prefix)
            # the pid in the name tells a later run whether this folder is stale
            self.root = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
        except OSError as e:
            why = describe_os_error(e)
            raise BnfoldError(f"{self.target}: cannot stage the outputs: {why}") from None

    def path(self, final: str | Path) -> Path:
        """Where to write the file (or folder) that ends up as ``final`` under ``target``."""
        return self.root / Path(final).relative_to(self.target)

    def final(self, staged: str | Path) -> Path:
        """Where a staged path ends up once committed."""
        return self.target / Path(staged).relative_to(self.root)

    def holds(self, final: str | Path) -> bool:
        """Whether ``final`` lies under ``target`` (so it can be staged here)."""
        return Path(final).is_relative_to(self.target)

    def staged(self) -> list[tuple[Path, Path]]:
        """Every staged file (or symlink) and where it goes: ``(staged path, final path)``."""
        files = sorted(p for p in self.root.rglob("*") if p.is_file() or p.is_symlink())
        return [(p, self.final(p)) for p in files]

    def commit(self, last: tuple[str, ...] = ()) -> list[Path]:
        """:func:`commit_staged` of this one set."""
        return commit_staged([self], last)

    def keep(self, staged: str | Path, final: str | Path) -> Path:
        """Move one staged file to ``final`` (e.g. a model kept aside when the set as a
        whole failed); the rest stays staged."""
        final = Path(final)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
        except OSError as e:
            raise BnfoldError(f"{final}: cannot write: {describe_os_error(e)}") from None
        return final

    def discard(self) -> None:
        """Remove the staging folder and everything in it (nothing reaches ``target``),
        unless a failed commit left old files there (``kept``)."""
        if not self.kept:
            shutil.rmtree(self.root, ignore_errors=True)


def _remove_stale_staging(parent: Path, prefix: str) -> None:
    for p in parent.iterdir():
        pid = p.name[len(prefix) :].split("-", 1)[0] if p.name.startswith(prefix) else ""
        if pid.isdigit() and p.is_dir() and not _process_alive(int(pid)):
            if any(f.name.endswith(_REPLACED) for f in p.rglob("*")):
                continue  # old outputs a failed commit could not put back: the user's data
            shutil.rmtree(p, ignore_errors=True)


def commit_staged(stages: list[StagedOutputs], last: tuple[str, ...] = ()) -> list[Path]:
    """Move the files of every stage into place as one set (files named in ``last``, e.g. a
    model card listing the others' checksums, go last), then remove the staging folders,
    whatever happened. See :func:`commit_files`: all of the set lands, or none of it."""
    try:
        moves = [m for stage in stages for m in stage.staged()]
        moves.sort(key=lambda m: m[0].name in last)  # stable: the rest keep their order
        target = stages[0].target if stages else Path(".")
        return commit_files(moves, what=str(target))
    except _NotRolledBack:
        for stage in stages:  # they hold the old files now: never delete them
            stage.kept = True
        raise
    finally:
        for stage in stages:
            stage.discard()


_REPLACED = ".bnfold-replaced"  # a file's old version, kept in its staging folder


def commit_files(moves: list[tuple[Path, Path]], what: str = "the outputs") -> list[Path]:
    """Move each staged file ``src`` over ``dest``, all or none: when any move fails, every
    file already moved is put back, so ``dest``'s folder keeps the old set, never a mix of
    old and new files (a model card beside models whose checksums it does not list).

    Every destination is checked first, before anything moves (not a folder, its folder
    can be made and written). Each old file is moved aside next to its ``src`` (in the
    staging folder, on the same file system) before the new one takes its place, and
    stays there until the staging folder is removed. Refusals and failures are one
    ``BnfoldError`` naming the file; if putting an old file back fails too, the error says
    where it was kept.
    """
    for _, dest in moves:
        _check_destination(dest, what)
    done: list[list] = []  # [dest, where its old file went (or None), new file in place]
    made: list[Path] = []  # folders made for the new files
    current = None
    try:
        for src, dest in moves:
            current = dest
            made += _make_parents(dest.parent)
            entry = [dest, None, False]
            if dest.exists() or dest.is_symlink():
                old = src.with_name(src.name + _REPLACED)
                os.replace(dest, old)
                entry[1] = old
            done.append(entry)
            os.replace(src, dest)
            entry[2] = True
    except (OSError, KeyboardInterrupt) as e:
        _roll_back(done, made, what)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise BnfoldError(
            f"{current}: cannot move the outputs into place ({describe_os_error(e)});"
            f" {what} keeps its previous files"
        ) from None
    return [dest for dest, _, _ in done]


class _NotRolledBack(BnfoldError):
    """A failed commit could not be undone: the staging folder holds the old files."""


def _check_destination(dest: Path, what: str) -> None:
    """Refuse a destination that cannot take a file: a folder is there, or its folder
    cannot be made or written (see :func:`check_output_dir`)."""
    if dest.is_dir():
        raise BnfoldError(f"{dest}: is a directory; cannot put a file there ({what} unchanged)")
    check_output_dir(dest.parent)


def _make_parents(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; returns those made, outermost first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    missing.reverse()
    for p in missing:
        p.mkdir()
    return missing


def _roll_back(done: list[list], made: list[Path], what: str) -> None:
    """Undo :func:`commit_files`' moves, newest first: each old file put back over the new
    one (or the new one removed where there was none), then the folders it made."""
    failed = []
    for dest, old, placed in reversed(done):
        try:
            if old is not None:
                os.replace(old, dest)
            elif placed:
                dest.unlink()
        except OSError:
            failed.append((dest, old))
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()
    if failed:
        dest, old = failed[0]
        where = f"its previous version is kept as {old}" if old is not None else "it is new"
        raise _NotRolledBack(
            f"{dest}: could not put the previous file back after a failed commit ({where});"
            f" {what} now mixes old and new files"
        )
