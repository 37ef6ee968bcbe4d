"""The forward pass that scores mixes of experts: its dtype, and K candidates per forward.

dtype "auto" runs the base in bf16 only where the hardware computes bf16 natively (a CUDA
device that supports it; a CPU with AVX512-BF16 or AMX). Elsewhere torch emulates bf16 matmuls
and they are slower than fp32: on this repository's AVX2-only EPYC a 100x1024 @ 1024x2816
matmul took 2.7x its fp32 time. The mixed LoRA tensors are always summed in fp32 and cast to
the model's dtype once per step; the loss is computed in fp32 (objective.py).

K candidates per forward (`Scorer.score_candidates`): the examples are repeated K times,
candidate-major (rows k*B .. k*B + B - 1 belong to candidate k), PEFT's own LoRA term is
switched off, and a hook on each LoRA-wrapped layer adds candidate k's term
scaling * x_k A_k^T B_k^T with two batched matmuls, A_k and B_k being candidate k's mix.
"""
from __future__ import annotations

import contextlib
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .objective import candidate_losses, few_shot_loss
from .stacks import ADAPTER_NAME, Layout, Stack, lora_params

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float32": torch.float32, "float": torch.float32}


@lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    if not sys.platform.startswith("linux"):
        return frozenset()  # unknown: fp32 is the safe choice
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device) -> bool:
    """Whether `device` computes bf16 matmuls natively (else torch emulates them, slowly)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def resolve_dtype(dtype, device) -> torch.dtype | None:
    """None keeps the model's own dtype; "auto" is bf16 where native_bf16(device), else fp32."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower()
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"unknown dtype {dtype!r}; use 'auto', one of {sorted(DTYPES)} or a "
                     "torch.dtype")


class BatchedLoRA:
    """Hooks that add K candidates' LoRA terms in one forward of a PEFT LoRA model.

    The candidates' mixes live in one [K, P] float32 buffer in the layout's order (P = the
    LoRA parameters), cast once per step to the model's dtype; each layer reads its A [K, r, in]
    and B [K, out, r] as views of that copy."""

    def __init__(self, model, layout: Layout, k_max: int):
        from peft.tuners.lora import LoraLayer
        params = lora_params(model)
        index = {name: j for j, (name, _) in enumerate(params)}
        self.layers = []  # (base layer, index of A in the layout, index of B, scaling)
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if ADAPTER_NAME in module.lora_embedding_A:
                raise ValueError(f"{name}: LoRA on an embedding cannot be scored several "
                                 "candidates per forward; use candidates_per_step=1")
            if ADAPTER_NAME not in module.lora_A:
                continue
            a = index[f"{name}.lora_A.{ADAPTER_NAME}.weight"]
            b = index[f"{name}.lora_B.{ADAPTER_NAME}.weight"]
            if len(layout.shapes[a]) != 2 or len(layout.shapes[b]) != 2:
                raise ValueError(f"{name}: only LoRA on linear layers can be scored several "
                                 "candidates per forward; use candidates_per_step=1")
            self.layers.append((module.get_base_layer(), a, b, module.scaling[ADAPTER_NAME]))
        if 2 * len(self.layers) != len(layout.keys):
            raise ValueError("some LoRA tensors are not on linear layers; use candidates_per_step=1")
        device = params[0][1].device
        self.layout = layout
        self.mixed = torch.zeros(k_max, layout.numel, dtype=torch.float32, device=device)
        dtype = params[0][1].dtype
        self.cast = self.mixed if dtype == torch.float32 else torch.empty_like(self.mixed, dtype=dtype)
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []

    def load(self, stack: Stack, weights: torch.Tensor | np.ndarray) -> None:
        """Mix each row of weights [K, N] into the buffer and cut the per-layer views."""
        k = len(weights)
        stack.mix_many(weights, out=self.mixed[:k])
        if self.cast is not self.mixed:
            self.cast[:k].copy_(self.mixed[:k])  # the one cast per step
        offsets, shapes = self.layout.offsets, self.layout.shapes
        self.views = [(self.cast[:k, offsets[a]:offsets[a + 1]].view(k, *shapes[a]),
                       self.cast[:k, offsets[b]:offsets[b + 1]].view(k, *shapes[b]))
                      for _, a, b, _ in self.layers]

    @contextlib.contextmanager
    def active(self, peft_model):
        """Within: the model adds the loaded candidates' terms instead of its own LoRA."""
        handles = [base.register_forward_hook(self._hook(j))
                   for j, (base, _, _, _) in enumerate(self.layers)]
        try:
            with peft_model.disable_adapter():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, j: int):
        scaling = self.layers[j][3]

        def add_delta(module, args, output):
            a, b = self.views[j]  # [K, r, in], [K, out, r]
            x = args[0].reshape(len(a), -1, args[0].shape[-1]).to(a.dtype)
            delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
            return output + (delta * scaling).view(output.shape).to(output.dtype)
        return add_delta


class Scorer:
    """The task loss (no regularizer) of mixes of a stack's experts on tokenized examples.

    loss(w): one candidate through the model's own LoRA parameters (the flat buffer).
    score_candidates(weights [K, N]): K candidates, up to `per_forward` of them per forward
    through BatchedLoRA (one by one through loss() when per_forward is 1). Either serves to
    score each expert alone: score_candidates(np.eye(N)).
    timings: seconds spent mixing and in forwards."""

    def __init__(self, model, stack: Stack, flat: torch.Tensor, batches: list[dict],
                 n_examples: int, objective: str, loss_fn=None, per_forward: int = 1):
        if per_forward < 1:
            raise ValueError(f"candidates_per_step must be at least 1, got {per_forward}")
        if per_forward > 1 and loss_fn is not None:
            raise ValueError("loss_fn scores one model at a time; use candidates_per_step=1 with it")
        self.model, self.stack, self.flat, self.batches = model, stack, flat, batches
        self.n_examples, self.objective, self.loss_fn = n_examples, objective, loss_fn
        self.per_forward = per_forward
        self.batched = (BatchedLoRA(model, stack.layout, per_forward)
                        if per_forward > 1 else None)
        self.timings = {"mix": 0.0, "forward": 0.0}
        cuda = flat.device.type == "cuda"
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)

    def _timed(self, key: str, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        self._sync()
        self.timings[key] += time.perf_counter() - start
        return value

    def loss(self, w) -> float:
        self._timed("mix", self.stack.mix, w, self.flat)
        return self._timed("forward", few_shot_loss, self.model, self.batches, self.n_examples,
                           self.objective, self.loss_fn)

    def score_candidates(self, weights) -> list[float]:
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if self.batched is None:
            return [self.loss(w) for w in weights]
        losses = []
        for start in range(0, len(weights), self.per_forward):
            chunk = weights[start:start + self.per_forward]
            self._timed("mix", self.batched.load, self.stack, chunk)
            with self.batched.active(self.model):
                losses += self._timed("forward", candidate_losses, self.model, self.batches,
                                      self.n_examples, self.objective, len(chunk))
        return losses

    def reset_timings(self) -> None:
        self.timings = {"mix": 0.0, "forward": 0.0}
