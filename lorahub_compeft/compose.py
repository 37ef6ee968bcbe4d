"""The LoraHub composer: learn a weighted mix of N LoRA experts from a few examples.

    experts ──► decode the N once ──► E: one [N, P] matrix (every lora_A/lora_B value, flat),
                                      or for ComPEFT experts their kept positions and signs
    each step:  w (nevergrad) ──► flat ← w @ E, in place ──► forward on the examples ──► loss + L1

The model's LoRA parameters are views into one flat buffer, so a step's mixing is one
matrix-vector product and one copy: per module A = sum_i w_i A_i and B = sum_i w_i B_i, as in
LoraHub (not sum_i w_i B_i A_i). No state dict is rebuilt and no adapter is reloaded per step.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .adapters import CONFIG_NAME, Adapter, _looks_like_hub_id, _read_config, load_adapter
from .adapters import save_adapter as _save_adapter_dir
from .codec import TernaryVector
from .expert import CompressedExpert, load_expert

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
NONFINITE_PENALTY = 1e6
OBJECTIVES = ("paper", "lorahub")
# Config fields every composed expert must agree on (LoRA's scaling is lora_alpha / r).
_MUST_MATCH = ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
           "float32": torch.float32, "float": torch.float32}


# --- experts -----------------------------------------------------------------------------------
@dataclass
class _Source:
    """One expert to compose: its name and config now, its tensors when `load` is called."""
    name: str
    config: dict
    load: Callable[[], dict[str, torch.Tensor]]
    ternary: Callable[[], TernaryVector] | None = None  # ComPEFT experts: the sparse form


def _ternary_once(expert: CompressedExpert) -> Callable[[], TernaryVector]:
    """Decode for the stack without leaving the decoded arrays cached in the expert (a
    library's cache), so that the stack holds the only copy."""
    def load():
        cached = expert.is_decoded
        ternary = expert.ternary()
        if not cached and expert.path is not None:
            expert.release()
        return ternary
    return load


def _compressed_source(expert: CompressedExpert) -> _Source:
    return _Source(expert.name, expert.config, expert.state_dict, _ternary_once(expert))


def _source(item, index: int) -> _Source:
    if isinstance(item, CompressedExpert):
        return _compressed_source(item)
    if isinstance(item, Adapter):
        src = item.source or {}
        name = src.get("hub_id") or (Path(src["path"]).name if src.get("path") else f"adapter{index}")
        return _Source(name, item.config, lambda: item.tensors)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_file() and path.suffix == ".safetensors":
            return _compressed_source(load_expert(path))
        if path.is_dir():
            return _Source(path.name, _read_config(path / CONFIG_NAME),
                           lambda: load_adapter(path).tensors)
        if _looks_like_hub_id(str(item)):
            adapter = load_adapter(str(item))
            return _Source(str(item), adapter.config, lambda: adapter.tensors)
        raise ValueError(f"{item}: not an expert file (.safetensors), a PEFT adapter directory "
                         "or a Hub id")
    raise ValueError(f"cannot compose a {type(item).__name__}; pass CompressedExperts, expert "
                     "files, PEFT adapter dirs, Hub ids or Adapters")


def _select(experts, names, n_experts: int, seed: int) -> list[_Source]:
    from .library import ExpertLibrary
    if isinstance(experts, ExpertLibrary):
        if names is None:
            names = experts.sample(n_experts, seed)  # checks n against the library's size
        return [_source(experts.get(n), i) for i, n in enumerate(names)]
    if names is not None:
        raise ValueError("names= picks experts from an ExpertLibrary; pass the experts themselves "
                         "otherwise")
    items = list(experts)
    if not items:
        raise ValueError("no experts to compose")
    if n_experts < 1:
        raise ValueError(f"n_experts must be at least 1, got {n_experts}")
    if len(items) > n_experts:
        keep = sorted(random.Random(seed).sample(range(len(items)), n_experts))
        items = [items[i] for i in keep]
    sources = [_source(item, i) for i, item in enumerate(items)]
    seen: dict[str, int] = {}
    for s in sources:  # weights are keyed by name: make names unique
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}#{seen[s.name]}"
    return sources


