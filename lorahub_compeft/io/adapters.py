"""Reading and writing standard PEFT adapter directories (local or on the Hugging Face Hub).

An adapter is what `PeftModel.save_pretrained` writes: `adapter_config.json` plus
`adapter_model.safetensors` (or the older `adapter_model.bin`). We never unpickle:
`.bin` files go through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file, save_file

from lorahub_compeft.io.files import atomic_dir, read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
log = logging.getLogger(__name__)

# Task-vector tensors and the value PEFT initialises them to: LoRA's A is random at init but
# PEFT does not store it, so, as in ComPEFT, the task vector of A and B is measured from 0.
# (IA)^3 vectors start at 1. Anything else (modules_to_save heads, DoRA magnitudes) has an
# unknown init and is carried losslessly instead of compressed.
_TASK_VECTOR_INIT = {".lora_A.": 0.0, ".lora_B.": 0.0, "lora_embedding_A": 0.0,
                     "lora_embedding_B": 0.0, ".ia3_l": 1.0}


class AdapterError(ValueError):
    """A PEFT adapter that cannot be read or written; the message names the path."""


class HubOfflineError(ValueError):
    """A Hub id that is not in the local cache while the Hub cannot be reached; the message
    names the id and how to point at a local copy."""


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be used now, or None. Checked once per process:
    HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, else one TCP connection to the Hub's host that
    fails within 3 s. (The loaders' own retries take about 30 s to give up.) Behind a proxy the
    loaders know how to get through: no check then."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name]}"
    if any(os.environ.get(v) for p in ("https", "http", "all") for v in (f"{p}_proxy", f"{p.upper()}_PROXY")):
        return None
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
    except OSError as err:
        return f"no connection to {url.hostname}:{port}: {err.strerror or err}"
    return None


def hub_offline_error(repo_id: str, what: str, fix: str) -> HubOfflineError:
    return HubOfflineError(
        f"{repo_id}: {what} is not in the local Hugging Face cache and the Hub cannot be reached "
        f"({hub_unreachable()}); {fix}, or fill the cache once where there is network "
        f"(hf download {repo_id}) and rerun with HF_HUB_OFFLINE=1")


def task_vector_init(name: str) -> float | None:
    """The init value of a task-vector tensor, or None for a tensor carried as is."""
    for marker, init in _TASK_VECTOR_INIT.items():
        if marker in name:
            return init
    return None


@dataclass
class Adapter:
    """A PEFT adapter in memory: its tensors, its adapter_config.json, and where it came from."""
    tensors: dict[str, torch.Tensor]
    config: dict
    source: dict = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_config(path: Path) -> dict:
    try:
        config = read_json(path)
    except FileNotFoundError:
        raise AdapterError(f"{path.parent}: no {CONFIG_NAME}; is this a PEFT adapter directory "
                           "(written by PeftModel.save_pretrained)?") from None
    except (ValueError, OSError) as err:
        raise AdapterError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from None
    problem = config_problem(config)
    if problem:
        raise AdapterError(f"{path}: {problem}")
    return config


def is_finite_number(value) -> bool:
    """A real number (not a bool), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def config_problem(config, regex_ok: bool = True) -> str | None:
    """What is wrong with an adapter_config's types (the fields this package reads), or None.
    Checked once, where a config is read, so later code can trust it. regex_ok=False (expert
    files): target_modules must be a list of names, as `compress` writes it (peft's matching
    of a forged regex can run for minutes)."""
    if not isinstance(config, dict):
        return f"not a PEFT adapter config (a JSON {type(config).__name__}, not an object)"
    if not isinstance(config.get("peft_type"), str) or not config["peft_type"]:
        return "not a PEFT adapter config ('peft_type' must be a name such as \"LORA\")"
    if "r" in config and not (isinstance(config["r"], int) and not isinstance(config["r"], bool)
                              and config["r"] > 0):
        return f"'r' must be a positive integer, got {config['r']!r}"
    if config.get("lora_alpha") is not None and not is_finite_number(config["lora_alpha"]):
        return f"'lora_alpha' must be a finite number, got {config['lora_alpha']!r}"
    targets = config.get("target_modules")
    if targets is not None and not (isinstance(targets, str) and regex_ok) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        kinds = "a list of names or a regex string" if regex_ok else "a list of module names"
        return f"'target_modules' must be {kinds}, got {str(targets)[:80]!r}"
    for key, valid in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool)
                        and v > 0), ("alpha_pattern", is_finite_number)):
        pattern = config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(
                isinstance(k, str) and valid(v) for k, v in pattern.items())):
            return f"'{key}' must map module names to numbers, got {str(pattern)[:80]!r}"
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        return f"'base_model_name_or_path' must be a string, got {base!r}"
    return None


