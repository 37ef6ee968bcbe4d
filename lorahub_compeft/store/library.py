"""ExpertLibrary: a local folder of compressed experts plus an index of their headers.

    root/
      index.json                                  name -> summary (rebuilt from files if lost)
      lorahub%2Fflan_t5_large-ag_news_subset.safetensors
      ...

Listing and sampling read only the index; `get` opens one file's header; weights are decoded
when first asked for and kept in a bounded LRU cache.

What is promised:
- every write is atomic (temporary file, then rename) and every read-modify-write of the
  index holds a lock (`.lock`, fcntl), so a crash or a second writer loses nothing indexed;
- a writer first tidies what a killed writer left: it adopts expert files that verify but are
  not indexed, and deletes stale temporary files (under the lock no other writer has any);
- file names are an injective escape of the expert's name, and every path read from the
  index must be a plain file name inside the root: nothing outside the library is touched;
- a damaged index entry or expert file is skipped with its name; the rest keeps working;
- reading (read_only=True) writes nothing; a folder is a library only if it has an index.json,
  holds nothing but expert files, or is empty.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

from lorahub_compeft.codecs import base as codecs
from lorahub_compeft.io.base_models import base_identity, same_base
from lorahub_compeft.sampling import sample_names
from lorahub_compeft.store.expert import CompressedExpert, ExpertFileError, compress, load_expert
from lorahub_compeft.io.files import atomic_write_text, read_json

INDEX_NAME = "index.json"
INDEX_VERSION = 1
LOCK_NAME = ".lock"
SUFFIX = ".safetensors"
_TEMP = re.compile(r"^\..*\.(tmp|old)$")
log = logging.getLogger(__name__)


class LibraryError(ValueError):
    """A library operation that cannot be done; the message says why and what to do."""


def file_name_for(name: str) -> str:
    """An expert's file name: the name percent-escaped (injective: two names never share a
    file), e.g. owner/name -> owner%2Fname.safetensors. Names made of letters, digits, _ . -
    keep their spelling."""
    if not isinstance(name, str) or not name or len(name) > 200 or "\0" in name:
        raise LibraryError(f"{name!r} cannot be used as an expert name; use 1 to 200 "
                           "characters, e.g. owner/name")
    safe = quote(name, safe="")
    if safe.startswith("."):
        safe = "%2E" + safe[1:]
    return f"{safe}{SUFFIX}"


def _plain_name(file: object) -> bool:
    """A file name the index may point at: one plain component inside the root."""
    return isinstance(file, str) and file.endswith(SUFFIX) and "/" not in file and \
        "\\" not in file and "\0" not in file and not file.startswith(".")


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return "not an object"
    if not _plain_name(entry.get("file")):
        return f"its file {entry.get('file')!r} is not a file name inside the library"
    sizes = entry.get("sizes")
    if not isinstance(sizes, dict) or not all(
            isinstance(sizes.get(k), int) and sizes[k] > 0 for k in ("payload_bytes", "fp16_bytes")):
        return "its sizes are damaged"
    codec = entry.get("codec", codecs.DEFAULT_CODEC)
    if codec not in codecs.names():
        return f"its codec {codec!r} is not one this lorahub-compeft reads"
    return codecs.get(codec).check_summary(entry)


def is_library(root: Path) -> bool:
    """Says so (index.json), holds only expert and library files, or is empty."""
    if (root / INDEX_NAME).is_file():
        return True
    return all(p.name.endswith(SUFFIX) or p.name == LOCK_NAME or _TEMP.match(p.name)
               for p in root.iterdir())


class ExpertLibrary:
    def __init__(self, root: str | os.PathLike, cache_size: int = 32, create: bool = True,
                 read_only: bool = False, one_base: bool = True):
        """one_base: refuse experts of another base model than the library's (False for a
        cache of compressed copies, such as the evaluation pool's)."""
        self.root = Path(root)
        self.read_only, self.one_base = read_only, one_base
        if not self.root.is_dir():
            if not create or read_only:
                raise LibraryError(f"{self.root}: no such library; create it with "
                                   "`lorahub-compeft library add`")
            try:  # another process may create it at the same moment: that is fine
                self.root.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise LibraryError(f"{self.root} is a file, not a library folder; point at a "
                                   "library folder or a new path") from None
        if not is_library(self.root):
            raise LibraryError(f"{self.root}: not an expert library (no {INDEX_NAME}, and it "
                               "holds other files); point at a library folder or a new one")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, CompressedExpert] = OrderedDict()
        self._index = self._load_index()
        if not read_only and (self.stray_files() or self.temp_files()):
            with self._locked():
                pass  # a writer tidies what a killed writer left

    # --- the index --------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _path(self, name: str) -> Path:
        return self.root / self._index[name]["file"]

    def _read_index(self) -> dict[str, dict] | None:
        """The index's valid entries (damaged ones skipped by name), or None when it is
        missing, damaged as a whole, or lists files that are gone."""
        try:
            data = read_json(self.index_path)
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as err:
            log.warning("%s is damaged (%s)", self.index_path, err)
            return None
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION or \
                not isinstance(data.get("experts"), dict):
            log.warning("%s has an unexpected layout", self.index_path)
            return None
        experts = {}
        for name, entry in data["experts"].items():
            problem = _entry_problem(entry)
            if problem:
                log.warning("%s: skipping the damaged entry %r: %s", self.index_path, name, problem)
            elif not (self.root / entry["file"]).is_file():
                log.warning("%s: skipping %r: its file %s is gone", self.index_path, name,
                            entry["file"])
            else:
                experts[name] = entry
        return experts

    def _load_index(self) -> dict[str, dict]:
        experts = self._read_index()
        if experts is not None:
            return experts
        if not any(self.root.glob(f"*{SUFFIX}")):
            return {}
        return self._scan() if self.read_only else self.rebuild_index()

    def _scan(self, paths: Iterable[Path] | None = None, verify: bool = False) -> dict[str, dict]:
        """Index entries from expert files' headers (and payloads, with verify); files that
        fail are skipped with a warning naming them."""
        experts = {}
        for path in sorted(self.root.glob(f"*{SUFFIX}") if paths is None else paths):
            try:
                expert = load_expert(path)
                if verify:  # reads, checks and decodes the payload
                    expert.weights()
                summary = expert.summary()
            except ExpertFileError as err:
                log.warning("skipping %s", err)
                continue
            if summary["name"] in experts:
                log.warning("skipping %s: %r is also in %s", path, summary["name"],
                            experts[summary["name"]]["file"])
                continue
            experts[summary["name"]] = dict(summary, file=path.name, file_bytes=path.stat().st_size)
        return experts

    def rebuild_index(self) -> dict[str, dict]:
        """Re-read every expert file's header; unreadable files are skipped with a warning."""
        self._require_writable("rebuild")
        with self._locked(tidy=False):
            self._index = self._scan()
            self._write_index()
        return self._index

    def _write_index(self) -> None:
        atomic_write_text(self.index_path, json.dumps(
            {"version": INDEX_VERSION, "experts": self._index}, indent=1, sort_keys=True))

    def stray_files(self) -> list[Path]:
        """Expert files the index does not list (left by a killed writer, or copied in)."""
        listed = {e["file"] for e in self._index.values()}
        return sorted(p for p in self.root.glob(f"*{SUFFIX}") if p.name not in listed)

    def temp_files(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if _TEMP.match(p.name))

    @contextmanager
    def _locked(self, tidy: bool = True):
        """Hold the library's lock: re-read the index (another process may have changed it),
        tidy (adopt stray files that verify, delete stale temporary files), yield."""
        self._require_writable("change")
        with open(self.root / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fresh = self._read_index()
                if fresh is not None:
                    self._index = fresh
                if tidy:
                    self._tidy()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _tidy(self) -> None:
        for path in self.temp_files():  # under the lock, no writer is using one
            log.info("removing the stale temporary file %s", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        adopted = {n: e for n, e in self._scan(self.stray_files(), verify=True).items()
                   if n not in self._index}
        if adopted:
            log.warning("%s: adopting %d expert file(s) that were not indexed: %s", self.root,
                        len(adopted), ", ".join(sorted(adopted)))
            self._index.update(adopted)
            self._write_index()

    def _require_writable(self, what: str) -> None:
        if self.read_only:
            raise LibraryError(f"{self.root}: opened read-only; cannot {what} it")

    # --- reading ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def entries(self) -> list[dict]:
        return [self.entry(n) for n in self.names()]

    def entry(self, name: str) -> dict:
        self._require(name)
        entry = dict(self._index[name])
        if "file_bytes" not in entry:  # indexes written before it was recorded
            entry["file_bytes"] = self._path(name).stat().st_size
        return entry

    def _require(self, name: str) -> None:
        if name not in self._index:
            hint = f"; it holds {', '.join(self.names()[:5])}" + (" ..." if len(self) > 5 else "") \
                if self._index else "; it is empty"
            raise LibraryError(f"no expert named {name!r} in {self.root}{hint}")

    def get(self, name: str) -> CompressedExpert:
        """The expert, lazily: its header now, its weights when first used. Cached (LRU)."""
        self._require(name)
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        expert = load_expert(self._path(name))
        self._cache[name] = expert
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return expert

    def sample(self, n: int, seed: int) -> list[str]:
        """n distinct expert names, drawn reproducibly from the sorted names."""
        if n < 1:
            raise LibraryError(f"cannot sample {n} experts; ask for at least 1")
        if n > len(self):
            raise LibraryError(f"cannot sample {n} experts from a library of {len(self)} "
                               f"({self.root}); lower n or add experts")
        return sample_names(self.names(), n, seed)  # the runner's draw: same seed, same experts

    # --- writing ----------------------------------------------------------------------------
    def add(self, source, options=None, *, codec: str | None = None, name: str | None = None,
            force: bool = False, revision: str | None = None, **overrides) -> dict:
        """Compress a PEFT adapter (dir or Hub id) or store a CompressedExpert as is.
        options, codec and overrides as `compress` takes them (no options: the package's
        defaults, as `library add`). Adding what is already stored (same source and
        settings) changes nothing, so a rerun of an interrupted add finishes the job. An
        expert of another base model than the library's is refused."""
        self._require_writable("add to")
        stored_as_is = isinstance(source, CompressedExpert)
        if stored_as_is and (options is not None or codec or overrides):
            raise LibraryError("a CompressedExpert is stored as it is; compression options apply "
                               "to PEFT adapters (dirs or Hub ids)")
        if not stored_as_is:
            unit = codecs.choose(codec, options)
            options = unit.options(options, **overrides)
            same = self._already_stored(source, name, revision, unit, options)
            if same and not force:
                log.info("%s is already in %s with these settings", same["name"], self.root)
                return same
        expert = source if stored_as_is else compress(source, options, name=name, revision=revision)
        if name:
            expert.meta["name"] = name
        name = expert.name
        path = self.root / file_name_for(name)
        with self._locked():
            if name in self._index and not force:
                same = None if stored_as_is else self._already_stored(source, name, revision, unit,
                                                                      options)
                if same:  # another writer stored it meanwhile
                    return same
                raise LibraryError(f"{name!r} is already in {self.root} with other settings or "
                                   "weights; pass force=True (--force) to replace it")
            owner = next((n for n, e in self._index.items() if e["file"] == path.name and n != name), None)
            if owner is not None:
                raise LibraryError(f"{name!r} would be stored in {path.name}, which holds "
                                   f"{owner!r}; choose another name")
            if self.one_base:
                self._check_base(expert)
            old = self._index.get(name)
            expert.save(path, force=True)
            self._index[name] = dict(expert.summary(), file=path.name, file_bytes=path.stat().st_size)
            self._write_index()
            if old and old["file"] != path.name:
                (self.root / old["file"]).unlink(missing_ok=True)
        self._cache.pop(name, None)
        return self._index[name]

    def _check_base(self, expert: CompressedExpert) -> None:
        """Experts that can never be composed together do not share a library."""
        others = sorted((n, e.get("base_model")) for n, e in self._index.items() if n != expert.name)
        if not others:
            return
        other, base = others[0]
        same = same_base(base_identity(base), base_identity(expert.base_model))
        if same is False or (same is None and base != expert.base_model):
            raise LibraryError(f"{expert.name} was trained on {expert.base_model!r}, but this "
                               f"library's experts (e.g. {other}) on {base!r}; keep one base "
                               "model per library (use another folder)")

    def _already_stored(self, source, name, revision, unit, options) -> dict | None:
        """The entry of `source` if it is stored with these options (the codec decides what
        "the same settings" are), else None."""
        if name is None:
            text = str(source)
            name = Path(text).resolve().name if Path(text).is_dir() else text
        entry = self._index.get(name)
        if entry is None or entry.get("codec", codecs.DEFAULT_CODEC) != unit.name:
            return None
        if Path(str(source)).is_dir():
            wanted = {"path": str(Path(str(source)).resolve())}
        else:
            wanted = {"hub_id": str(source), "revision": revision or "main"}
        if entry.get("source") == wanted and unit.same_setting(entry, options):
            return self.entry(name)
        return None

    def add_many(self, sources: Iterable, options=None, progress: bool = True, **kwargs) -> list[dict]:
        """`add` each source with the same options and keyword arguments."""
        from tqdm.auto import tqdm
        sources = list(sources)
        return [self.add(s, options, **kwargs) for s in tqdm(sources, desc="compressing experts",
                                                             unit="expert", disable=not progress)]

    def remove(self, *names: str) -> None:
        """Remove experts by name: all names are checked before anything is removed."""
        self._require_writable("remove from")
        with self._locked(tidy=False):
            for name in names:
                self._require(name)
            # files first: a crash in between leaves entries whose file is gone, which readers
            # skip, rather than stray files, which the next writer would adopt back
            for name in names:
                self._path(name).unlink(missing_ok=True)
                self._index.pop(name)
                self._cache.pop(name, None)
            self._write_index()