def _normal(key: str, value):
    if key == "target_modules" and isinstance(value, (list, tuple, set)):
        return sorted(value)
    return value


def validate_experts(sources: list[_Source]) -> None:
    """All experts must be LoRA with the same r, alpha, targets and base model."""
    if not sources:
        raise ValueError("no experts to compose")
    problems = []
    for s in sources:
        cfg = s.config
        if cfg.get("peft_type") != "LORA":
            problems.append(f"{s.name}: peft_type is {cfg.get('peft_type')!r}; only LORA experts "
                            "can be composed")
        elif cfg.get("use_dora"):
            problems.append(f"{s.name}: use_dora is set; DoRA experts cannot be composed")
    first = sources[0]
    for s in sources[1:]:
        for key in _MUST_MATCH:
            mine, theirs = _normal(key, s.config.get(key)), _normal(key, first.config.get(key))
            if mine != theirs and not (key == "peft_type" and problems):
                problems.append(f"{s.name}: {key} is {mine!r}, but {first.name} has {theirs!r}")
    if problems:
        raise ValueError("these experts cannot be composed together:\n  " + "\n  ".join(problems))


# --- the stack of experts ----------------------------------------------------------------------
@dataclass
class ExpertStack:
    """N experts' LoRA tensors as one [N, P] matrix, in the order of `keys` (PEFT saved names)."""
    matrix: torch.Tensor
    keys: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]

    @property
    def numel(self) -> int:
        return self.matrix.shape[1]

    def mix(self, w: torch.Tensor | np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """The flat mixed vector sum_i w_i E_i (one matrix-vector product), into `out` if
        given (writing in place spares a fresh P-sized buffer, and its page faults, per step)."""
        if out is not None and out.dtype == self.matrix.dtype:
            return torch.mv(self.matrix.T, _weights(w, out.dtype, out.device), out=out)
        mixed = mix_weights(self.matrix, w)
        return mixed if out is None else out.copy_(mixed)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: flat[o:o + math.prod(s)].view(s)
                for k, s, o in zip(self.keys, self.shapes, self.offsets)}


