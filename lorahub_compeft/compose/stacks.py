"""The chosen experts held for mixing, and the model's LoRA parameters as one flat buffer.

Every stack answers `mix(w, out)`: the flat vector of the composed LoRA for weights w, in the
layout of the model's LoRA parameters. The model's lora_A/lora_B parameters are views into one
flat buffer, so a step's mixing writes that buffer in place: no state dict is rebuilt, no
adapter reloaded. `mix_many(W, out)` is the same for each row of W [K, N] into out [K, P - head]
(K candidates scored in one forward, scoring.py); `head` leading entries of the flat vector do
not depend on w (0 but for ProductStack) and are shared by the K candidates.

mix "factors" (LoraHub's): per module A = sum_i w_i A_i and B = sum_i w_i B_i, so the update
is (sum_i w_i B_i)(sum_j w_j A_j), cross terms included.
    DenseStack     one [N, P] float32 matrix; a step is one matrix-vector product
    TernaryStack   ComPEFT experts kept sparse (int32 position + int8 sign per kept value);
                   a step scatters sum_i w_i * scale * sign into the buffer
mix "product": the update is exactly sum_i w_i s_i B_i A_i, a LoRA of rank N*r.
    ProductStack   A = [A_1; ...; A_N] written once; a step rescales the B blocks [w_i B_i]
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lorahub_compeft.codecs.ere import lora_scaling
from lorahub_compeft.compose.experts import ExpertHandle

ADAPTER_NAME = "default"


@dataclass
class Layout:
    """Where each LoRA tensor (PEFT's saved key name) lies in the flat vector."""
    keys: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]  # len(keys) + 1: tensor j spans offsets[j]:offsets[j + 1]

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: flat[o:o + math.prod(s)].view(s)
                for k, s, o in zip(self.keys, self.shapes, self.offsets)}


def as_weights(w, dtype, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w,
                           dtype=dtype, device=device)


def mix_weights(stack: torch.Tensor, w) -> torch.Tensor:
    """sum_i w_i stack[i] for a stack of shape [N, ...]."""
    return torch.tensordot(as_weights(w, stack.dtype, stack.device), stack, dims=1)


@dataclass
class DenseStack:
    """N experts' LoRA tensors as one [N, P] float32 matrix in the layout's order."""
    layout: Layout
    matrix: torch.Tensor
    head = 0  # every entry depends on w

    @property
    def numel(self) -> int:
        return self.layout.numel

    def mix(self, w, out: torch.Tensor | None = None) -> torch.Tensor:
        """sum_i w_i E_i, into `out` if given (in place spares a P-sized buffer per step)."""
        if out is not None and out.dtype == self.matrix.dtype:
            return torch.mv(self.matrix.T, as_weights(w, out.dtype, out.device), out=out)
        mixed = mix_weights(self.matrix, w)
        return mixed if out is None else out.copy_(mixed)

    def mix_many(self, weights, out: torch.Tensor) -> torch.Tensor:
        """Row k of out [K, P] = sum_i weights[k, i] E_i: one matrix product."""
        return torch.mm(as_weights(weights, self.matrix.dtype, self.matrix.device), self.matrix,
                        out=out)


