"""Which base model an expert was trained on, compared by what identifies a base rather than by
the string in `base_model_name_or_path`: the resolved local folder, the Hub id (+ revision), or
the config's architecture and shapes. An expert recorded with an absolute path and one with a
relative path or the Hub id of the same model are the same base."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lorahub_compeft.io.files import read_json

log = logging.getLogger(__name__)
# config.json fields that fix the shapes a LoRA expert is trained against
SHAPE_KEYS = ("d_model", "hidden_size", "n_embd", "num_layers", "num_decoder_layers",
              "num_hidden_layers", "n_layer", "d_ff", "intermediate_size", "d_kv", "num_heads",
              "num_attention_heads", "n_head", "vocab_size")


def looks_like_path(text: str) -> bool:
    """A model reference meant as a folder: ./x, /x, ~/x, or more than owner/name."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def check_model_reference(text: str) -> None:
    """Refuse a model folder that does not exist, before any loader turns it into a Hub id."""
    if looks_like_path(text) and not Path(text).expanduser().exists():
        raise ValueError(f"model folder {text} does not exist; pass an existing folder (with "
                         "config.json) or a Hub id such as google/flan-t5-large")


# The folder that holds this package: the shipped zoo records its base relative to it
# (lorahub_compeft/zoo/artifacts/base), so that it is found from any working directory.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def resolve_base(name: str | None, origin: str | os.PathLike | None = None) -> str | None:
    """Where a recorded base folder is. Absolute, existing from here, or a Hub id (owner/name):
    as given. Else a relative folder, looked up from the expert's own folder (`origin`)
    upwards, then from the folder that holds this package."""
    if not name or Path(name).is_absolute() or Path(name).exists() or _hub_like(name):
        return name
    for folder in [*(Path(origin).resolve().parents if origin else []), PACKAGE_PARENT]:
        if (folder / name).is_dir():
            return str(folder / name)
    return name


def recorded_base(name: str | None, origin: str | os.PathLike | None) -> str | None:
    """The base to record for an adapter read from `origin`: a relative folder becomes absolute
    (it would not be found from another folder), except one inside this package, which stays
    relative to the package's folder (found from anywhere, by resolve_base)."""
    found = resolve_base(name, origin)
    if not found or Path(name).is_absolute() or not Path(found).is_dir():
        return name
    full = Path(found).resolve()
    inside = full.is_relative_to(PACKAGE_PARENT / "lorahub_compeft")
    return full.relative_to(PACKAGE_PARENT).as_posix() if inside else str(full)


def _hub_like(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _hub_config(repo_id: str, revision: str | None) -> Path | None:
    """config.json of a Hub model if it is in the local cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid id or no cache: nothing known
        return None
    return Path(found) if isinstance(found, (str, os.PathLike)) else None


def base_identity(reference: str | None, revision: str | None = None) -> dict:
    """What identifies the base `reference` names (empty when nothing is known)."""
    if not reference:
        return {}
    path = Path(reference).expanduser()
    if path.is_dir():
        identity, config = {"path": str(path.resolve())}, path / "config.json"
    else:
        identity = {"hub_id": reference, "revision": revision}
        config = None if looks_like_path(reference) else _hub_config(reference, revision)
    try:
        data = read_json(config) if config is not None and config.is_file() else None
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict):
        identity["architecture"] = [data.get("model_type"), data.get("architectures")]
        identity["shapes"] = {k: data[k] for k in SHAPE_KEYS if k in data}
    return identity


def same_base(a: dict, b: dict) -> bool | None:
    """True / False, or None when too little is known about one of them to say."""
    if a.get("path") and a.get("path") == b.get("path"):
        return True
    if a.get("hub_id") and a.get("hub_id") == b.get("hub_id") and \
            (None in (a.get("revision"), b.get("revision")) or a["revision"] == b["revision"]):
        return True
    if a.get("shapes") and b.get("shapes"):
        return a["architecture"] == b["architecture"] and a["shapes"] == b["shapes"]
    return None


def other_bases(bases: dict[str, str | None], reference: str) -> dict[str, str | None]:
    """The experts (name -> recorded base) whose base is not `reference`. Unknown identities
    (a Hub id not in the cache) are compared by their strings."""
    want = base_identity(reference)
    other = {}
    for name, base in bases.items():
        same = same_base(want, base_identity(base))
        if not (base == reference if same is None else same):
            other[name] = base
    return other


def base_problems(bases: dict[str, str | None], reference: str | None) -> list[str]:
    """One line per expert (name -> recorded base) whose base is not `reference`."""
    if reference is None:
        return []
    return [f"{name}: base_model_name_or_path is {base!r}, another base than {reference!r}"
            for name, base in other_bases(bases, reference).items()]


_WARNED: set[tuple[str | None, str]] = set()  # (recorded base, model) said once a process


def check_bases(bases: dict[str, str | None], model: str | None) -> list[str]:
    """The base mismatches among experts as error lines; with `model` given (the user said
    which base to use) they are only a warning, one per recorded base and process (a command
    composing many times says it once), and nothing is returned."""
    if model is None:
        return base_problems(bases, next(iter(bases.values()), None))
    by_base: dict[str | None, list[str]] = {}
    for name, base in other_bases(bases, model).items():
        by_base.setdefault(base, []).append(name)
    for base, names in by_base.items():
        if (base, model) in _WARNED:
            continue
        _WARNED.add((base, model))
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        log.warning("%s: base_model_name_or_path is %r, another base than %r; using %r as "
                    "--model (model=) says", shown, base, model, model)
    return []