@dataclass
class TernaryStack(ExpertStack):
    """N ComPEFT experts kept sparse: every kept position (in the flat LoRA order) and its sign,
    all experts concatenated, cut into segments that share one scale (one per expert, or one
    per expert and tensor with per-tensor scales). At density k this holds 5k bytes per
    parameter and expert (int32 position + int8 sign) against 4 for a dense fp32 row; a step
    scatters sum_i w_i * scale * sign into a zero vector."""
    positions: torch.Tensor = None       # int32 (int64 past 2**31 parameters)
    signs: torch.Tensor = None           # int8, +1/-1
    segment_expert: np.ndarray = None    # [S]: which expert a segment belongs to
    segment_scale: np.ndarray = None     # [S]
    segment_start: list[int] = None      # [S + 1]: segment s is positions[start[s]:start[s+1]]
    size: int = 0
    _split_cache: dict = field(default_factory=dict, repr=False)

    @property
    def numel(self) -> int:
        return self.size

    def mix(self, w: torch.Tensor | np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        coef = (np.asarray(w.cpu() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
                [self.segment_expert] * self.segment_scale).tolist()
        in_place = out is not None and out.dtype == torch.float32  # else accumulate in float32
        acc = out.zero_() if in_place else torch.zeros(self.size, device=self.signs.device)
        parts = self._parts()
        if len(parts) == 1:
            self._scatter(acc, coef, parts[0])
        else:  # threads own disjoint ranges of acc; torch ops release the GIL
            list(_pool(len(parts)).map(lambda part: self._scatter(acc, coef, part), parts))
        return acc if out is None or in_place else out.copy_(acc)

    def _scatter(self, acc: torch.Tensor, coef: list[float], part: list[tuple[int, int]]):
        # int8 sign * scalar makes float32 in one pass, far cheaper than expanding a scale per
        # kept value; segments are few (one per expert when its scale is global).
        for c, (lo, hi) in zip(coef, part):
            acc.index_add_(0, self.positions[lo:hi], self.signs[lo:hi] * c)

    def _parts(self) -> list[list[tuple[int, int]]]:
        """Per CPU thread, each segment's slice whose positions fall in that thread's share of
        the output (positions ascend within a segment). One part on GPU or small stacks."""
        threads = torch.get_num_threads() if self.signs.device.type == "cpu" else 1
        if self.size < _PARALLEL_MIN:
            threads = 1
        if threads not in self._split_cache:
            segments = list(zip(self.segment_start[:-1], self.segment_start[1:]))
            if threads < 2:
                self._split_cache[threads] = [segments]
            else:
                edges = [self.size * t // threads for t in range(threads + 1)]
                cuts = [np.searchsorted(self.positions[lo:hi].numpy(), edges) + lo
                        for lo, hi in segments]
                self._split_cache[threads] = [[(int(c[t]), int(c[t + 1])) for c in cuts]
                                              for t in range(threads)]
        return self._split_cache[threads]


_PARALLEL_MIN = 1 << 20  # below this many parameters a thread hand-off costs more than it saves
_POOLS: dict = {}


def _pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="lorahub-mix")
    return _POOLS[workers]


def _weights(w, dtype, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w,
                           dtype=dtype, device=device)


def mix_weights(stack: torch.Tensor, w) -> torch.Tensor:
    """sum_i w_i stack[i] for a stack of shape [N, ...]."""
    return torch.tensordot(_weights(w, stack.dtype, stack.device), stack, dims=1)


def saved_key(param_name: str) -> str:
    """A model parameter name as PEFT saves it: `...q.lora_A.default.weight` -> `...q.lora_A.weight`."""
    return param_name.replace(f".{ADAPTER_NAME}.", ".").removesuffix(f".{ADAPTER_NAME}")


def _lora_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters()
            if any(f"{m}.{ADAPTER_NAME}" in n for m in ("lora_A", "lora_B", "lora_embedding_A",
                                                        "lora_embedding_B"))]


def _check_tensors(source: _Source, found: dict[str, tuple], keys, shapes) -> None:
    missing = [k for k in keys if k not in found]
    if missing:
        raise ValueError(f"{source.name}: lacks {len(missing)} LoRA tensors the model has, "
                         f"e.g. {missing[0]}")
    for key, shape in zip(keys, shapes):
        if tuple(found[key]) != shape:
            raise ValueError(f"{source.name}: {key} has shape {tuple(found[key])}, the model "
                             f"expects {shape}")


def _warn_ignored(ignored: set[str]) -> None:
    if ignored:
        warnings.warn(f"ignoring {len(ignored)} non-LoRA tensors of the experts (e.g. "
                      f"{sorted(ignored)[0]}); only lora_A/lora_B are composed", stacklevel=4)


def build_stack(sources: list[_Source], params: list[tuple[str, torch.nn.Parameter]],
                device) -> tuple[ExpertStack, float]:
    """Decode each expert once into the stack; returns it and the seconds decoding took.
    ComPEFT experts (all of them) stay sparse in a TernaryStack; otherwise E is dense."""
    keys = [saved_key(n) for n, _ in params]
    shapes = [tuple(p.shape) for _, p in params]
    offsets = np.cumsum([0] + [math.prod(s) for s in shapes]).tolist()
    if all(s.ternary is not None for s in sources):
        return _build_ternary_stack(sources, keys, shapes, offsets, device)
    matrix = torch.empty(len(sources), offsets[-1], dtype=torch.float32, device=device)
    decode = 0.0
    ignored: set[str] = set()
    for row, source in enumerate(sources):
        start = time.perf_counter()
        tensors = source.load()
        decode += time.perf_counter() - start
        _check_tensors(source, {k: v.shape for k, v in tensors.items()}, keys, shapes)
        for key, off in zip(keys, offsets):
            value = tensors[key]
            matrix[row, off:off + value.numel()] = value.reshape(-1).to(device, torch.float32)
        ignored |= set(tensors) - set(keys)
    _warn_ignored(ignored)
    return ExpertStack(matrix, keys, shapes, offsets[:-1]), decode


def _build_ternary_stack(sources, keys, shapes, offsets, device) -> tuple[TernaryStack, float]:
    where = dict(zip(keys, offsets))
    index_dtype = torch.int32 if offsets[-1] < 2 ** 31 else torch.int64
    positions, signs, seg_expert, seg_scale, seg_length = [], [], [], [], []
    decode, ignored = 0.0, set()
    for row, source in enumerate(sources):
        start = time.perf_counter()
        t = source.ternary()
        decode += time.perf_counter() - start
        _check_tensors(source, dict(zip(t.names, t.shapes)), keys, shapes)
        ignored |= set(t.names) - set(keys)
        own = t.offsets()  # the expert's own flat order: tensor j spans own[j]:own[j+1]
        bounds = np.searchsorted(t.positions, own)
        scales = t.tensor_scales()
        column = {name: j for j, name in enumerate(t.names)}
        for name in keys:  # the stack's order, so that positions ascend within a segment
            j = column[name]
            lo, hi = int(bounds[j]), int(bounds[j + 1])
            if hi == lo:
                continue
            shift = where[name] - int(own[j])  # to the stack's flat order
            positions.append(torch.from_numpy(t.positions[lo:hi] + shift).to(index_dtype))
            signs.append(torch.from_numpy(t.signs[lo:hi]))
            scale = float(scales[j])
            if seg_expert and seg_expert[-1] == row and seg_scale[-1] == scale:
                seg_length[-1] += hi - lo  # one scale for the whole expert: one segment
            else:
                seg_expert.append(row)
                seg_scale.append(scale)
                seg_length.append(hi - lo)
    _warn_ignored(ignored)
    cat = lambda xs, dtype: (torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)).to(device)
    stack = TernaryStack(
        matrix=None, keys=keys, shapes=shapes, offsets=offsets[:-1],
        positions=cat(positions, index_dtype), signs=cat(signs, torch.int8),
        segment_expert=np.array(seg_expert, dtype=np.int64), segment_scale=np.array(seg_scale),
        segment_start=np.cumsum([0] + seg_length).tolist(), size=offsets[-1])
    return stack, decode


