"""Loading a base model (never its own code) and batched greedy generation, for seq2seq and
causal LMs alike."""
from __future__ import annotations

from pathlib import Path

import torch

from lorahub_compeft.io.adapters import hub_offline_error, hub_unreachable
from lorahub_compeft.io.files import read_json

# Files in which a model names Python code of its own for transformers to import and run.
CODE_CONFIGS = ("config.json", "tokenizer_config.json")


class RemoteCodeError(ValueError):
    """A model that names code of its own (auto_map): it is never loaded, its code never run."""


def _remote_code_error(where: str, name: str) -> RemoteCodeError:
    return RemoteCodeError(f"{where}: its {name} has 'auto_map', Python code shipped with the model "
                           "that transformers would run; this package never runs a model's own "
                           "code: use a model whose architecture transformers implements")


def refuse_remote_code(folder: Path) -> None:
    """Refuse a model folder that names code of its own, before any loader sees it."""
    for name in CODE_CONFIGS:
        path = folder / name
        if path.is_file():
            config = read_json(path)
            if isinstance(config, dict) and "auto_map" in config:
                raise _remote_code_error(str(folder), name)


def _load_options(name: str) -> dict:
    """from_pretrained options for `name`: a local folder is checked for code of its own; a Hub
    id is read from the local cache when the Hub cannot be reached (an error at once, not after
    the loaders' retries, when it is not there)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        refuse_remote_code(folder)
        return {}
    if hub_unreachable() is None:
        return {}
    from huggingface_hub import try_to_load_from_cache
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid Hub id: the loader says what is wrong with it
        cached = True
    if not cached:
        raise hub_offline_error(name, "this model", "point --model at a local folder holding "
                                "a copy of it (its config.json, weights and tokenizer)")
    return {"local_files_only": True}


def shared_weights_copy(model):
    """A copy of `model` that costs no second copy of its weights: new module objects (PEFT
    can wrap the copy's layers, and .to() cast them, leaving `model` as it was) whose
    parameters and buffers are new tensor objects on the same storage. Nothing may write
    into those tensors in place."""
    import copy
    memo = {}
    for tensor in (*model.parameters(), *model.buffers()):
        memo[id(tensor)] = (torch.nn.Parameter(tensor.data, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter) else tensor.detach())
    return copy.deepcopy(model, memo)


def load_model(name: str, dtype: torch.dtype | None = None):
    """A base model and its tokenizer by name or path: seq2seq when the config says
    encoder-decoder (T5, Flan-T5), a causal LM otherwise. A model that names code of its own
    (auto_map) is refused: every load passes trust_remote_code=False."""
    options = dict(_load_options(name), trust_remote_code=False)  # before seconds of imports
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    try:
        config = AutoConfig.from_pretrained(name, **options)
    except ValueError as err:
        if "trust_remote_code" in str(err):  # a Hub model whose architecture is its own code
            raise _remote_code_error(name, "config.json") from None
        raise
    if getattr(config, "auto_map", None):
        raise _remote_code_error(name, "config.json")
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return (cls.from_pretrained(name, config=config, **options, **kwargs),
            AutoTokenizer.from_pretrained(name, **options))


def load_tokenizer(name: str):
    """The tokenizer of a model by name or path, under load_model's rules (no code of its own
    is run; offline, from the cache or an error at once)."""
    options = dict(_load_options(name), trust_remote_code=False)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name, **options)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16,
             batch_size: int = 32, max_length: int | None = None) -> list[str]:
    """Greedy answers to `prompts`, decoded without special tokens and stripped."""
    model.eval()
    is_causal = not getattr(model.config, "is_encoder_decoder", False)
    if not is_causal:
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_length, False)
    # Causal LMs pad on the left (new tokens must follow each prompt directly) and need a pad
    # token: set both for this call only, and leave the caller's tokenizer as it was.
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_length, True)
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_length, is_causal):
    device = next(model.parameters()).device
    # Batch prompts of similar length together (less padding), answer in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          truncation=max_length is not None, max_length=max_length).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=tokenizer.pad_token_id)
        if is_causal:
            out = out[:, batch["input_ids"].shape[1]:]
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
            answers[i] = text.strip()
    return answers


