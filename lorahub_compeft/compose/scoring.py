"""The forward pass that scores mixes of experts: its precision, and K candidates per forward.

dtype "auto" runs the base in bf16 where the hardware computes bf16 natively (a CUDA device
that supports it; a CPU with AVX512-BF16 or AMX). Elsewhere torch emulates bf16 matmuls and
they are slower than fp32 (2.7x for a 100x1024 @ 1024x2816 matmul on this repository's
AVX2-only EPYC), so on such a CPU "auto" scores the search's candidates through int8 copies
of the base's large linear layers (Int8Linears) and keeps fp32 for everything else. The mixed
LoRA tensors are always summed in fp32 and cast to the model's dtype once per step; the loss is
computed in fp32 (objective.py).

K candidates per forward (`Scorer.score_candidates`): the examples are repeated K times,
candidate-major (rows k*B .. k*B + B - 1 belong to candidate k), PEFT's own LoRA term is
switched off, and a hook on each LoRA layer adds candidate k's term
scaling * x_k A_k^T B_k^T with two batched matmuls, A_k and B_k being candidate k's mix (in
product mix A is the same for every candidate: one matmul for all K, then the batched B).
"""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lorahub_compeft.compose.objective import candidate_losses, few_shot_loss
from lorahub_compeft.compose.stacks import (ADAPTER_NAME, Layout, ProductStack, Stack,
                                            lora_params, saved_key)

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


INT8 = "int8"
# auto uses int8 only where its kernels pay: linear layers of at least 512 x 512 weights on
# average. A 1024 x 2816 matmul of 100 rows ran 2.3x faster in int8 here (512 x 1024: 1.8x),
# but the zoo's model (d_model 128) spends its forward elsewhere and ran 0.94x as fast.
INT8_MIN_WEIGHTS = 512 * 512


@dataclass(frozen=True)
class Precision:
    """How the search runs the base: `dtype` its weights (None: as given), `int8` whether
    candidates are scored through int8 copies of its large linear layers (CPU)."""
    dtype: torch.dtype | None
    int8: bool = False
    only_if_pays: bool = False  # "auto": int8 only for models where Int8Linears.pays

    def for_model(self, model) -> "Precision":
        """What runs for this model: "auto" drops int8 where Int8Linears.pays says it would not."""
        if self.int8 and self.only_if_pays and not Int8Linears.pays(model):
            return Precision(self.dtype)
        return self

    @property
    def name(self) -> str:
        if self.int8:
            return INT8
        return "as given" if self.dtype is None else str(self.dtype).removeprefix("torch.")


