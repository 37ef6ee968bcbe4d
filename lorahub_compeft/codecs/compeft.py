"""ComPEFT (Yadav et al., 2023): a task vector as a sparse ternary vector times one scale.

Given the task vector tau of an adapter (fine-tuned minus init, tensor by tensor), keep the
top-k fraction of entries by |tau|, keep their signs, and give every kept entry the same
magnitude alpha * std(tau). Selection is over the whole adapter by default, as the paper's code
does, or per tensor with one scale per tensor. `magnitude="stc"` uses the mean kept |tau|
instead (Sparse Ternary Compression, an ablation); `prune` keeps the original values.
`alpha="auto"` picks alpha from the adapter itself, no data (see `auto_alpha`).

The tensor math comes first; then the codec (`ComPEFT`): what a file's payload and header
hold (bits in coding.py), how they are checked and decoded. The file itself lives in store/.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lorahub_compeft.codecs import coding
from lorahub_compeft.codecs.base import (DTYPES, Codec, CodecError, CompressionError,
                                         bits_per_value, check_dtypes, check_fits, check_task_vector,
                                         human_bytes, is_count, register)
from lorahub_compeft.config import PAPER_COMPEFT, CompeftOptions, choices
from lorahub_compeft.io.adapters import is_finite_number

AUTO = "auto"
log = logging.getLogger(__name__)
SCALE_DTYPE = torch.float32  # holds fp16/bf16/fp32 scales exactly
PAPER_DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
PAPER_ALPHAS = (0.5, 1, 2, 3, 4, 5, 6, 8, 10)


@dataclass
class TernaryVector:
    """Sparse ternary form of a task vector over tensors laid end to end in `names` order.

    positions: sorted flat indices of kept entries (int64); signs: +1/-1 (int8);
    scales: one value (global) or one per tensor, already rounded to each tensor's dtype.
    """
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    positions: np.ndarray
    signs: np.ndarray
    scales: torch.Tensor
    sigma: float
    alpha: float = 1.0  # the alpha the scales were made with (the chosen one for "auto")

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def density(self) -> float:
        return len(self.positions) / max(self.numel, 1)

    def offsets(self) -> np.ndarray:
        sizes = [math.prod(s) for s in self.shapes]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def tensor_scales(self) -> torch.Tensor:
        """The scale of each tensor, in float32 (one per tensor even in global mode)."""
        if len(self.scales) == 1:
            return self.scales.expand(len(self.names)).clone()
        return self.scales

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Dense tau-hat per tensor: every entry is exactly sign * scale (in its dtype) or 0."""
        offsets = self.offsets()
        values = torch.from_numpy(self.signs).to(torch.float32)
        if len(self.scales) == 1:
            values *= self.scales[0]
        else:  # each kept value takes the scale of the tensor it falls in
            counts = np.diff(np.searchsorted(self.positions, offsets))
            values *= self.scales.repeat_interleave(torch.from_numpy(counts))
        # One scatter into one buffer, then a copy per tensor: much faster than a scatter per
        # tensor. Scales are rounded to each dtype, so float32 -> dtype is exact.
        flat = torch.zeros(int(offsets[-1]), dtype=torch.float32)
        flat[torch.from_numpy(self.positions)] = values
        return {name: flat[int(offsets[i]):int(offsets[i + 1])].view(shape).to(dtype, copy=True)
                for i, (name, shape, dtype) in enumerate(zip(self.names, self.shapes, self.dtypes))}


def _check_arguments(density: float, alpha: float | str) -> None:
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise CompressionError(f"density must be in (0, 1], got {density!r}; "
                               "e.g. 0.1 keeps the 10% largest entries")
    if alpha == AUTO:
        return
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise CompressionError(f"alpha must be a positive number or 'auto', got {alpha!r}")


def _std(values: torch.Tensor) -> float:
    """Sample standard deviation in float64 (0 for a single value)."""
    return float(values.double().std()) if values.numel() > 1 else 0.0


def _topk_flat(flat_abs: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, round(density * flat_abs.numel()))
    if keep >= flat_abs.numel():
        return torch.arange(flat_abs.numel())
    return torch.topk(flat_abs, keep, sorted=False).indices