@dataclass
class TernaryStack:
    """N ComPEFT experts kept sparse: every kept position (in the layout's flat order) and its
    sign, all experts concatenated, cut into segments that share one scale (one per expert,
    or one per expert and tensor with per-tensor scales). At density k this holds 5k bytes per
    parameter and expert (int32 position + int8 sign) against 4 for a dense fp32 row."""
    layout: Layout
    positions: torch.Tensor      # int32 (int64 past 2**31 parameters)
    signs: torch.Tensor          # int8, +1/-1
    segment_expert: np.ndarray   # [S]: which expert a segment belongs to
    segment_scale: np.ndarray    # [S]
    segment_start: list[int]     # [S + 1]: segment s is positions[start[s]:start[s+1]]
    head = 0  # every entry depends on w

    @property
    def numel(self) -> int:
        return self.layout.numel

    def mix(self, w, out: torch.Tensor | None = None) -> torch.Tensor:
        coef = (np.asarray(w.cpu() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
                [self.segment_expert] * self.segment_scale).tolist()
        in_place = out is not None and out.dtype == torch.float32  # else accumulate in float32
        acc = out.zero_() if in_place else torch.zeros(self.numel, device=self.signs.device)
        # One thread: scatter threads of their own saved 7 ms of a 23 ms mix at the flan-t5-large
        # shape but left the next forward 200 ms slower (their idle OpenMP teams compete).
        # int8 sign * scalar makes float32 in one pass, far cheaper than expanding a scale per
        # kept value; segments are few (one per expert when its scale is global).
        starts = self.segment_start
        for c, lo, hi in zip(coef, starts[:-1], starts[1:]):
            acc.index_add_(0, self.positions[lo:hi], self.signs[lo:hi] * c)
        return acc if out is None or in_place else out.copy_(acc)

    def mix_many(self, weights, out: torch.Tensor) -> torch.Tensor:
        """Row k of out [K, P] = mix(weights[k]): one sparse scatter per candidate."""
        for w, row in zip(weights, out):
            self.mix(w, out=row)
        return out


@dataclass
class ProductStack:
    """N experts as one LoRA of rank N*r: per module A = [A_1; ...; A_N] (stacked along the
    rank, fixed) and B = [w_1 B_1, ..., w_N B_N], so that s*B*A = sum_i w_i s B_i A_i exactly,
    s the adapter's scaling (an expert's own s_i / s is folded into its B_i). The layout
    (product_order) puts every A first: that head of the flat vector is written once (`bind`),
    and a step only rescales the B blocks, one broadcast multiply."""
    layout: Layout
    fixed: torch.Tensor   # [head] float32: every module's A, in the layout's order
    blocks: torch.Tensor  # [rows, N, r] float32: the B tensors' rows at w = 1, split per expert
    bound: torch.Tensor | None = None  # the buffer whose head `bind` wrote

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def head(self) -> int:
        return self.fixed.numel()

    def bind(self, out: torch.Tensor) -> None:
        """Write the fixed A tensors into `out` (the model's buffer) once for all steps."""
        out[:self.head] = self.fixed
        self.bound = out

    def mix(self, w, out: torch.Tensor | None = None) -> torch.Tensor:
        """The flat rank-N*r LoRA for w, into `out` if given (its A head too, unless `out` is
        the bound buffer)."""
        if out is None:
            out = torch.empty(self.numel, dtype=torch.float32, device=self.blocks.device)
        if out is not self.bound:
            out[:self.head] = self.fixed
        w = as_weights(w, torch.float32, self.blocks.device).view(1, -1, 1)
        torch.mul(self.blocks, w, out=out[self.head:].view(self.blocks.shape))
        return out

    def mix_many(self, weights, out: torch.Tensor) -> torch.Tensor:
        """Row k of out [K, P - head] = the B part of mix(weights[k]) (A is `fixed`, shared)."""
        w = as_weights(weights, torch.float32, self.blocks.device)
        torch.mul(self.blocks, w[:, None, :, None], out=out.view(len(w), *self.blocks.shape))
        return out


Stack = DenseStack | TernaryStack | ProductStack


# --- the model's LoRA parameters ---------------------------------------------------------------
def saved_key(param_name: str) -> str:
    """A model parameter name as PEFT saves it: `...q.lora_A.default.weight` -> `...q.lora_A.weight`."""
    return param_name.replace(f".{ADAPTER_NAME}.", ".").removesuffix(f".{ADAPTER_NAME}")


def lora_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters()
            if any(f"{m}.{ADAPTER_NAME}" in n for m in ("lora_A", "lora_B", "lora_embedding_A",
                                                        "lora_embedding_B"))]