_RANK_AXIS = {".lora_A.": 0, ".lora_B.": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


def rank_problem(config: dict, shapes: dict[str, list[int] | tuple[int, ...]]) -> str | None:
    """What is wrong with a LoRA config's ranks against its tensors' shapes, or None. PEFT
    allocates r rows (rank_pattern's for the modules it names) per module: no rank the config
    names may exceed the largest the tensors have, so a forged r allocates nothing the file's
    own shapes do not bound."""
    ranks = {name: shape[axis] for name, shape in shapes.items() for marker, axis in
             _RANK_AXIS.items() if marker in name and len(shape) > axis}
    if "r" not in config or not ranks:
        return None
    claimed = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    name = max(ranks, key=ranks.get)
    return None if claimed <= ranks[name] else \
        f"'r' or 'rank_pattern' names rank {claimed}, but no tensor has a rank above {ranks[name]} ({name})"


def module_paths(names) -> list[str]:
    """The modules that task-vector tensors belong to, as full paths (base_model.model.
    dropped): a regex target_modules written as the list of modules it matched."""
    paths = set()
    for name in names:
        marker = next(m for m in _TASK_VECTOR_INIT if m in name)
        paths.add(name.split(marker.rstrip("."))[0].rstrip(".").removeprefix("base_model.model."))
    return sorted(paths)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    st, legacy = directory / WEIGHTS_NAME, directory / LEGACY_WEIGHTS_NAME
    if st.exists():
        try:
            return load_file(st)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise AdapterError(f"{st}: cannot read safetensors file ({err})") from None
    if legacy.exists():
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterError(f"{legacy}: cannot read as a plain tensor dict "
                               f"(pickled code is refused): {err}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterError(f"{legacy}: expected a dict of tensors")
        return tensors
    raise AdapterError(f"{directory}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} found")


def load_adapter(source: str | os.PathLike, revision: str | None = None) -> Adapter:
    """Load a PEFT adapter from a local directory or a Hugging Face Hub id."""
    path = Path(source)
    if path.is_dir():
        origin = {"path": str(path.resolve())}
        if looks_like_hub_id(str(source)):  # both readings exist: say which one is used
            log.warning("%s: using the local folder %s, not the Hub id of that name (pass "
                        "./%s or an absolute path to silence this)", source, path.resolve(), source)
    elif path.exists():
        raise AdapterError(f"{path}: is a file; pass the adapter's directory")
    elif looks_like_hub_id(str(source)):
        path = download_adapter(str(source), revision)
        origin = {"hub_id": str(source), "revision": revision or "main"}
    else:
        raise AdapterError(f"{source}: no such directory, and not a Hub id (owner/name)")
    config = read_config(path / CONFIG_NAME)
    tensors = _read_weights(path)
    if not tensors:
        raise AdapterError(f"{path}: the adapter holds no tensors")
    problem = rank_problem(config, {k: tuple(t.shape) for k, t in tensors.items()})
    if problem:
        raise AdapterError(f"{path / CONFIG_NAME}: {problem}")
    return Adapter(tensors=tensors, config=config, source=origin)


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def download_adapter(repo_id: str, revision: str | None) -> Path:
    """The adapter's snapshot folder: downloaded, or from the local cache when the Hub cannot
    be reached."""
    from huggingface_hub import snapshot_download
    offline = hub_unreachable() is not None
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                      allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME]))
    except Exception as err:
        if offline:
            raise hub_offline_error(repo_id, "this adapter", "pass a local directory holding "
                                    "a copy of it") from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterError(f"{repo_id}: cannot download from the Hugging Face Hub ({reason}); "
                           "check the id and your network, or pass a local directory") from None


def save_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict,
                 force: bool = False) -> Path:
    """Write a standard PEFT adapter dir atomically: built beside the target, then renamed.
    `force` replaces an existing adapter dir only if it holds nothing but these two files."""
    target = Path(directory)
    with atomic_dir(target, force=force, owned=(CONFIG_NAME, WEIGHTS_NAME)) as staging:
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging / WEIGHTS_NAME)
    return target

