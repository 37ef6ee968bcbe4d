"""The experts a run may use: each one's files and identity (the weights' sha256 for a local
PEFT dir or expert file, the commit for a Hub id), the seeded sample of N, and compressed
copies made once per setting (in an ExpertLibrary per setting, as `library add` makes them).
An expert file (already compressed) is used as it is, by every method."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorahub_compeft.io.files import sha256_file
from lorahub_compeft.sampling import sample_names


def _weights_file(directory: Path) -> Path:
    from lorahub_compeft.io.adapters import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"expert {directory}: no {WEIGHTS_NAME} in it; pass PEFT adapter dirs or Hub ids")


def _locate(source: str) -> tuple[Path, dict]:
    """Where an expert's files are, and what identifies them: the weights' sha256 for a local
    dir, the commit for a Hub id (downloaded, or found in the Hub cache when offline)."""
    from lorahub_compeft.eval.expert_lists import check_source
    from lorahub_compeft.io.adapters import download_adapter, looks_like_hub_id
    check_source(source)  # a missing path: the message reproduce and download give too
    path = Path(source)
    if path.is_dir() or path.is_file() and path.suffix == ".safetensors":  # a PEFT dir or an expert file
        weights = _weights_file(path) if path.is_dir() else path
        return path, {"name": source, "sha256": sha256_file(weights)}
    if not looks_like_hub_id(source):
        raise ValueError(f"expert {source!r}: not a PEFT directory or an expert file "
                         "(.safetensors), and not a Hub id (owner/name)")
    path = download_adapter(source, None)  # .../snapshots/<commit>
    return path, {"name": source, "revision": path.name}


@dataclass
class ExpertPool:
    """The experts a run may use, each with its identity; compressed copies go to `cache`."""
    identities: dict[str, dict]
    paths: dict[str, str]
    cache: str | None = None

    @classmethod
    def from_sources(cls, sources: list[str], cache: str | Path | None = None) -> "ExpertPool":
        if len(set(sources)) != len(sources):
            raise ValueError("an expert is listed twice; list each once")
        found = {s: _locate(s) for s in sources}  # before the first cell: bad names fail now
        return cls({s: ident for s, (_, ident) in found.items()},
                   {s: str(p) for s, (p, _) in found.items()}, str(cache) if cache else None)

    def __len__(self) -> int:
        return len(self.identities)

    def digest(self) -> str:
        """One hash for the whole pool: names and file identities."""
        text = json.dumps(sorted(self.identities.values(), key=lambda i: i["name"]), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def sample(self, n: int, seed: int) -> list[str]:
        return sample_names(list(self.identities), n, seed)

    def dense(self, name: str) -> str:
        """Its files here (a dir or an expert file); a Hub expert on a node that has not
        downloaded it: its Hub id."""
        return self.paths[name] if Path(self.paths[name]).exists() else name

    def dense_bytes(self, name: str) -> int:
        path = Path(self.dense(name))
        if path.is_file():
            return path.stat().st_size
        return _weights_file(path if path.is_dir() else _locate(name)[0]).stat().st_size

    def compressed(self, name: str, options) -> Path:
        """The expert compressed with `options` (a codec's Options, e.g. CompeftOptions), made
        once and reused across cells. The cache holds one library per setting, in which each
        expert is named by its dense identity: a changed expert is compressed again."""
        from lorahub_compeft.codecs.base import choose
        from lorahub_compeft.store.library import ExpertLibrary
        if Path(self.paths[name]).is_file():  # an expert file: compressed already, as it is
            return Path(self.paths[name])
        unit = choose(None, options)
        setting = "-".join([unit.name] + [f"{k}={v}" for k, v in dataclasses.asdict(options).items()])
        root = Path(self.cache or Path(tempfile.gettempdir()) / "lorahub-compeft-cache")
        library = ExpertLibrary(root / setting, one_base=False)  # pools may mix bases
        ident = hashlib.sha256(json.dumps(self.identities[name], sort_keys=True).encode())
        key = f"{Path(name).name[:100]}@{ident.hexdigest()[:24]}"
        if key not in library:  # force: a writer that got there first stored the same weights
            library.add(self.dense(name), options, name=key, force=True)
        return library.root / library.entry(key)["file"]