def layout_of(params: list[tuple[str, torch.nn.Parameter]]) -> Layout:
    shapes = [tuple(p.shape) for _, p in params]
    offsets = np.cumsum([0] + [math.prod(s) for s in shapes]).tolist()
    return Layout([saved_key(n) for n, _ in params], shapes, offsets)


def bind_flat(params: list[tuple[str, torch.nn.Parameter]], layout: Layout, device) -> torch.Tensor:
    """Make the LoRA parameters views into one flat buffer and return the buffer."""
    dtypes = {p.dtype for _, p in params}
    if len(dtypes) != 1:
        raise ValueError(f"LoRA parameters have mixed dtypes {dtypes}")
    flat = torch.zeros(layout.numel, dtype=dtypes.pop(), device=device)
    for (_, p), shape, off in zip(params, layout.shapes, layout.offsets):
        p.data = flat[off:off + math.prod(shape)].view(shape)
    return flat


# --- building a stack --------------------------------------------------------------------------
def check_tensors(handle: ExpertHandle, found: dict[str, tuple], layout: Layout) -> None:
    missing = [k for k in layout.keys if k not in found]
    if missing:
        raise ValueError(f"{handle.name}: lacks {len(missing)} LoRA tensors the model has, "
                         f"e.g. {missing[0]}")
    for key, shape in zip(layout.keys, layout.shapes):
        if tuple(found[key]) != shape:
            raise ValueError(f"{handle.name}: {key} has shape {tuple(found[key])}, the model "
                             f"expects {shape}")


def warn_ignored(ignored: set[str]) -> None:
    if ignored:
        warnings.warn(f"ignoring {len(ignored)} non-LoRA tensors of the experts (e.g. "
                      f"{sorted(ignored)[0]}); only lora_A/lora_B are composed", stacklevel=4)


def write_expert(out: torch.Tensor, handle: ExpertHandle, tensors: dict[str, torch.Tensor],
                 layout: Layout) -> None:
    """Write one expert's LoRA tensors into a flat vector in the layout's order (in `out`'s
    dtype and device): a stack's row, or the model's own LoRA buffer. A missing tensor or a
    wrong shape names the expert."""
    check_tensors(handle, {k: v.shape for k, v in tensors.items()}, layout)
    for key, off in zip(layout.keys, layout.offsets):
        value = tensors[key]
        out[off:off + value.numel()] = value.reshape(-1).to(out.device, out.dtype)