def _flatten_params(params: list[tuple[str, torch.nn.Parameter]], stack: ExpertStack,
                    device) -> torch.Tensor:
    """Make the LoRA parameters views into one flat buffer and return the buffer."""
    dtypes = {p.dtype for _, p in params}
    if len(dtypes) != 1:
        raise ValueError(f"LoRA parameters have mixed dtypes {dtypes}")
    flat = torch.zeros(stack.numel, dtype=dtypes.pop(), device=device)
    for (_, p), shape, off in zip(params, stack.shapes, stack.offsets):
        p.data = flat[off:off + math.prod(shape)].view(shape)
    return flat


# --- model -------------------------------------------------------------------------------------
def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")


def _load_base(model, tokenizer, sources: list[_Source], dtype):
    from transformers import AutoTokenizer

    from .evaluate import load_model
    if model is None:
        model = sources[0].config.get("base_model_name_or_path")
        if not model:
            raise ValueError(f"{sources[0].name}: adapter_config has no base_model_name_or_path; "
                             "pass model=")
    if isinstance(model, (str, os.PathLike)):
        base, loaded_tokenizer = load_model(str(model), dtype)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        base = copy.deepcopy(model)  # LoRA layers are injected: leave the caller's model alone
        if tokenizer is None:
            name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            if not name:
                raise ValueError("pass tokenizer= with a model object")
            tokenizer = AutoTokenizer.from_pretrained(name)
    if dtype is not None:
        base = base.to(dtype)
    return base, tokenizer


def _peft_model(base, config: dict, device):
    from peft import LoraConfig, get_peft_model
    allowed = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type"}
    options = {k: v for k, v in config.items() if k in allowed}
    # Evaluation only: no dropout, plain init (never an init that rewrites the base weights).
    options.update(lora_dropout=0.0, init_lora_weights=True, inference_mode=True)
    options.pop("modules_to_save", None)
    model = get_peft_model(base, LoraConfig(**options), adapter_name=ADAPTER_NAME)
    return model.to(device).eval()


