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
  not indexed, and deletes stale temporary files (under the lock no other writer has any):
  only the names its own atomic writes make (`.index.json.*.tmp`, `.<expert file>.*.tmp`),
  plain files at the top level; nothing else in the folder is ever deleted;
- file names are an injective escape of the expert's name, and every path read from the
  index must be a plain file name inside the root: nothing outside the library is touched;
- a damaged index entry or expert file is skipped with its name; the rest keeps working; an
  index that points two names at one file is refused by writers (nothing is removed) until
  `rebuild` indexes the files by their own headers;
- what is stored is decided by the expert file's own header, never by the index alone (a
  killed `add --force` may leave the index describing the file it replaced: it is repaired);
- reading (read_only=True) writes nothing, and the folder is made on the first write only; a
  folder is a library only if it has an index.json, holds nothing but expert files, or is empty.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from lorahub_compeft.codecs import base as codecs
from lorahub_compeft.io.adapters import Adapter
from lorahub_compeft.io.base_models import base_identity, same_base
from lorahub_compeft.sampling import sample_names
from lorahub_compeft.store.expert import CompressedExpert, ExpertFileError, compress, load_expert
from lorahub_compeft.io.files import atomic_write_text, read_json
from lorahub_compeft.store.index import (INDEX_NAME, INDEX_VERSION, LOCK_NAME, SUFFIX, TEMP_NAME,
                                         LibraryError, entry_problem, file_name_for, is_library)

log = logging.getLogger(__name__)


