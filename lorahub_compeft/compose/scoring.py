"""The forward pass that scores mixes of experts, K candidates per forward.

Candidates are scored in the precision the session chose (precision.py: the model itself, or
low-precision copies of its linear layers swapped in while scoring). The mixed LoRA tensors are
summed in fp32 and cast to the model's dtype once per step; the loss is computed in fp32
(objective.py).

K candidates per forward (`Scorer.score_candidates`): the examples are repeated K times,
candidate-major (rows k*B .. k*B + B - 1 belong to candidate k), PEFT's own LoRA term is
switched off, and a hook on each LoRA layer adds candidate k's term
scaling * x_k A_k^T B_k^T with two batched matmuls, A_k and B_k being candidate k's mix (in
product mix A is the same for every candidate: one matmul for all K, then the batched B).
One candidate per forward in product mix runs only the rank blocks of the experts whose w is
not 0 (ActiveBlocks).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from lorahub_compeft.compose.objective import candidate_losses, few_shot_loss
from lorahub_compeft.compose.precision import LinearCopies, scoring
from lorahub_compeft.compose.stacks import (ADAPTER_NAME, Layout, ProductStack, Stack, is_lora_b,
                                            lora_params, product_order, saved_key)

class BatchedLoRA:
    """Hooks that add K candidates' LoRA terms in one forward of a PEFT LoRA model.

    The candidates' mixes live in one [K, P - head] float32 buffer in the layout's order (P =
    the LoRA parameters), cast once per step to the model's dtype; each layer reads its A
    [K, r, in] and B [K, out, r] as views of that copy. `shared`: the layout's first entries,
    the same for every candidate (a ProductStack's A tensors, head = their count): those
    layers read A [r, in] from it."""

    def __init__(self, model, layout: Layout, k_max: int, shared: torch.Tensor | None = None):
        from peft.tuners.lora import LoraLayer
        params = lora_params(model)
        index = {key: j for j, key in enumerate(layout.keys)}
        self.layers = []  # (LoRA layer, index of A in the layout, index of B, scaling)
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if ADAPTER_NAME in module.lora_embedding_A:
                raise ValueError(f"{name}: LoRA on an embedding cannot be scored several "
                                 "candidates per forward; use candidates_per_step=1")
            if ADAPTER_NAME not in module.lora_A:
                continue
            a = index[saved_key(f"{name}.lora_A.{ADAPTER_NAME}.weight")]
            b = index[saved_key(f"{name}.lora_B.{ADAPTER_NAME}.weight")]
            if len(layout.shapes[a]) != 2 or len(layout.shapes[b]) != 2:
                raise ValueError(f"{name}: only LoRA on linear layers can be scored several "
                                 "candidates per forward; use candidates_per_step=1")
            self.layers.append((module, a, b, module.scaling[ADAPTER_NAME]))
        if 2 * len(self.layers) != len(layout.keys):
            raise ValueError("some LoRA tensors are not on linear layers; use candidates_per_step=1")
        device = params[0][1].device
        self.layout = layout
        self.head = 0 if shared is None else shared.numel()
        self.mixed = torch.zeros(k_max, layout.numel - self.head, dtype=torch.float32,
                                 device=device)
        dtype = params[0][1].dtype
        self.cast = self.mixed if dtype == torch.float32 else torch.empty_like(self.mixed, dtype=dtype)
        self.shared = None if shared is None else shared.to(device, dtype)
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []

    def load(self, stack: Stack, weights: torch.Tensor | np.ndarray) -> None:
        """Mix each row of weights [K, N] into the buffer and cut the per-layer views."""
        k = len(weights)
        stack.mix_many(weights, out=self.mixed[:k])
        if self.cast is not self.mixed:
            self.cast[:k].copy_(self.mixed[:k])  # the one cast per step
        self.views = [(self._view(a, k), self._view(b, k)) for _, a, b, _ in self.layers]

    def _view(self, j: int, k: int) -> torch.Tensor:
        """Tensor j of the layout: [K, ...] from the candidates' copy, or shared by all."""
        start, end = self.layout.offsets[j], self.layout.offsets[j + 1]
        if end <= self.head:
            return self.shared[start:end].view(self.layout.shapes[j])
        return self.cast[:k, start - self.head:end - self.head].view(k, *self.layout.shapes[j])

    @contextlib.contextmanager
    def active(self, peft_model):
        """Within: the model adds the loaded candidates' terms instead of its own LoRA."""
        # On the LoRA layers, whose output is their base layer's while the adapter is
        # disabled, whichever base layer (the model's own or a low-precision copy) is in place.
        handles = [layer.register_forward_hook(self._hook(j))
                   for j, (layer, _, _, _) in enumerate(self.layers)]
        try:
            with peft_model.disable_adapter():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, j: int):
        scaling = self.layers[j][3]

        def add_delta(module, args, output):
            a, b = self.views[j]  # [K, r, in] (or one [r, in] for all), [K, out, r]
            x = args[0].reshape(len(b), -1, args[0].shape[-1]).to(b.dtype)
            xa = torch.bmm(x, a.transpose(1, 2)) if a.dim() == 3 else x @ a.T
            delta = torch.bmm(xa, b.transpose(1, 2))
            return output + (delta * scaling).view(output.shape).to(output.dtype)
        return add_delta