# --- examples and loss -------------------------------------------------------------------------
def validate_examples(examples) -> list[dict]:
    examples = list(examples) if examples is not None else []
    if not examples:
        raise ValueError("no examples: composition needs a few {'input': ..., 'target': ...}")
    for i, e in enumerate(examples):
        if not isinstance(e, dict):
            raise ValueError(f"example {i} is a {type(e).__name__}, not a dict with 'input' and "
                             "'target'")
        for key in ("input", "target"):
            if not isinstance(e.get(key), str):
                raise ValueError(f"example {i}: {key!r} must be a string, got "
                                 f"{type(e.get(key)).__name__}" + (" (missing)" if key not in e else ""))
    return examples


def _default_max_length(tokenizer, model) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    limit = limit if isinstance(limit, int) and 0 < limit <= 100_000 else 512
    if not model.config.is_encoder_decoder:
        for key in ("n_positions", "max_position_embeddings"):
            n = getattr(model.config, key, None)
            if isinstance(n, int) and n > 0:
                limit = min(limit, n)
    return limit


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def tokenize_examples(examples: list[dict], tokenizer, is_encoder_decoder: bool, max_length: int,
                      batch_size: int, device) -> list[dict[str, torch.Tensor]]:
    """Padded batches with labels (-100 where no loss), built once and kept on the device.

    seq2seq: input_ids = the input, labels = the target. causal: input_ids = input + " " +
    target, labels = the same ids with the prompt and the padding masked. Over-long examples are
    cut to max_length (seq2seq from the end, causal from the start so the target survives) with
    one warning.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    truncated = 0
    inputs, labels = [], []
    for e in examples:
        if is_encoder_decoder:
            ids = tokenizer(e["input"])["input_ids"]
            target = tokenizer(e["target"])["input_ids"]
            if len(ids) > max_length or len(target) > max_length:
                truncated += 1
                ids, target = ids[:max_length], target[:max_length]
            inputs.append(ids)
            labels.append(target)
        else:
            prompt = tokenizer(e["input"])["input_ids"]
            ids = tokenizer(e["input"] + " " + e["target"])["input_ids"]
            n_prompt = 0
            while n_prompt < min(len(prompt), len(ids)) and prompt[n_prompt] == ids[n_prompt]:
                n_prompt += 1
            n_prompt = min(n_prompt, len(ids) - 1)  # at least one target token scored
            label = [-100] * n_prompt + ids[n_prompt:]
            if len(ids) > max_length:
                truncated += 1
                ids, label = ids[-max_length:], label[-max_length:]
            inputs.append(ids)
            labels.append(label)
    if truncated:
        warnings.warn(f"{truncated} of {len(examples)} examples are longer than max_length="
                      f"{max_length} tokens and were truncated", stacklevel=3)
    batches = []
    for start in range(0, len(examples), batch_size):
        rows, lab = inputs[start:start + batch_size], labels[start:start + batch_size]
        input_ids = _pad(rows, pad)
        mask = _pad([[1] * len(r) for r in rows], 0)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": _pad(lab, -100)}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of target-token cross-entropies, number of target tokens) for one batch."""
    labels = batch["labels"]
    if model.config.is_encoder_decoder:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=labels).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1], labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                              labels.reshape(-1), ignore_index=-100,
                                              reduction="sum")
    return total, int((labels != -100).sum())


