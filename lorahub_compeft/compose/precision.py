"""The precision the search scores candidates in, and the low-precision copies that run it.

The model itself always stays as loaded (fp32; a model object the caller passed keeps its own
dtype), so that result.model, generation, the first-order estimate, the merged model and the
saved adapter never see a lower precision. A lower precision is copies of the base's large
linear layers, swapped in only while candidates are scored (LinearCopies): int8 (CPU: weights
int8 per output channel, each input quantized per call by torch's dynamic kernel, output fp32)
or bf16/fp16 (weights cast once, each input cast per call, output cast back). Left in the
model's dtype: LoRA's factors (the mix stays exact), the output embeddings (the logits of the
loss) and the modules the model class keeps in fp32 (T5's `wo`, whose inputs carry outliers).

dtype "auto" measures which precision is fastest on this machine for this model and batch
(probe.py); the others force one.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float32": torch.float32, "float": torch.float32}
INT8 = "int8"


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where unknown)."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device) -> bool:
    """Whether `device` computes bf16 matmuls natively (elsewhere torch emulates them: 2.7x
    slower than fp32 for a flan-t5-large-sized matmul on an AVX2-only EPYC). "auto" measures
    bf16 only where this holds; it is no reason to pick it (probe.py)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return False


def int8_engine() -> str | None:
    """torch's quantized CPU engine for dynamic int8 linear layers, if this build has one."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm", "qnnpack") if e in engines), None)


def pick_device(device=None) -> torch.device:
    """The device named, else a GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lower_precisions(device: torch.device, model) -> list[str]:
    """The precisions "auto" measures besides the model's own (probe.py)."""
    own = next(model.parameters()).dtype
    lows = []
    if native_bf16(device) and own != torch.bfloat16:
        lows.append(dtype_name(torch.bfloat16))
    if device.type == "cpu" and int8_engine() is not None:
        lows.append(INT8)
    return lows


@dataclass
class Precision:
    """How the search scores candidates. dtype: what a model loaded by name is loaded in
    (None: the checkpoint's own); convert: whether a model object is converted to it too.
    low: the copies candidates are scored through ("int8", "bfloat16", "float16"; None: the
    model itself). auto: to be measured (probe.py), which sets low and `measured`: what was
    timed, the losses at w = 0 and whether the choice came from the cache."""
    dtype: torch.dtype | None = torch.float32
    low: str | None = None
    auto: bool = False
    convert: bool = False
    measured: dict | None = field(default=None, compare=False)

    @property
    def zero_loss(self) -> float | None:
        """The task loss at w = 0 in this precision, where the probe just measured it (LoRA at
        zero: the same for any experts and mix), so that the search need not score it again."""
        if not self.measured or self.measured["cached"]:
            return None
        return self.measured["candidates"].get(self.measured["chosen"], {}).get("loss")

    def name_for(self, model) -> str:
        """What ran: the copies' precision, else the model's own dtype."""
        if self.low is not None:
            return self.low
        return dtype_name(next(model.parameters()).dtype)


def resolve_precision(dtype, device) -> Precision:
    """None keeps the model's own dtype; "fp32" (or a torch.dtype: converted to it) scores the
    model itself; "bf16", "fp16", "int8" score through copies of the fp32 model's linear layers;
    "auto" measures (probe.py)."""
    device = torch.device(device)
    if dtype is None:
        return Precision(None)
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype).lower()
    if name == "auto":
        return Precision(auto=True)
    if name == INT8:
        if device.type != "cpu" or int8_engine() is None:
            raise ValueError(f"dtype='int8' scores with torch's int8 CPU kernels, which "
                             f"{'this torch build lacks' if device.type == 'cpu' else f'a {device.type} device cannot run'}; "
                             "use dtype='auto', 'bf16' or 'fp32'")
        return Precision(low=INT8)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'int8', one of {sorted(DTYPES)} "
                         "or a torch.dtype")
    if DTYPES[name] == torch.float32:
        return Precision(torch.float32, convert=True)
    return Precision(low=dtype_name(DTYPES[name]))


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
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)


class CastLinear(torch.nn.Module):
    """A linear layer's copy in a lower float dtype: weights cast once, the input cast per call,
    the output cast back to the input's dtype."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.weight = linear.weight.detach().to(dtype)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight,
                                          self.bias).to(x.dtype)


def low_copy(linear: torch.nn.Linear, low: str) -> torch.nn.Module:
    """`linear`'s copy in precision `low`."""
    if low == INT8:
        torch.backends.quantized.engine = int8_engine()
        return Int8Linear(linear)
    return CastLinear(linear, DTYPES[low])


def swappable(model) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """The linear layers a lower precision replaces, as (parent, attribute, layer): all but
    LoRA's own, the output embeddings and the model class's fp32 modules."""
    keep = set(getattr(model.get_base_model(), "_keep_in_fp32_modules", None) or [])
    output = model.get_output_embeddings()
    found = []
    for parent_name, parent in model.named_modules():
        if parent_name.split(".")[-1].startswith("lora_"):
            continue  # LoRA's A and B
        for attr, layer in parent.named_children():
            if type(layer) is not torch.nn.Linear or layer is output:
                continue
            owner = attr if attr != "base_layer" else parent_name.split(".")[-1]
            if owner not in keep:
                found.append((parent, attr, layer))
    return found


class LinearCopies:
    """Copies (low_copy) of a model's swappable linear layers in precision `low`, swapped in
    while candidates are scored. The model's own layers stay in place everywhere else."""

    def __init__(self, model, low: str, reuse: "LinearCopies | None" = None):
        """reuse: the copies made for the same base layers before LoRA was re-injected."""
        known = {id(own): copy for _, _, own, copy in reuse.swaps} if reuse else {}
        self.low = low
        self.swaps = [(parent, attr, layer, known.get(id(layer)) or low_copy(layer, low))
                      for parent, attr, layer in swappable(model)]

    @contextlib.contextmanager
    def active(self):
        for parent, attr, _, copy in self.swaps:
            parent._modules[attr] = copy
        try:
            yield
        finally:
            for parent, attr, own, _ in self.swaps:
                parent._modules[attr] = own


def scoring(copies: LinearCopies | None):
    """The context candidates are scored in: the copies swapped in, or the model as is."""
    return copies.active() if copies is not None else contextlib.nullcontext()
