"""Atomic writes: a crash leaves either the old file (or folder) or the new one, never half of
one. What is written gets the usual permissions (0666 / 0777 less the umask), not the private
ones of a temporary file.

The one rule for replacing (`force`): a command replaces only what it writes itself. A folder
it writes may be replaced only if it holds nothing but the names the command writes; the
current directory, a link or a plain file in the way are never replaced."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Collection

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 64 << 20  # no JSON file we read is legitimately larger
MAX_JSONL_BYTES = 512 << 20  # a run's results and predictions: thousands of cells, tens of MB


class OutputExistsError(FileExistsError, ValueError):
    """An output that is in the way; the message says what to do. (A ValueError too, as the
    writers raised before.)"""


def _umask() -> int:
    """The process umask. Read it from /proc where possible: os.umask() can only read it by
    setting it, which would race with other threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_file_target(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output unless `force`; never replace a folder or a link with a file."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputExistsError(f"{path}: is a folder or a link, not a file this command wrote; "
                                "choose another path")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; choose another path or pass --force "
                                "to replace it")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_text(path: str | os.PathLike, limit: int) -> str:
    """A text file's contents, read with a cap: a device (a link to /dev/zero), a pipe, a
    folder, a file larger than `limit` bytes or one that is not UTF-8 is a ValueError naming
    it, never read without end. FileNotFoundError when it is missing."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: not a regular file (a device, a pipe or a folder); "
                         "point at a plain file")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit >> 20} MB; not a file this reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES):
    """json.load with a size cap (read_text). Raises ValueError for a file that is too large,
    not UTF-8, or not JSON (RecursionError included)."""
    text = read_text(path, limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


def check_dir_target(target: Path, force: bool, owned: Collection[str]) -> None:
    """The `force` rule for a folder the command writes (see the module docstring)."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputExistsError(f"{target}: a file or link is in the way; remove it or choose "
                                "another folder")
    if not target.exists():
        return
    if target.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise OutputExistsError(f"{target}: is the current directory (or holds it); write into "
                                "a new folder instead, e.g. -o out/")
    present = sorted(p.name for p in target.iterdir())
    if not present:
        return  # an empty folder: nothing to lose
    if not force:
        raise OutputExistsError(f"{target}: already exists; choose another path or pass --force "
                                "to replace it")
    foreign = [n for n in present if n not in owned]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputExistsError(f"{target}: holds files this command did not write ({shown}); "
                                "--force replaces only its own files: move them away or choose "
                                "another folder")


@contextmanager
def atomic_dir(target: str | os.PathLike, force: bool = False, owned: Collection[str] = ()):
    """Yield an empty staging folder beside `target`; when the block succeeds it replaces
    `target`. `owned` names what the command writes: an existing `target` is replaced only
    with `force` and only if it holds nothing else (checked before the work and again before
    the swap). The old folder is moved aside before the swap and deleted after it, so a crash
    in between leaves it intact; when the block fails, `target` is untouched."""
    target = Path(target)
    check_dir_target(target, force, owned)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        mask = _umask()  # some writers (safetensors) create private 0600 files
        for path in staging.rglob("*"):
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        check_dir_target(target, force, owned)
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)) \
            if target.exists() else None
        if old:
            os.replace(target, old / "dir")
        os.replace(staging, target)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: Path, strict: bool = False) -> list[dict]:
    """One JSON object per line; blank lines skipped.

    strict=False (files this package appends to, e.g. the runner's results): whole lines only;
    a line cut by a crash (bad JSON, or the last line without its newline) is skipped with a
    warning and the lines after it are kept; a missing file is empty.
    strict=True (files a user wrote, e.g. compose's examples): a line that is not a JSON
    object is a ValueError naming file:line; a missing file is an error."""
    path = Path(path)
    if not strict and not path.exists():
        return []
    rows = []
    for number, line in enumerate(read_text(path, MAX_JSONL_BYTES).splitlines(keepends=True), 1):
        if not line.strip():
            continue
        if strict:
            rows.append(_json_object(line, path, number))
            continue
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            log.warning("%s:%d: skipped a torn line (a run was killed while writing it)", path, number)
    return rows


def _json_object(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}:{number}: JSON nested too deeply") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{number}: not a JSON object ({line.strip()[:40]}); write one "
                         '{"key": value, ...} per line')
    return row