class ActiveBlocks:
    """Product mix, one candidate per forward: each LoRA layer sees only the rank blocks of the
    experts whose w is not 0 (one at w = 0 adds exactly nothing), so a point of the search with
    fewer experts in it runs a LoRA of lower rank (from w = 0 or from the best expert alone, the
    search's first points are such), and one with none the base alone."""

    def __init__(self, model, stack: ProductStack):
        params = product_order(lora_params(model))
        if [saved_key(n) for n, _ in params] != stack.layout.keys:
            raise ValueError("the model's LoRA parameters are not the product stack's layout")
        self.model, (_, self.n, self.r) = model, stack.blocks.shape  # N experts of rank r
        self.params = [(p, p.data, 1 if is_lora_b(k) else 0)  # the rank's dim: B's 1, A's 0
                       for (_, p), k in zip(params, stack.layout.keys)]

    @contextlib.contextmanager
    def of(self, w):
        active = np.flatnonzero(np.asarray(w) != 0)
        if len(active) == self.n:
            yield
            return
        if len(active) == 0:
            with self.model.disable_adapter():
                yield
            return
        kept = (active[:, None] * self.r + np.arange(self.r)).reshape(-1)  # their rank rows
        kept = torch.as_tensor(kept, device=self.params[0][1].device)
        for p, full, dim in self.params:
            p.data = full.index_select(dim, kept)
        try:
            yield
        finally:
            for p, full, _ in self.params:
                p.data = full


def check_loss_fn(loss_fn, per_forward: int) -> None:
    """A custom loss_fn(model, batch) scores one model at a time: not K candidates at once."""
    if per_forward > 1 and loss_fn is not None:
        raise ValueError("loss_fn scores one model at a time; use candidates_per_step=1 with it")


class Scorer:
    """The task loss (no regularizer) of mixes of a stack's experts on tokenized examples.

    loss(w): one candidate through the model's own LoRA parameters (the flat buffer).
    score_candidates(weights [K, N]): K candidates, up to `per_forward` of them per forward
    through BatchedLoRA (one by one through loss() when per_forward is 1). Either serves to
    score each expert alone: score_candidates(np.eye(N)). With `copies` (LinearCopies) every
    forward runs through them.
    timings: seconds spent mixing and in forwards, and the number of forwards."""

    def __init__(self, model, stack: Stack, flat: torch.Tensor, batches: list[dict],
                 n_examples: int, objective: str, loss_fn=None, per_forward: int = 1,
                 copies: LinearCopies | None = None):
        if per_forward < 1:
            raise ValueError(f"candidates_per_step must be at least 1, got {per_forward}")
        check_loss_fn(loss_fn, per_forward)
        self.model, self.stack, self.flat, self.batches = model, stack, flat, batches
        self.n_examples, self.objective, self.loss_fn = n_examples, objective, loss_fn
        self.per_forward = per_forward
        self.copies = copies
        shared = stack.fixed if isinstance(stack, ProductStack) else None
        self.batched = (BatchedLoRA(model, stack.layout, per_forward, shared)
                        if per_forward > 1 else None)
        self.blocks = (ActiveBlocks(model, stack)
                       if shared is not None and self.batched is None else None)
        self.reset_timings()
        cuda = flat.device.type == "cuda"
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)

    def _timed(self, key: str, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        self._sync()
        self.timings[key] += time.perf_counter() - start
        self.timings["forwards"] += key == "forward"
        return value

    def loss(self, w) -> float:
        self._timed("mix", self.stack.mix, w, self.flat)
        blocks = self.blocks.of(w) if self.blocks is not None else contextlib.nullcontext()
        with scoring(self.copies), blocks:
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
            with self.batched.active(self.model), scoring(self.copies):
                losses += self._timed("forward", candidate_losses, self.model, self.batches,
                                      self.n_examples, self.objective, len(chunk))
        return losses

    def reset_timings(self) -> None:
        self.timings = {"mix": 0.0, "forward": 0.0, "forwards": 0}
