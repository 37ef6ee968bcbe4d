"""Full fine-tuning residuals: θ_ft − θ_base of a whole model, stored like an expert.

A residual is read from two `save_pretrained` directories (safetensors, or .bin through
torch.load(weights_only=True); never unpickled) and handed to `compress` as an Adapter whose
peft_type is RESIDUAL: every floating tensor is a task vector measured from the base.
ComPEFT sparsifies all of them; ERE factorizes the matrices and carries the rest (layer norms,
biases) as is. `export_model` adds the decoded residual to the base and writes the model with
`save_pretrained`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorahub_compeft.io.adapters import Adapter, AdapterError
from lorahub_compeft.io.files import atomic_dir, check_dir_target

RESIDUAL = "RESIDUAL"


def is_residual(config: dict) -> bool:
    return config.get("peft_type") == RESIDUAL


def load_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a `save_pretrained` model directory (all safetensors shards)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such model directory")
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        state = {}
        for shard in shards:
            try:
                state.update(load_file(shard))
            except Exception as err:
                raise AdapterError(f"{shard}: cannot read safetensors file ({err})") from None
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise AdapterError(f"{directory}: no model.safetensors or pytorch_model.bin; pass a "
                           "directory written by save_pretrained")
    state = {}
    for path in bins:
        try:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:
            raise AdapterError(f"{path}: cannot read as a plain tensor dict (pickled code is "
                               f"refused): {err}") from None
    return state


def residual_adapter(model_dir: str | os.PathLike, base_dir: str | os.PathLike) -> Adapter:
    """θ_ft − θ_base for every floating tensor (in the fine-tuned dtype), as an Adapter."""
    tuned, base = load_state(model_dir), load_state(base_dir)
    if set(tuned) != set(base):
        extra = sorted(set(tuned) ^ set(base))[0]
        raise AdapterError(f"{model_dir} and {base_dir} hold different tensors (e.g. {extra}); "
                           "--base must be the model this one was fine-tuned from")
    tau = {}
    for name, t in tuned.items():
        if t.shape != base[name].shape:
            raise AdapterError(f"{name} has shape {tuple(t.shape)} in {model_dir} but "
                               f"{tuple(base[name].shape)} in {base_dir}; wrong --base?")
        if t.is_floating_point():
            tau[name] = (t.double() - base[name].double()).to(t.dtype)
    config_path = Path(model_dir) / "config.json"
    config = {"peft_type": RESIDUAL, "base_model_name_or_path": str(base_dir),
              "model_type": json.loads(config_path.read_text()).get("model_type")
              if config_path.is_file() else None}
    return Adapter(tau, config, {"path": str(Path(model_dir).resolve())})


# What save_pretrained writes for an unsharded model and its tokenizer: `--force` replaces a
# folder holding only these.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
               "added_tokens.json", "chat_template.jinja")


def export_model(expert, base_dir: str | os.PathLike, directory: str | os.PathLike,
                 force: bool = False) -> Path:
    """base + decoded residual, written with save_pretrained (and the base's tokenizer)."""
    from lorahub_compeft.io.models import load_model
    target = Path(directory)
    check_dir_target(target, force, MODEL_FILES)  # before the work, not after
    model, tokenizer = load_model(str(base_dir))
    apply_residual(model, expert.state_dict())
    with atomic_dir(target, force, MODEL_FILES) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def apply_residual(model, residual: dict[str, torch.Tensor]) -> None:
    """Add a residual to a loaded model's parameters and buffers in place."""
    state = model.state_dict()
    missing = sorted(set(residual) - set(state))
    if missing:
        raise AdapterError(f"the base model has no tensor {missing[0]}; is it the model the "
                           "residual was taken from?")
    done = set()  # tied weights (shared embeddings) share storage: add their residual once
    with torch.no_grad():
        for name, delta in residual.items():
            if state[name].shape != delta.shape:
                raise AdapterError(f"{name}: residual shape {tuple(delta.shape)}, base "
                                   f"{tuple(state[name].shape)}")
            if state[name].data_ptr() not in done:
                state[name].add_(delta.to(state[name].dtype))
                done.add(state[name].data_ptr())