def sparsify(tensors: dict[str, torch.Tensor], density: float, alpha: float | str = 1.0,
             per_tensor: bool = False, magnitude: str = "compeft") -> TernaryVector:
    """ComPEFT-compress a task vector given as {name: tau}. `magnitude` is compeft or stc;
    alpha="auto" chooses alpha by `auto_alpha` (the chosen value is in the result's .alpha)."""
    _check_arguments(density, alpha)
    check_task_vector(tensors)
    if magnitude not in ("compeft", "stc"):
        raise CompressionError(f"magnitude must be 'compeft' or 'stc', got {magnitude!r}")
    if alpha == AUTO:
        if magnitude != "compeft":
            raise CompressionError("alpha='auto' scales ComPEFT's magnitude; use magnitude='compeft'")
        base = sparsify(tensors, density, 1.0, per_tensor)
        return sparsify_rescaled(base, tensors, auto_alpha(tensors, base), per_tensor)
    names = list(tensors)
    flats = [tensors[n].detach().reshape(-1).float() for n in names]
    sizes = [f.numel() for f in flats]
    flat = torch.cat(flats)
    sigma = _std(flat)

    if per_tensor:
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        kept = [_topk_flat(f.abs(), density) + int(s) for f, s in zip(flats, starts)]
        groups = [(f, k - int(s)) for f, k, s in zip(flats, kept, starts)]
        index = torch.cat(kept)
    else:
        index = _topk_flat(flat.abs(), density)
        groups = [(flat, index)]
    index = torch.sort(index).values

    def scale_of(values: torch.Tensor, kept: torch.Tensor, name: str) -> float:
        mean_kept = float(values[kept].abs().double().mean())
        if magnitude == "stc":
            return mean_kept
        scale = alpha * _std(values)
        if scale == 0 and mean_kept > 0:  # a constant or one-element tensor: sigma is 0
            log.warning("%s: sigma is 0 (constant or single value), so alpha * sigma would "
                        "erase it; scaling it by its kept values' mean magnitude instead", name)
            return mean_kept
        return scale

    group_names = names if per_tensor else ["the task vector"]
    raw_scales = [scale_of(v, k, n) for (v, k), n in zip(groups, group_names)]
    dtypes = [tensors[n].dtype for n in names]
    signs = torch.where(flat[index] >= 0, 1, -1).to(torch.int8)
    return TernaryVector(names=names, shapes=[tuple(tensors[n].shape) for n in names],
                         dtypes=dtypes, positions=index.numpy().astype(np.int64),
                         signs=signs.numpy(), scales=_rounded_scales(raw_scales, dtypes, per_tensor),
                         sigma=sigma, alpha=float(alpha) if magnitude == "compeft" else 1.0)


