"""ExpertLibrary: a local folder of compressed experts plus an index of their headers.

    root/
      index.json                                  name -> summary (rebuilt from files if lost)
      lorahub--flan_t5_large-ag_news_subset.safetensors
      ...

Listing and sampling read only the index; `get` opens one file's header; weights are decoded
when first asked for and kept in a bounded LRU cache. Every write is atomic (temporary file,
then rename), so a crash mid-write leaves the library as it was.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

from .expert import CompressedExpert, ExpertFileError, compress, load_expert
from .files import atomic_write_text

INDEX_NAME = "index.json"
INDEX_VERSION = 1
log = logging.getLogger(__name__)


class LibraryError(ValueError):
    """A library operation that cannot be done; the message says why and what to do."""


def file_name_for(name: str) -> str:
    """A Hub id such as owner/name becomes owner--name.safetensors."""
    safe = name.replace("/", "--")
    if not safe or safe.startswith(".") or any(c in safe for c in "\\:\0"):
        raise LibraryError(f"{name!r} cannot be used as an expert name")
    return f"{safe}.safetensors"


class ExpertLibrary:
    def __init__(self, root: str | os.PathLike, cache_size: int = 32, create: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            if not create:
                raise LibraryError(f"{self.root}: no such library; create it with "
                                   "`lorahub-compeft library add`")
            self.root.mkdir(parents=True)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, CompressedExpert] = OrderedDict()
        self._index = self._load_index()

    # --- the index --------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _load_index(self) -> dict[str, dict]:
        try:
            data = json.loads(self.index_path.read_text())
            if data.get("version") != INDEX_VERSION or not isinstance(data.get("experts"), dict):
                raise ValueError("unexpected layout")
            if all((self.root / e["file"]).is_file() for e in data["experts"].values()):
                return data["experts"]
            log.warning("%s lists files that are gone; rebuilding it", self.index_path)
        except FileNotFoundError:
            if not any(self.root.glob("*.safetensors")):
                return {}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s is damaged; rebuilding it from the expert files", self.index_path)
        return self.rebuild_index()

    def rebuild_index(self) -> dict[str, dict]:
        """Re-read every expert file's header; unreadable files are skipped with a warning."""
        experts = {}
        for path in sorted(self.root.glob("*.safetensors")):
            try:
                summary = load_expert(path).summary()
            except ExpertFileError as err:
                log.warning("skipping %s", err)
                continue
            experts[summary["name"]] = dict(summary, file=path.name)
        self._index = experts
        self._write_index()
        return experts

    def _write_index(self) -> None:
        atomic_write_text(self.index_path, json.dumps(
            {"version": INDEX_VERSION, "experts": self._index}, indent=1, sort_keys=True))

    # --- reading ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def entries(self) -> list[dict]:
        return [dict(self._index[n]) for n in self.names()]

    def entry(self, name: str) -> dict:
        self._require(name)
        return dict(self._index[name])

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
        expert = load_expert(self.root / self._index[name]["file"])
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
        return sorted(random.Random(seed).sample(self.names(), n))

    # --- writing ----------------------------------------------------------------------------
    def add(self, source, name: str | None = None, density: float = 0.1, alpha: float = 1.0,
            per_tensor: bool = False, encoding: str = "golomb", force: bool = False,
            revision: str | None = None, **codec_options) -> dict:
        """Compress a PEFT adapter (dir or Hub id) or store a CompressedExpert as is.
        codec_options: codec, budget_bits, quant_bits as `compress` takes them."""
        expert = source if isinstance(source, CompressedExpert) else compress(
            source, density, alpha, per_tensor, encoding, name=name, revision=revision,
            **codec_options)
        if name:
            expert.meta["name"] = name
        name = expert.name
        if name in self._index and not force:
            raise LibraryError(f"{name!r} is already in {self.root}; pass force=True (--force) "
                               "to replace it")
        path = self.root / file_name_for(name)
        expert.save(path, force=True)
        self._index[name] = dict(expert.summary(), file=path.name)
        self._cache.pop(name, None)
        self._write_index()
        return self._index[name]

    def add_many(self, sources: Iterable, progress: bool = True, **options) -> list[dict]:
        from tqdm.auto import tqdm
        sources = list(sources)
        return [self.add(s, **options) for s in tqdm(sources, desc="compressing experts",
                                                     unit="expert", disable=not progress)]

    def remove(self, name: str) -> None:
        self._require(name)
        path = self.root / self._index.pop(name)["file"]
        self._write_index()  # index first: a crash between the two leaves only a stray file
        path.unlink(missing_ok=True)
        self._cache.pop(name, None)