# --- the result --------------------------------------------------------------------------------
@dataclass
class CompositionResult:
    """What composition learnt, plus the composed model to use it with.

    losses: the objective at each step (non-finite ones as measured). timings, in seconds:
    decode (reading/decoding the chosen experts), setup (model load and LoRA injection), and
    over all steps: mix (w @ E into the LoRA buffer), forward (the loss), optimizer (nevergrad's
    ask/tell and the rest of the loop); steps = the budget.
    """
    weights: dict[str, float]
    losses: list[float]
    best_loss: float
    zero_loss: float
    nonfinite_steps: int
    timings: dict[str, float]
    experts: list[str]
    optimizer: str = ""
    objective: str = ""
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    stack: ExpertStack | None = field(default=None, repr=False)
    flat: torch.Tensor | None = field(default=None, repr=False)
    config: dict = field(default_factory=dict, repr=False)

    def _apply_best(self) -> None:
        w = np.array([self.weights[n] for n in self.experts])
        self.stack.mix(w, out=self.flat)

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The composed adapter's tensors under PEFT's saved key names (on the CPU)."""
        self._apply_best()
        return {k: v.detach().clone().cpu() for k, v in self.stack.unflatten(self.flat).items()}

    def generate(self, inputs: list[str], max_new_tokens: int = 16, batch_size: int = 32,
                 max_length: int | None = None) -> list[str]:
        """Greedy answers from the composed model."""
        from .evaluate import generate
        self._apply_best()
        return generate(self.model, self.tokenizer, list(inputs), max_new_tokens, batch_size,
                        max_length)

    def save_adapter(self, directory: str | os.PathLike, force: bool = False) -> Path:
        """A standard PEFT adapter dir (first expert's config) that PeftModel.from_pretrained loads."""
        config = {k: v for k, v in self.config.items() if k != "modules_to_save"}
        config["inference_mode"] = True
        return _save_adapter_dir(directory, self.lora_tensors(), config, force=force)

    def merged_model(self):
        """A plain transformers model with the composed LoRA merged into its weights (a copy)."""
        self._apply_best()
        return copy.deepcopy(self.model).merge_and_unload()


# --- compose -----------------------------------------------------------------------------------
def _optimizer_class(name: str):
    import nevergrad as ng
    cls = ng.optimizers.registry.get(name) if isinstance(name, str) else None
    if cls is None:
        common = ["Shiwa", "NGOpt", "CMA", "OnePlusOne", "TwoPointsDE", "PSO", "RandomSearch"]
        raise ValueError(f"unknown nevergrad optimizer {name!r}; try one of {', '.join(common)} "
                         f"({len(ng.optimizers.registry)} in nevergrad.optimizers.registry)")
    return cls


def compose(experts, examples, model=None, *, names: list[str] | None = None, tokenizer=None,
            n_experts: int = 20, seed: int = 1, budget: int = 40, optimizer: str | None = None,
            objective: str = "paper", loss_fn: Callable | None = None,
            regularizer: Callable | None = None, l1: float = 0.05, bounds: float = 1.5,
            batch_size: int | None = None, max_length: int | None = None, device=None,
            dtype=None, progress: bool = True) -> CompositionResult:
    """Learn weights w for N LoRA experts so that the mix fits `examples` (LoraHub).

    experts: an ExpertLibrary (n_experts names sampled with seed, or the given `names`), or a
      list of CompressedExperts, expert files (.safetensors), PEFT dirs, Hub ids or Adapters;
      a longer list than n_experts is sampled with random.Random(seed). Only the chosen experts
      are decoded, once each.
    examples: [{"input": str, "target": str}, ...].
    model: a transformers model (copied, then wrapped), a name/path, or None for the experts'
      base_model_name_or_path. Pass tokenizer= with a model object (else it is loaded by name).
    objective: "paper" -- mean cross-entropy over all target tokens of all examples
      + l1 * mean|w|, optimized by Shiwa. "lorahub" -- the released LoraHub code: the sum over
      batches of each batch's mean token loss, divided by the number of examples, + l1 * mean|w|,
      optimized by NGOpt unless `optimizer` is given. With one batch the two differ only by the
      1/len(examples) factor, which weakens the loss against the L1 term.
    loss_fn(model, batch) -> float replaces the loss (averaged over batches, weighted by batch
      size); regularizer(w: np.ndarray) -> float replaces l1 * mean|w|.
    The returned weights are the best evaluated point (w ∈ [-bounds, bounds], start at 0); a
    non-finite loss is told to the optimizer as a 1e6 penalty and counted in nonfinite_steps.
    Same inputs and seed give the same weights.
    """
    import nevergrad as ng
    from tqdm.auto import tqdm

    # 1. everything that can be checked without a model
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    examples = validate_examples(examples)
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of evaluations, got {budget!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    optimizer = optimizer or ("NGOpt" if objective == "lorahub" else "Shiwa")
    optimizer_cls = _optimizer_class(optimizer)
    dtype = _resolve_dtype(dtype)
    sources = _select(experts, names, n_experts, seed)
    validate_experts(sources)
    names = [s.name for s in sources]

    # 2. model, experts, examples
    torch.manual_seed(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setup_start = time.perf_counter()
    base, tokenizer = _load_base(model, tokenizer, sources, dtype)
    peft_model = _peft_model(base, sources[0].config, device)
    params = _lora_params(peft_model)
    stack, decode_s = build_stack(sources, params, device)
    flat = _flatten_params(params, stack, device)
    encoder_decoder = bool(peft_model.config.is_encoder_decoder)
    batches = tokenize_examples(examples, tokenizer, encoder_decoder,
                                max_length or _default_max_length(tokenizer, peft_model),
                                batch_size or len(examples), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    timing = {"mix": 0.0, "forward": 0.0}

    def task_loss() -> float:
        with torch.no_grad():
            if loss_fn is not None:
                return sum(float(loss_fn(peft_model, b)) * len(b["input_ids"])
                           for b in batches) / len(examples)
            if objective == "lorahub":
                total = 0.0
                for b in batches:
                    s, n = token_losses(peft_model, b)
                    total += float(s) / max(n, 1)
                return total / len(examples)
            sums, counts = zip(*(token_losses(peft_model, b) for b in batches))
            return float(sum(sums)) / max(sum(counts), 1)

    def evaluate(w: np.ndarray) -> float:
        start = time.perf_counter()
        stack.mix(w, out=flat)
        sync()
        timing["mix"] += time.perf_counter() - start
        start = time.perf_counter()
        loss = task_loss()
        sync()
        timing["forward"] += time.perf_counter() - start
        reg = float(regularizer(w)) if regularizer is not None else l1 * float(np.mean(np.abs(w)))
        return loss + reg

    n = len(sources)
    setup_s = time.perf_counter() - setup_start - decode_s
    zero_loss = evaluate(np.zeros(n))
    timing["mix"] = timing["forward"] = 0.0  # the steps' totals only

    parametrization = ng.p.Array(init=np.zeros(n), lower=-bounds, upper=bounds)
    parametrization.random_state = np.random.RandomState(seed)
    opt = optimizer_cls(parametrization=parametrization, budget=budget, num_workers=1)
    losses: list[float] = []
    nonfinite = 0
    best_loss, best_w = math.inf, np.zeros(n)
    bar = tqdm(range(budget), desc="composing", unit="step", disable=not progress)
    loop_start = time.perf_counter()
    for _ in bar:
        candidate = opt.ask()
        w = np.asarray(candidate.value, dtype=np.float64)
        value = evaluate(w)
        losses.append(value)
        if not math.isfinite(value):
            nonfinite += 1
            opt.tell(candidate, NONFINITE_PENALTY)
            continue
        opt.tell(candidate, value)
        if value < best_loss:
            best_loss, best_w = value, w.copy()
        bar.set_postfix(best=f"{best_loss:.4f}")
    bar.close()
    loop_s = time.perf_counter() - loop_start
    if not math.isfinite(best_loss):
        warnings.warn("every step's loss was non-finite; returning the zero composition",
                      stacklevel=2)
        best_loss = zero_loss

    result = CompositionResult(
        weights={name: float(x) for name, x in zip(names, best_w)}, losses=losses,
        best_loss=best_loss, zero_loss=zero_loss, nonfinite_steps=nonfinite,
        timings={"decode": decode_s, "mix": timing["mix"], "forward": timing["forward"],
                 "optimizer": loop_s - timing["mix"] - timing["forward"], "setup": setup_s,
                 "steps": budget},
        experts=names, optimizer=optimizer, objective=objective, model=peft_model,
        tokenizer=tokenizer, stack=stack, flat=flat, config=dict(sources[0].config))
    result._apply_best()
    log.info("composed %d experts: best loss %.4f (no composition %.4f)", n, best_loss, zero_loss)
    return result