def lora_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA module in `names` (lora_A/lora_B, lora_embedding_A/_B)."""
    present = set(names)
    pairs = []
    for name in names:
        for a, b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
            if f".{a}." in f".{name}." and name.replace(a, b) in present:
                pairs.append((name, name.replace(a, b)))
    return pairs


def auto_alpha(tensors: dict[str, torch.Tensor], base: TernaryVector) -> float:
    """The alpha that makes the compressed adapter closest to the original, from the adapter
    alone (no data), given the selection and signs of `base` (made with alpha = 1).

    A LoRA module adds B·A to its weight. Compressed with alpha, A-hat = alpha·a·S_A and
    B-hat = alpha·b·S_B (S: the ternary signs, a, b: the alpha=1 scales, shared or per
    tensor), so B-hat·A-hat = alpha²·Q with Q = a·b·S_B·S_A. Over all modules,
    sum_m ||P_m - alpha²·Q_m||²_F (P = B·A) is least at
        alpha² = sum_m <P_m, Q_m> / sum_m ||Q_m||²_F.
    Adapters without LoRA pairs ((IA)³ vectors) add tau itself, linear in alpha:
        alpha = <tau, T> / ||T||²  with T = the alpha=1 ternary vector.
    Falls back to 1 if the fit is not positive (signs that disagree with the products)."""
    dense = base.to_tensors()
    pairs = lora_pairs(base.names)
    num = den = 0.0
    if pairs:
        for a_name, b_name in pairs:
            p = _product(tensors[b_name].double(), tensors[a_name].double(), b_name)
            q = _product(dense[b_name].double(), dense[a_name].double(), b_name)
            num += float((p * q).sum())
            den += float((q * q).sum())
        fit = math.sqrt(num / den) if num > 0 and den > 0 else 1.0
    else:
        for name in base.names:
            t, q = tensors[name].double(), dense[name].double()
            num += float((t * q).sum())
            den += float((q * q).sum())
        fit = num / den if num > 0 and den > 0 else 1.0
    return fit


def _product(b: torch.Tensor, a: torch.Tensor, b_name: str) -> torch.Tensor:
    """What a LoRA module adds, up to its constant scaling: B·A (embedding LoRA stores A as
    [r, num_embeddings] and B as [dim, r], so the same product)."""
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


def _rounded_scales(values: list[float], dtypes: list[torch.dtype], per_tensor: bool) -> torch.Tensor:
    """Round each scale to the dtype it will be applied in, so decoding is bit-exact."""
    if not per_tensor:  # one shared scale: round it to the narrowest dtype present
        dtypes = [min(dtypes, key=lambda d: torch.finfo(d).bits)]
    scales = torch.tensor([torch.tensor(v, dtype=d).item() for v, d in zip(values, dtypes)],
                          dtype=SCALE_DTYPE)
    bad = [(v, d) for v, d, s in zip(values, dtypes, scales) if not math.isfinite(s)]
    if bad:
        value, dtype = bad[0]
        raise CompressionError(f"the scale alpha * sigma = {value:.4g} does not fit in "
                               f"{str(dtype).removeprefix('torch.')}; lower alpha")
    return scales


def prune(tensors: dict[str, torch.Tensor], density: float, per_tensor: bool = False
          ) -> dict[str, torch.Tensor]:
    """Plain magnitude pruning (an ablation): keep the top-k entries with their own values."""
    ternary = sparsify(tensors, density, 1.0, per_tensor)
    flat = torch.cat([tensors[n].detach().reshape(-1) for n in ternary.names])
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.from_numpy(ternary.positions)] = True
    kept = torch.where(mask, flat, torch.zeros((), dtype=flat.dtype))
    offsets = ternary.offsets()
    return {n: kept[offsets[i]:offsets[i + 1]].view(tensors[n].shape).to(tensors[n].dtype)
            for i, n in enumerate(ternary.names)}


@dataclass
class Calibration:
    best_density: float
    best_alpha: float
    best_score: float
    grid: dict[tuple[float, float], float]


def calibrate(tensors: dict[str, torch.Tensor], metric: Callable[[dict[str, torch.Tensor]], float],
              densities=PAPER_DENSITIES, alphas=PAPER_ALPHAS, per_tensor: bool = False,
              progress: bool = False) -> Calibration:
    """Sweep (density, alpha) and score each compressed task vector with `metric` (higher is
    better), as ComPEFT picks k and alpha on validation data. The top-k selection is done once
    per density; alpha only rescales."""
    from tqdm.auto import tqdm
    grid: dict[tuple[float, float], float] = {}
    cells = [(k, a) for k in densities for a in alphas]
    for k, a in cells:
        _check_arguments(k, a)
    bar = tqdm(total=len(cells), desc="calibrate", disable=not progress)
    for k in densities:
        base = sparsify(tensors, k, 1.0, per_tensor)
        for a in alphas:
            scaled = sparsify_rescaled(base, tensors, a, per_tensor)
            grid[(k, a)] = float(metric(scaled.to_tensors()))
            bar.update()
    bar.close()
    (k, a), score = max(grid.items(), key=lambda kv: kv[1])
    return Calibration(best_density=k, best_alpha=a, best_score=score, grid=grid)


def sparsify_rescaled(base: TernaryVector, tensors: dict[str, torch.Tensor], alpha: float,
                      per_tensor: bool) -> TernaryVector:
    """The same selection and signs as `base` (made with alpha=1), scaled by another alpha."""
    stds = [_std(tensors[n]) for n in base.names] if per_tensor else [base.sigma]
    scales = _rounded_scales([alpha * s for s in stds], base.dtypes, per_tensor)
    return TernaryVector(base.names, base.shapes, base.dtypes, base.positions, base.signs,
                         scales, base.sigma, float(alpha))


# --- the codec ---------------------------------------------------------------------------------
ENCODINGS = choices(CompeftOptions, "encoding")
SELECTIONS = ("global", "per_tensor")


@register
class ComPEFT(Codec):
    """Payload: stream.<name> (the kept positions and signs, coding.py) and `scales` (float32,
    one, or one per tensor). Header: encoding, selection, density, alpha (the chosen number
    for "auto"), sigma, numel and the coding parameters."""
    name, Options, presets, sparse = "compeft", CompeftOptions, {"paper": PAPER_COMPEFT}, True
    header_fields = ("encoding", "selection", "density", "alpha", "sigma", "numel", "coding")
    tagged = False  # ComPEFT headers name no codec, as every file before there were others

    def compress(self, tau, config, options: CompeftOptions):
        if options.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {options.encoding!r}")
        ternary = sparsify(tau, options.density, options.alpha, options.per_tensor)
        streams, params = coding.encode_ternary(ternary.positions, ternary.signs, ternary.numel,
                                                options.encoding)
        payload = {f"stream.{k}": v for k, v in streams.items()}
        payload["scales"] = ternary.scales.clone()
        fields = {"encoding": options.encoding,
                  "selection": "per_tensor" if options.per_tensor else "global",
                  "density": options.density, "alpha": ternary.alpha, "sigma": ternary.sigma,
                  "numel": ternary.numel, "coding": params}
        return payload, fields, ternary

    def validate(self, meta, stored, numel, limit):
        if meta["encoding"] not in ENCODINGS:
            raise CodecError(f"header field encoding is {meta['encoding']!r}, not one of {ENCODINGS}")
        if meta["selection"] not in SELECTIONS:
            raise CodecError(f"header field selection is {meta['selection']!r}, not one of "
                             f"{SELECTIONS}")
        for key, low in (("density", 0), ("alpha", 0), ("sigma", -1)):
            if not is_finite_number(meta[key]) or meta[key] <= low or (key == "density" and meta[key] > 1):
                raise CodecError(f"header field {key} is {meta[key]!r}, not a finite number in range")
        claimed, tensors = meta["numel"], meta["tensors"]
        if is_count(claimed) and claimed > limit:
            raise CodecError(f"header claims {claimed} values, more than a file of this size can "
                             f"hold ({limit}); the file is damaged or forged")
        if not is_count(claimed, 1) or numel != claimed:
            raise CodecError(f"tensor shapes add up to {numel} values, header field numel says "
                             f"{claimed!r}")
        params = meta["coding"]
        count = params.get("count") if isinstance(params, dict) else None
        if not is_count(count) or count > claimed:
            raise CodecError(f"header field coding has a bad kept count {count!r}")
        if meta["encoding"] == "golomb" and not is_count(params.get("m"), 1):
            raise CodecError(f"header field coding has a bad Golomb parameter {params.get('m')!r}")
        # The kept count must match the density: a forged size must also forge the count.
        density, slack = meta["density"], len(tensors) + 1
        if abs(count - density * claimed) > slack:
            raise CodecError(f"kept count {count} does not match density {density} of {claimed} "
                             "values")
        n_scales = len(tensors) if meta["selection"] == "per_tensor" else 1
        if stored.get("scales") not in ([n_scales], [1]):
            raise CodecError(f"the scales tensor must hold {n_scales} value(s), has shape "
                             f"{stored.get('scales')}")

    def decode(self, payload, meta) -> TernaryVector:
        check_dtypes(payload, {"scales": torch.float32, **{k: torch.uint8 for k in payload
                                                          if k.startswith("stream.")}})
        streams = {k.removeprefix("stream."): v.numpy() for k, v in payload.items()
                   if k.startswith("stream.")}
        try:
            positions, signs = coding.decode_ternary(streams, meta["coding"], meta["numel"],
                                                     meta["encoding"])
        except coding.CodingError as err:
            raise CodecError(str(err)) from None
        entries = meta["tensors"]
        scales = payload["scales"]
        if scales.dim() != 1 or scales.numel() not in (1, len(entries)):
            raise CodecError(f"scales must be float32 with 1 or {len(entries)} values")
        if not torch.isfinite(scales).all():
            raise CodecError("a scale is NaN or infinite; the file is damaged")
        # init + sign * scale must be finite in each tensor's own dtype
        check_fits(meta, {e["name"]: abs(float(s)) for e, s in zip(entries, scales.expand(len(entries)))})
        return TernaryVector(names=[e["name"] for e in entries],
                             shapes=[tuple(e["shape"]) for e in entries],
                             dtypes=[DTYPES[e["dtype"]] for e in entries],
                             positions=positions, signs=signs, scales=scales, sigma=meta["sigma"])

    def task_vector(self, weights: TernaryVector, meta):
        return weights.to_tensors()

    def summary(self, meta):
        return {k: meta[k] for k in ("encoding", "selection", "density", "alpha")}

    def check_summary(self, entry):
        for key in ("density", "alpha"):
            if not is_finite_number(entry.get(key)):
                return f"its {key} is damaged"
        return None

    def setting_text(self, summary):
        tensor = " pt" if summary.get("selection") == "per_tensor" else ""
        return f"k={summary['density']:g} a={summary['alpha']:g}{tensor}"

    def inspect_lines(self, meta):
        sizes = meta["sizes"]
        bound = coding.ternary_entropy_bits(meta["density"], meta["numel"]) / 8
        stream = sizes["payload_bytes"] - sizes["carried_bytes"]
        return [("compression", f"density {meta['density']}, alpha {meta['alpha']}, sigma "
                                f"{meta['sigma']:.4g}, {meta['selection']} selection, "
                                f"{meta['encoding']} encoding"),
                ("payload", f"{bits_per_value(meta):.3f} bits/param; entropy bound "
                            f"{human_bytes(bound)}, {100 * (stream / bound - 1):+.1f}%")]

    def same_setting(self, entry, options: CompeftOptions):
        wanted = {"density": options.density, "encoding": options.encoding,
                  "selection": "per_tensor" if options.per_tensor else "global"}
        if options.alpha != AUTO:  # "auto" is stored as the number it chose
            wanted["alpha"] = options.alpha
        return all(entry.get(k) == v for k, v in wanted.items())
