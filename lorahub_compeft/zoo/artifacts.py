"""The shipped zoo at run time: check the artifacts against their manifest and load them.
Nothing here imports the training code (`build.py`, `ship.py` build the artifacts)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorahub_compeft.config import CompeftOptions
from lorahub_compeft.store.library import ExpertLibrary, file_name_for
from lorahub_compeft.eval.methods import Base
from lorahub_compeft.eval.pool import ExpertPool
from lorahub_compeft.io.files import sha256_file

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MANIFEST = "manifest.json"
# base_model_name_or_path of the shipped experts: relative to the folder that holds the
# package, resolved from an expert file's own location (see compose's base resolution)
BASE_NAME = "lorahub_compeft/zoo/artifacts/base"


def manifest_files(root: Path) -> dict[str, dict]:
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def verify(root: Path = ARTIFACTS) -> dict:
    """Check every shipped file against the manifest; returns the manifest."""
    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no zoo manifest; build the zoo with "
                                "`python scripts/build_zoo.py` first")
    manifest = json.loads(path.read_text())
    found = manifest_files(root)
    if found != manifest["files"]:
        missing = sorted(set(manifest["files"]) - set(found))
        extra = sorted(set(found) - set(manifest["files"]))
        changed = sorted(k for k in set(found) & set(manifest["files"])
                         if found[k] != manifest["files"][k])
        raise ValueError(f"{root}: zoo artifacts differ from {MANIFEST} (missing {missing}, "
                         f"unexpected {extra}, changed {changed}); rebuild with "
                         "`python scripts/build_zoo.py`")
    return manifest


@dataclass
class ZooPool(ExpertPool):
    """The zoo's dense experts; at the shipped setting, the shipped ComPEFT files."""
    library: str = ""
    shipped: CompeftOptions | None = None  # the shipped library's setting

    def compressed(self, name, options):
        if options == self.shipped:
            return Path(self.library) / file_name_for(name)
        return super().compressed(name, options)


@dataclass
class Zoo:
    root: Path
    manifest: dict
    base: Base

    @classmethod
    def load(cls, root: str | Path = ARTIFACTS, batch_size: int = 64) -> "Zoo":
        root = Path(root).resolve()
        manifest = verify(root)
        return cls(root, manifest, Base.load(str(root / "base"), batch_size))

    @property
    def compression(self) -> dict:
        """The shipped library's setting, as the compeft method's parameters (the shipped
        files are golomb-coded: CompeftOptions(**compression) is their setting)."""
        m = self.manifest
        return {"density": m["density"], "alpha": m["alpha"],
                "per_tensor": m.get("selection") == "per_tensor"}

    def pool(self) -> ZooPool:
        """Every shipped expert, identified by its dense file's sha256 from the manifest."""
        names = ExpertLibrary(self.root / "experts", create=False).names()
        weights = {n: f"dense/{n}/adapter_model.safetensors" for n in names}
        return ZooPool({n: {"name": n, "sha256": self.manifest["files"][w]["sha256"]}
                        for n, w in weights.items()},
                       {n: str(self.root / "dense" / n) for n in names},
                       library=str(self.root / "experts"),
                       shipped=CompeftOptions(**self.compression))