def int8_engine() -> str | None:
    """torch's quantized CPU engine for dynamic int8 linear layers, if this build has one."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm", "qnnpack") if e in engines), None)


def pick_device(device=None) -> torch.device:
    """The device named, else a GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_precision(dtype, device) -> Precision:
    """None keeps the model's own dtype; "auto" is bf16 where native_bf16(device), else on a CPU
    with an int8 engine fp32 weights with int8 scoring ("int8", used only for models large
    enough: Int8Linears.pays), else fp32."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return Precision(dtype)
    name = str(dtype).lower()
    device = torch.device(device)
    if name == "auto":
        if native_bf16(device):
            return Precision(torch.bfloat16)
        int8 = device.type == "cpu" and int8_engine() is not None
        return Precision(torch.float32, int8=int8, only_if_pays=int8)
    if name == INT8:
        if device.type != "cpu" or int8_engine() is None:
            raise ValueError(f"dtype='int8' scores with torch's int8 CPU kernels, which "
                             f"{'this torch build lacks' if device.type == 'cpu' else f'a {device.type} device cannot run'}; "
                             "use dtype='auto', 'bf16' or 'fp32'")
        return Precision(torch.float32, int8=True)
    if name in DTYPES:
        return Precision(DTYPES[name])
    raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'int8', one of {sorted(DTYPES)} "
                     "or a torch.dtype")


class Int8Linear(torch.nn.Module):
    """A linear layer's int8 copy: weights symmetric int8 per output channel, packed once for
    torch's dynamic int8 kernel, which quantizes each input per call and returns fp32."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = torch.linalg.vector_norm(weight, ord=float("inf"), dim=1).clamp_min(1e-12) / 127
        values = torch.round(weight / scale[:, None]).to(torch.int8)
        with warnings.catch_warnings():  # torch deprecates the quantized tensor type
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch._make_per_channel_quantized_tensor(
                values, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
            bias = None if linear.bias is None else linear.bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(quantized, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit inputs, as torch's own dynamic layers use with the x86/fbgemm
        # kernels (their 8-bit products can saturate on AVX2).
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


class Int8Linears:
    """int8 copies (Int8Linear) of a model's linear layers, swapped in while candidates are
    scored. Left in fp32: LoRA's own factors (the mix must stay exact), the output embeddings
    (the logits of the loss) and the modules the model class keeps in fp32 (T5's `wo`, whose
    inputs carry large outliers). The fp32 layers stay the model's own: the first-order
    estimate, generation and the saved adapter never see the int8 copies."""

    def __init__(self, model, reuse: "Int8Linears | None" = None):
        """reuse: the int8 copies made for the same base layers before LoRA was re-injected."""
        known = {id(fp32): int8 for _, _, fp32, int8 in reuse.swaps} if reuse else {}
        keep = set(getattr(model.get_base_model(), "_keep_in_fp32_modules", None) or [])
        output = model.get_output_embeddings()
        self.swaps = []  # (parent, attribute, fp32 layer, int8 layer)
        torch.backends.quantized.engine = int8_engine()
        for parent_name, parent in model.named_modules():
            if parent_name.split(".")[-1].startswith("lora_"):
                continue  # LoRA's A and B
            for attr, layer in parent.named_children():
                if type(layer) is not torch.nn.Linear or layer is output:
                    continue
                owner = attr if attr != "base_layer" else parent_name.split(".")[-1]
                if owner not in keep:
                    self.swaps.append((parent, attr, layer,
                                       known.get(id(layer)) or Int8Linear(layer)))

    @staticmethod
    def pays(model) -> bool:
        """Whether int8 pays for this model (INT8_MIN_WEIGHTS per linear layer on average)."""
        sizes = [m.weight.numel() for n, m in model.named_modules()
                 if type(m) is torch.nn.Linear and "lora_" not in n]
        return bool(sizes) and sum(sizes) / len(sizes) >= INT8_MIN_WEIGHTS

    @contextlib.contextmanager
    def active(self):
        for parent, attr, _, int8 in self.swaps:
            parent._modules[attr] = int8
        try:
            yield
        finally:
            for parent, attr, fp32, _ in self.swaps:
                parent._modules[attr] = fp32


def scoring(int8: Int8Linears | None):
    """The context candidates are scored in: the int8 copies swapped in, or the model as is."""
    return int8.active() if int8 is not None else contextlib.nullcontext()


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
        # disabled, whichever base layer (fp32 or an int8 copy) is in place.
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


def check_loss_fn(loss_fn, per_forward: int) -> None:
    """A custom loss_fn(model, batch) scores one model at a time: not K candidates at once."""
    if per_forward > 1 and loss_fn is not None:
        raise ValueError("loss_fn scores one model at a time; use candidates_per_step=1 with it")


class Scorer:
    """The task loss (no regularizer) of mixes of a stack's experts on tokenized examples.

    loss(w): one candidate through the model's own LoRA parameters (the flat buffer).
    score_candidates(weights [K, N]): K candidates, up to `per_forward` of them per forward
    through BatchedLoRA (one by one through loss() when per_forward is 1). Either serves to
    score each expert alone: score_candidates(np.eye(N)). With `int8` (Int8Linears) every
    forward runs through the int8 copies of the base's linear layers.
    timings: seconds spent mixing and in forwards, and the number of forwards."""

    def __init__(self, model, stack: Stack, flat: torch.Tensor, batches: list[dict],
                 n_examples: int, objective: str, loss_fn=None, per_forward: int = 1,
                 int8: Int8Linears | None = None):
        if per_forward < 1:
            raise ValueError(f"candidates_per_step must be at least 1, got {per_forward}")
        check_loss_fn(loss_fn, per_forward)
        self.model, self.stack, self.flat, self.batches = model, stack, flat, batches
        self.n_examples, self.objective, self.loss_fn = n_examples, objective, loss_fn
        self.per_forward = per_forward
        self.int8 = int8
        shared = stack.fixed if isinstance(stack, ProductStack) else None
        self.batched = (BatchedLoRA(model, stack.layout, per_forward, shared)
                        if per_forward > 1 else None)
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
        with scoring(self.int8):
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
            with self.batched.active(self.model), scoring(self.int8):
                losses += self._timed("forward", candidate_losses, self.model, self.batches,
                                      self.n_examples, self.objective, len(chunk))
        return losses

    def reset_timings(self) -> None:
        self.timings = {"mix": 0.0, "forward": 0.0, "forwards": 0}