def check_finite(handle, tensors) -> None:
    """One NaN in one expert would make every mix NaN, the zero composition included (0 * NaN):
    refuse it by name."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(f"{handle.name}: holds NaN or infinite values and cannot be composed; "
                         "recompress or retrain it, or leave it out")


def build_stack(handles: list[ExpertHandle], layout: Layout, device) -> tuple[Stack, float]:
    """Decode each expert once into the stack; returns it and the seconds decoding took.
    ComPEFT experts (all of them) stay sparse in a TernaryStack; otherwise E is dense."""
    if all(h.ternary is not None for h in handles):
        return _build_ternary_stack(handles, layout, device)
    matrix = torch.empty(len(handles), layout.numel, dtype=torch.float32, device=device)
    decode = 0.0
    ignored: set[str] = set()
    for row, handle in enumerate(handles):
        start = time.perf_counter()
        tensors = handle.load()
        decode += time.perf_counter() - start
        write_expert(matrix[row], handle, tensors, layout)
        check_finite(handle, [tensors[k] for k in layout.keys])
        ignored |= set(tensors) - set(layout.keys)
    warn_ignored(ignored)
    return DenseStack(layout, matrix), decode


def _build_ternary_stack(handles, layout: Layout, device) -> tuple[TernaryStack, float]:
    where = dict(zip(layout.keys, layout.offsets))
    index_dtype = torch.int32 if layout.numel < 2 ** 31 else torch.int64
    positions, signs, seg_expert, seg_scale, seg_length = [], [], [], [], []
    decode, ignored = 0.0, set()
    for row, handle in enumerate(handles):
        start = time.perf_counter()
        t = handle.ternary()
        decode += time.perf_counter() - start
        check_tensors(handle, dict(zip(t.names, t.shapes)), layout)
        check_finite(handle, [t.scales])
        ignored |= set(t.names) - set(layout.keys)
        own = t.offsets()  # the expert's own flat order: tensor j spans own[j]:own[j+1]
        bounds = np.searchsorted(t.positions, own)
        scales = t.tensor_scales()
        column = {name: j for j, name in enumerate(t.names)}
        for name in layout.keys:  # the stack's order, so that positions ascend within a segment
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
    warn_ignored(ignored)
    cat = lambda xs, dtype: (torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)).to(device)
    stack = TernaryStack(
        layout, positions=cat(positions, index_dtype), signs=cat(signs, torch.int8),
        segment_expert=np.array(seg_expert, dtype=np.int64), segment_scale=np.array(seg_scale),
        segment_start=np.cumsum([0] + seg_length).tolist())
    return stack, decode


# --- the product mix ---------------------------------------------------------------------------
def is_lora_b(key: str) -> bool:
    return ".lora_B." in key or "lora_embedding_B" in key


def product_order(params: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.nn.Parameter]]:
    """The LoRA parameters with every A before every B (each in the model's order): the
    ProductStack's layout, whose B tensors are one contiguous tail."""
    return sorted(params, key=lambda p: is_lora_b(saved_key(p[0])))


def build_product_stack(handles: list[ExpertHandle], layout: Layout, scaling: float, device
                        ) -> tuple[ProductStack, float]:
    """Each expert decoded densely once (dense, ComPEFT or ERE) into the ProductStack of the
    rank-N*r `layout` (product_order) whose LoRA scaling is `scaling`; returns it and the
    seconds decoding took."""
    n = len(handles)
    a_keys = [k for k in layout.keys if not is_lora_b(k)]
    if layout.keys[:len(a_keys)] != a_keys:
        raise ValueError("the product layout holds every LoRA A before every B (product_order)")
    b_keys = layout.keys[len(a_keys):]
    shapes = dict(zip(layout.keys, layout.shapes))
    # an expert's own shapes: the rank split N ways (dim 0 of A, dim 1 of B)
    own = {k: ((shapes[k][0] // n, *shapes[k][1:]) if k in a_keys else
               (shapes[k][0], shapes[k][1] // n, *shapes[k][2:])) for k in layout.keys}
    expert_layout = Layout(layout.keys, [own[k] for k in layout.keys], layout.offsets)
    blocks = {k: [] for k in b_keys}
    fixed = torch.empty(layout.offsets[len(a_keys)], dtype=torch.float32, device=device)
    decode, ignored = 0.0, set()
    for i, handle in enumerate(handles):
        start = time.perf_counter()
        tensors = handle.load()
        decode += time.perf_counter() - start
        check_tensors(handle, {k: v.shape for k, v in tensors.items()}, expert_layout)
        check_finite(handle, [tensors[k] for k in layout.keys])
        ignored |= set(tensors) - set(layout.keys)
        ratio = lora_scaling(handle.config) / scaling  # 1 when the experts agree
        for key, off in zip(a_keys, layout.offsets):
            size = math.prod(own[key])
            fixed[off + i * size:off + (i + 1) * size] = tensors[key].reshape(-1)
        for key in b_keys:
            blocks[key].append(tensors[key].to(device, torch.float32).reshape(shapes[key][0], -1)
                               * ratio)
    warn_ignored(ignored)
    widths = {blocks[k][0].shape[1] for k in b_keys}
    if len(widths) != 1:
        raise ValueError("mix='product' needs every LoRA module of the same rank; use "
                         "mix='factors'")
    rows = torch.cat([torch.stack(blocks[k], dim=1) for k in b_keys])  # [rows, N, r]
    return ProductStack(layout, fixed, rows), decode