class ExpertLibrary:
    def __init__(self, root: str | os.PathLike, cache_size: int = 32, create: bool = True,
                 read_only: bool = False, one_base: bool = True):
        """one_base: refuse experts of another base model than the library's (False for a
        cache of compressed copies, such as the evaluation pool's)."""
        self.root = Path(root)
        self.read_only, self.one_base = read_only, one_base
        if self.root.exists() and not self.root.is_dir():
            raise LibraryError(f"{self.root} is a file, not a library folder; point at a "
                               "library folder or a new path")
        if not self.root.is_dir():
            if not create or read_only:
                raise LibraryError(f"{self.root}: no such library; create it with "
                                   "`lorahub-compeft library add`")
        elif not is_library(self.root):  # (a new library's folder is made on its first write)
            raise LibraryError(f"{self.root}: not an expert library (no {INDEX_NAME}, and it "
                               "holds other files); point at a library folder or a new one")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, CompressedExpert] = OrderedDict()
        self._conflict, self.already_stored = None, set()  # shared files; names add() left as stored
        self._index = self._load_index()
        if not read_only and not self._conflict and (self.stray_files() or self.temp_files()):
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
        experts, owners = {}, {}
        for name, entry in data["experts"].items():
            problem = entry_problem(name, entry)
            if problem:
                log.warning("%s: skipping the damaged entry %r: %s", self.index_path, name, problem)
            elif not (self.root / entry["file"]).is_file():
                log.warning("%s: skipping %r: its file %s is gone", self.index_path, name,
                            entry["file"])
            else:
                experts[name] = entry
                owners.setdefault(entry["file"], []).append(name)
        shared = sorted(names for names in owners.values() if len(names) > 1)
        self._conflict = None
        if shared:  # which one the file holds is for its header to say: neither is trusted
            self._conflict = (f"{self.index_path} lists {' and '.join(map(repr, shared[0]))} with "
                              f"the same file {experts[shared[0][0]]['file']}")
            log.warning("%s; skipping them", self._conflict)
            for name in sum(shared, []):
                del experts[name]
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
                entry = _entry_of(expert, path)
            except ExpertFileError as err:
                log.warning("skipping %s", err)
                continue
            if entry["name"] in experts:
                log.warning("skipping %s: %r is also in %s", path, entry["name"], experts[entry["name"]]["file"])
                continue
            experts[entry["name"]] = entry
        return experts

    def rebuild_index(self) -> dict[str, dict]:
        """Re-read every expert file's header; unreadable files are skipped with a warning."""
        self._require_writable("rebuild")
        with self._locked(tidy=False, repair=True):
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
        """Temporary files a killed writer left: the names the library's own writes make,
        plain files at the top level."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink())

    @contextmanager
    def _locked(self, tidy: bool = True, repair: bool = False):
        """Hold the library's lock: re-read the index (another process may have changed it),
        tidy (adopt stray files that verify, delete stale temporary files), yield. The folder
        is made here, on the first write; a lock file that is a link is refused."""
        self._require_writable("change")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND |
                         os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            raise LibraryError(f"{self.root} is a file, not a library folder; point at a "
                               "library folder or a new path") from None
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise LibraryError(f"{self.root / LOCK_NAME} is a link, not the library's lock file; "
                               "remove the link (nothing was written)") from None
        with os.fdopen(fd, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fresh = self._read_index()
                if fresh is not None:
                    self._index = fresh
                if self._conflict and not repair:
                    raise LibraryError(f"{self._conflict}; nothing was changed: give each its own "
                                       "file in index.json, or index the files by their own "
                                       f"headers with `lorahub-compeft library rebuild {self.root}`")
                if tidy:
                    self._tidy()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _tidy(self) -> None:
        for path in self.temp_files():  # under the lock, no writer is using one
            log.info("removing the stale temporary file %s", path)
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
        """Compress a PEFT adapter (dir or Hub id), or store an expert file or a
        CompressedExpert as it is. options, codec and overrides as `compress` takes them (no
        options: the package's defaults, as `library add`). Adding what is already stored (by
        the stored file's own header: same source and settings, or the same expert) changes
        nothing (its name goes into `already_stored`), so a rerun of an interrupted
        add finishes the job. An expert of another base model than the library's is refused."""
        self._require_writable("add to")
        if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
            source = load_expert(source)  # an expert file: stored as it is
        stored_as_is = isinstance(source, CompressedExpert)
        if stored_as_is and (options is not None or codec or overrides):
            raise LibraryError("an expert file or CompressedExpert is stored as it is; compression "
                               "options apply to PEFT adapters (dirs or Hub ids)")
        if stored_as_is:
            if name:
                source.meta["name"] = name
            key, same = source.name, source.same_as
        else:
            unit = codecs.choose(codec, options)
            options = unit.options(options, **overrides)
            wanted = _source_of(source, revision)
            key = name or wanted.get("hub_id") or Path(wanted.get("path", "expert")).name
            def same(held: CompressedExpert) -> bool:
                return held.codec == unit.name and held.meta["source"] == wanted and \
                    unit.same_setting(held.summary(), options)
        if key in self._index:  # decided under the lock, before any work
            with self._locked():
                stored = self._stored(key, same, force)
            if stored is not None:
                return stored
        expert = source if stored_as_is else compress(source, options, name=name, revision=revision)
        name = expert.name
        path = self.root / file_name_for(name)
        with self._locked():
            if name in self._index:  # another writer may have stored it meanwhile
                stored = self._stored(name, same, force)
                if stored is not None:
                    return stored
            owner = next((n for n, e in self._index.items() if e["file"] == path.name and n != name), None)
            if owner is not None:
                raise LibraryError(f"{name!r} would be stored in {path.name}, which holds "
                                   f"{owner!r}; choose another name")
            if self.one_base:
                self._check_base(expert)
            old = self._index.get(name)
            expert.save(path, force=True)
            self._index[name] = _entry_of(expert, path)
            self._write_index()
            if old and old["file"] != path.name:
                (self.root / old["file"]).unlink(missing_ok=True)
        self._cache.pop(name, None)
        return self._index[name]

    def _stored(self, name: str, same, force: bool) -> dict | None:
        """Under the lock, by the file's own header (its index entry repaired from it): the entry if
        it holds what `same` wants; None if unreadable or, with force, another expert; else an error."""
        if name not in self._index:
            return None
        path = self._path(name)
        try:
            held = load_expert(path)
            fresh = _entry_of(held, path)
        except ExpertFileError as err:  # the library's own file, damaged: store it again
            log.warning("replacing %s", err)
            return None
        if held.name != name:
            raise LibraryError(f"{self.index_path} lists {name!r} with {path.name}, which holds "
                               f"{held.name!r}; index the files by their own headers with "
                               f"`lorahub-compeft library rebuild {self.root}`")
        if fresh != {k: v for k, v in self._index[name].items() if k in fresh}:
            log.warning("%s: the index described %r otherwise than its file's header (left by an "
                        "interrupted write); it now says what the file holds", self.root, name)
            self._index[name] = fresh
            self._write_index()
        if not same(held):
            if force:
                return None
            raise LibraryError(f"{name!r} is already in {self.root} with other settings or "
                               f"weights ({codecs.codec_of(fresh).setting_text(fresh)}); pass "
                               "force=True (--force) to replace it")
        self.already_stored.add(name)  # (logged by the command line)
        return self.entry(name)

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

    def add_many(self, sources: Iterable, options=None, progress: bool = True, **kwargs) -> list[dict]:
        """`add` each source with the same options and keyword arguments."""
        from tqdm.auto import tqdm
        bar = tqdm(list(sources), desc="compressing experts", unit="expert", disable=not progress)
        return [self.add(s, options, **kwargs) for s in bar]

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




def _source_of(source, revision: str | None) -> dict:
    """What compressing `source` records as where it came from (the header's source)."""
    if isinstance(source, Adapter):
        return dict(source.source)
    if Path(source).is_dir():
        return {"path": str(Path(source).resolve())}
    return {"hub_id": str(source), "revision": revision or "main"}


def _entry_of(expert: CompressedExpert, path: Path) -> dict:
    return dict(expert.summary(), file=path.name, file_bytes=path.stat().st_size)
