"""What composition minimises: the few-shot examples, tokenized once, and their loss.

objective "paper": mean cross-entropy over all target tokens of all examples.
objective "lorahub": the released LoraHub code: the sum over batches of each batch's mean
token loss, divided by the number of examples (with one batch, the paper's loss / n).
The search adds the regularizer (l1 * mean|w| by default) to either.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

OBJECTIVES = ("paper", "lorahub")


def validate_examples(examples, source=None) -> list[dict]:
    """The examples as a list, each a dict whose 'input' and 'target' are text; else a
    ValueError naming the example (and `source`, the file they came from)."""
    where = f"{source}: " if source else ""
    examples = list(examples) if examples is not None else []
    if not examples:
        raise ValueError(f"{where}no examples: composition needs a few "
                         "{'input': ..., 'target': ...}")
    for i, e in enumerate(examples):
        if not isinstance(e, dict):
            raise ValueError(f"{where}example {i} is a {type(e).__name__}, not a dict with "
                             "'input' and 'target'")
        for key in ("input", "target"):
            if not isinstance(e.get(key), str):
                raise ValueError(f"{where}example {i}: {key!r} must be a string, got "
                                 f"{type(e.get(key)).__name__}" + (" (missing)" if key not in e else ""))
            try:
                e[key].encode("utf-8")  # what the tokenizer needs (JSON allows "\ud800")
            except UnicodeEncodeError:
                raise ValueError(f"{where}example {i}: {key!r} is not text a tokenizer takes "
                                 "(it holds an unpaired surrogate such as \\ud800)") from None
    return examples


def default_max_length(tokenizer, model) -> int:
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


# Encoders whose attention knows positions only relative to each other (T5's buckets of
# key - query): several examples packed into one row, each attending only to itself, give the
# same outputs as padded rows, without computing the padding.
PACKABLE = ("t5", "mt5")


def packs_encoder(model) -> bool:
    return bool(model.config.is_encoder_decoder) and model.config.model_type in PACKABLE


def packing_pays(config, batch: dict[str, torch.Tensor]) -> bool:
    """Whether packing this batch saves more encoder work than it adds: the linear layers skip
    the padding, but attention then spans all T^2 token pairs of the packed row instead of
    B * L^2. Counted in multiply-adds per layer: per token the q, k, v, o and feed-forward
    matrices; per token pair and head QK^T and AV over d_kv, plus a few element-wise ops (bias,
    mask, softmax). At the flan-t5-large shape the benchmark's 5 examples (76 tokens in 105
    slots) ran 14-17% faster packed; the zoo's model, whose examples carry little padding, ran
    up to 1.55x slower packed, and is left padded by this count."""
    rows, width = batch["attention_mask"].shape
    tokens = int(batch["attention_mask"].sum())
    inner = config.num_heads * config.d_kv
    ff_matrices = 3 if getattr(config, "is_gated_act", False) else 2
    per_token = 4 * config.d_model * inner + ff_matrices * config.d_model * config.d_ff
    per_pair = config.num_heads * (2 * config.d_kv + 5)
    return (rows * width - tokens) * per_token > (tokens ** 2 - rows * width ** 2) * per_pair


def encoder_batches(model, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The batches as the model scores them: packed where the encoder allows it and it pays."""
    if not packs_encoder(model):
        return batches
    return [pack_encoder_inputs(b) if packing_pays(model.config, b) else b for b in batches]


def pack_encoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch plus its examples' input tokens packed into one row: packed_ids [1, T],
    segments [1, T] (which example each token is), unpack [1, B * L] (where each padded
    position's token sits in the packed row; padding points at token 0 and stays masked)."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(mask.shape[1], device=mask.device)
    unpack = torch.where(mask, starts[:, None] + positions, 0)
    return dict(batch, packed_ids=batch["input_ids"][mask][None],
                segments=torch.repeat_interleave(torch.arange(len(lengths), device=mask.device),
                                                 lengths)[None],
                unpack=unpack.reshape(1, -1))


def _encode_packed(model, batch: dict[str, torch.Tensor]):
    """The encoder's states for the padded rows, computed on the packed rows (one per
    candidate when the batch is repeated K times)."""
    from transformers.modeling_outputs import BaseModelOutput
    segments = batch["segments"]
    dtype = model.get_input_embeddings().weight.dtype
    allowed = segments[:, None, :, None] == segments[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    hidden = model.get_encoder()(input_ids=batch["packed_ids"], attention_mask=mask).last_hidden_state
    rows = torch.arange(len(hidden), device=hidden.device)[:, None]
    padded = hidden[rows, batch["unpack"]].reshape(*batch["input_ids"].shape, hidden.shape[-1])
    return BaseModelOutput(last_hidden_state=padded)


def _scored_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the labels they predict (causal LMs: shifted by one)."""
    labels = batch["labels"]
    if "packed_ids" in batch:
        logits = model(encoder_outputs=_encode_packed(model, batch),
                       attention_mask=batch["attention_mask"], labels=labels).logits
    elif model.config.is_encoder_decoder:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=labels).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of target-token cross-entropies, number of target tokens) for one batch."""
    logits, labels = _scored_logits(model, batch)
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                              labels.reshape(-1), ignore_index=-100,
                                              reduction="sum")
    return total, int((labels != -100).sum())


def candidate_losses(model, batches: list[dict[str, torch.Tensor]], n_examples: int,
                     objective: str, k: int) -> list[float]:
    """few_shot_loss for K candidates at once: each batch is repeated K times, candidate-major,
    for a model whose rows k*B .. k*B + B - 1 run candidate k's LoRA (forward.BatchedLoRA)."""
    totals = torch.zeros(k, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for b in batches:
            repeated = {key: v.repeat(k, *[1] * (v.dim() - 1)) for key, v in b.items()}
            logits, labels = _scored_logits(model, repeated)
            per_token = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                ignore_index=-100, reduction="none")
            sums = per_token.view(k, -1).sum(1).double().cpu()
            n = int((labels != -100).sum()) // k  # each candidate's target tokens
            totals += sums / max(n, 1) if objective == "lorahub" else sums
            tokens += n
    totals /= n_examples if objective == "lorahub" else max(tokens, 1)
    return totals.tolist()


def task_loss(model, batches: list[dict[str, torch.Tensor]], n_examples: int,
              objective: str = "paper") -> torch.Tensor:
    """The objective's task loss as a float64 tensor (differentiable when grad is enabled)."""
    if objective == "lorahub":
        total = torch.zeros((), dtype=torch.float64)
        for b in batches:
            s, n = token_losses(model, b)
            total = total + s.double().cpu() / max(n, 1)
        return total / n_examples
    sums, counts = zip(*(token_losses(model, b) for b in batches))
    return torch.stack([s.double().cpu() for s in sums]).sum() / max(sum(counts), 1)


def few_shot_loss(model, batches: list[dict[str, torch.Tensor]], n_examples: int,
                  objective: str = "paper", loss_fn: Callable | None = None) -> float:
    """The objective's task loss of `model` on the tokenized examples (no regularizer).
    loss_fn(model, batch) -> float replaces it, averaged over batches weighted by size."""
    with torch.no_grad():
        if loss_fn is not None:
            return sum(float(loss_fn(model, b)) * len(b["input_ids"]) for b in batches) / n_examples
        return float(task_loss(model, batches, n_examples, objective))
