"""ERE (Efficient Residual Encoding): a weight residual stored as quantized low-rank factors.

Per matrix residual ΔW (for a LoRA module the product s·B·A with s = lora_alpha/r, never A and B
apart, which are only defined up to B·G, G⁻¹·A):
  1. SVD, ΔW = U·diag(σ)·Vᵀ. A LoRA product has rank ≤ r, so it is taken through QR of B and
     Aᵀ and the SVD of an r×r core, never of the out×in matrix.
  2. One byte budget for all matrices: component j of matrix m keeps energy σ_j² (the squared
     Frobenius error it removes) and costs (out_m + in_m)·bits/8 bytes plus two scales. σ falls
     within a matrix, so choosing greedily the best energy per byte is one global sort.
  3. A kept component is two rows, √σ·u and √σ·v, each quantized symmetrically with one
     float32 scale (8 or 4 bits a value; 16 = plain fp16, the scale then 1).
Decoding gives the factors back: for LoRA B' = [√σ_j u_j] and A' = [√σ_j v_j] / √s, zero-padded
to r, so that s·B'·A' ≈ ΔW and PEFT and the composer take them with the expert's own config; for
a full-model residual the dense product.

The tensor math comes first, then the codec (`ERE`); the file itself lives in store/.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorahub_compeft.codecs.base import (Codec, CodecError, bits_per_value, check_dtypes,
                                         check_fits, register)
from lorahub_compeft.config import EreOptions, choices
from lorahub_compeft.io.adapters import is_finite_number
from lorahub_compeft.io.residuals import is_residual

QUANT_BITS = choices(EreOptions, "quant_bits")
SCALE_BYTES = 4         # one float32 scale per stored row
_LORA_PAIRS = ((".lora_A.", ".lora_B."), ("lora_embedding_A", "lora_embedding_B"))


class EREError(ValueError):
    """Bad input to the ERE codec; the message says what is wrong and how to fix it."""


@dataclass
class Spectrum:
    """One residual matrix as U·diag(s)·Vᵀ (U: out×q, s: q, V: in×q), in float64."""
    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.v.shape[0]


def spectrum_of_product(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> Spectrum:
    """SVD of scale·B·A (B: out×r, A: r×in) through QR of B and Aᵀ: O((out+in)·r²)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    core_u, s, core_vh = torch.linalg.svd(scale * rb @ ra.T)
    return Spectrum(qb @ core_u, s, qa @ core_vh.T)


def spectrum_of_matrix(w: torch.Tensor) -> Spectrum:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return Spectrum(u, s, vh.T)


def row_bytes(length: int, bits: int) -> int:
    return math.ceil(length * bits / 8)


def component_bytes(shape: tuple[int, int], bits: int) -> int:
    """Bytes one rank-1 component of an out×in matrix takes: two quantized rows, two scales."""
    return row_bytes(shape[0], bits) + row_bytes(shape[1], bits) + 2 * SCALE_BYTES


def allocate_ranks(spectra: list[Spectrum], budget_bytes: float, bits: int) -> list[int]:
    """Ranks per matrix maximizing the kept energy Σσ² within budget_bytes, greedily by energy
    per byte. Within a matrix σ only falls, so the candidates sorted by energy per byte come in
    each matrix's own order; a component that no longer fits closes its matrix."""
    candidates = []
    for m, spec in enumerate(spectra):
        cost = component_bytes(spec.shape, bits)
        energy = (spec.s ** 2).tolist()
        candidates += [(-e / cost, m, j, cost) for j, e in enumerate(energy) if e > 0]
    candidates.sort()
    ranks, closed, left = [0] * len(spectra), set(), budget_bytes
    for _, m, j, cost in candidates:
        if m in closed or j != ranks[m]:
            continue
        if cost > left:
            closed.add(m)
            continue
        ranks[m] += 1
        left -= cost
    return ranks


# --- quantization: symmetric, one scale per row -------------------------------------------------
def quantize_rows(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [k, n] -> (codes uint8 [k, row_bytes(n, bits)], scales float32 [k])."""
    rows = rows.float()
    k, n = rows.shape
    if bits == 16:
        return rows.half().contiguous().view(torch.uint8).reshape(k, 2 * n), torch.ones(k)
    qmax = 2 ** (bits - 1) - 1
    scales = rows.abs().amax(dim=1) / qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / scales[:, None]).clamp(-qmax, qmax).to(torch.int16)
    if bits == 8:
        return q.to(torch.int8).view(torch.uint8), scales
    nibbles = (q + 8).to(torch.uint8)  # 1..15
    if n % 2:
        nibbles = torch.cat([nibbles, torch.full((k, 1), 8, dtype=torch.uint8)], dim=1)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    k = codes.shape[0]
    if k == 0:
        return torch.zeros(0, n)
    if bits == 16:
        return codes.contiguous().view(torch.float16).reshape(k, n).float()
    if bits == 8:
        q = codes.view(torch.int8).float()
    else:
        q = torch.stack([codes & 0x0F, codes >> 4], dim=2).reshape(k, -1)[:, :n].float() - 8
    return q * scales[:, None]


# --- encoding a list of matrices -----------------------------------------------------------------
def encode(spectra: list[Spectrum], ranks: list[int], bits: int) -> dict[str, torch.Tensor]:
    """The payload: all kept u rows' codes end to end, the same for v, and [Σk, 2] scales."""
    if bits not in QUANT_BITS:
        raise EREError(f"quantization bits must be one of {QUANT_BITS}, got {bits!r}")
    u_codes, v_codes, scales = [], [], []
    for spec, k in zip(spectra, ranks):
        if k == 0:
            continue
        root = spec.s[:k].sqrt()
        cu, su = quantize_rows((spec.u[:, :k] * root).T, bits)
        cv, sv = quantize_rows((spec.v[:, :k] * root).T, bits)
        u_codes.append(cu.reshape(-1))
        v_codes.append(cv.reshape(-1))
        scales.append(torch.stack([su, sv], dim=1))
    cat = lambda parts, like: torch.cat(parts) if parts else like
    return {"ere.u": cat(u_codes, torch.zeros(0, dtype=torch.uint8)),
            "ere.v": cat(v_codes, torch.zeros(0, dtype=torch.uint8)),
            "ere.scales": cat(scales, torch.zeros(0, 2))}


def expected_lengths(shapes: list[tuple[int, int]], ranks: list[int], bits: int) -> dict[str, int]:
    """The payload tensors' lengths that shapes and ranks imply (checked before decoding)."""
    return {"ere.u": sum(k * row_bytes(o, bits) for (o, _), k in zip(shapes, ranks)),
            "ere.v": sum(k * row_bytes(i, bits) for (_, i), k in zip(shapes, ranks)),
            "ere.scales": sum(ranks)}


def decode(payload: dict[str, torch.Tensor], shapes: list[tuple[int, int]], ranks: list[int],
           bits: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per matrix (U' [out, k], V' [k, in]) in float32 with U'·V' ≈ ΔW."""
    out, pu, pv, ps = [], 0, 0, 0
    for (rows, cols), k in zip(shapes, ranks):
        nu, nv = k * row_bytes(rows, bits), k * row_bytes(cols, bits)
        scales = payload["ere.scales"][ps:ps + k]
        u = dequantize_rows(payload["ere.u"][pu:pu + nu].reshape(k, nu // max(k, 1)),
                            scales[:, 0], rows, bits)
        v = dequantize_rows(payload["ere.v"][pv:pv + nv].reshape(k, nv // max(k, 1)),
                            scales[:, 1], cols, bits)
        out.append((u.T.contiguous(), v))
        pu, pv, ps = pu + nu, pv + nv, ps + k
    return out


# --- LoRA adapters -------------------------------------------------------------------------------
def lora_modules(names: list[str]) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA module, in the order of the A tensors in `names`."""
    present, pairs, paired = set(names), [], set()
    for name in names:
        for a_mark, b_mark in _LORA_PAIRS:
            if a_mark in name:
                partner = name.replace(a_mark, b_mark)
                if partner not in present:
                    raise EREError(f"{name} has no matching {partner}; ERE needs both LoRA "
                                   "factors of every module")
                pairs.append((name, partner))
                paired |= {name, partner}
    unpaired = [n for n in names if n not in paired]
    if unpaired:
        raise EREError(f"ERE compresses LoRA factors only, but the adapter has {unpaired[0]}; "
                       "use --codec compeft for other adapter types")
    if not pairs:
        raise EREError("the adapter has no LoRA modules; use --codec compeft")
    return pairs


def lora_scaling(config: dict) -> float:
    """PEFT's scaling of B·A: lora_alpha / r (or / √r with rsLoRA)."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise EREError("adapters with rank_pattern or alpha_pattern (per-module scaling) are not "
                       "supported by ERE; use --codec compeft")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise EREError(f"adapter_config needs r and lora_alpha for ERE, got r={r!r}, "
                       f"lora_alpha={alpha!r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def budget_bytes_for(numel: int, bits_per_param: float, bits: int) -> float:
    if bits not in QUANT_BITS:
        raise EREError(f"quantization bits must be one of {QUANT_BITS}, got {bits!r}")
    if not (isinstance(bits_per_param, (int, float)) and 0 < bits_per_param < 64):
        raise EREError(f"the ERE budget must be a number of bits per parameter in (0, 64), got "
                       f"{bits_per_param!r}; e.g. --budget-bits 1 stores 1 bit per LoRA value")
    return numel * bits_per_param / 8


def compress_lora(tau: dict[str, torch.Tensor], config: dict, bits_per_param: float, bits: int
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """ERE payload and header fields for LoRA factors {name: tensor}; the budget counts the
    payload (codes and scales) against the adapter's LoRA values."""
    pairs = lora_modules(list(tau))
    scale = lora_scaling(config)
    budget = budget_bytes_for(sum(t.numel() for t in tau.values()), bits_per_param, bits)
    spectra = []
    for a_name, b_name in pairs:
        a, b = tau[a_name], tau[b_name]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise EREError(f"{a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} do not form "
                           "a product B·A")
        spectra.append(spectrum_of_product(b, a, scale))
    ranks = allocate_ranks(spectra, budget, bits)
    info = {"bits": bits, "budget_bits": bits_per_param, "scaling": scale, "ranks": ranks,
            "energy_kept": _energy_kept(spectra, ranks)}
    return encode(spectra, ranks, bits), info


def _energy_kept(spectra: list[Spectrum], ranks: list[int]) -> float:
    total = sum(float((s.s ** 2).sum()) for s in spectra)
    kept = sum(float((s.s[:k] ** 2).sum()) for s, k in zip(spectra, ranks))
    return kept / total if total > 0 else 1.0


def decode_lora(payload: dict[str, torch.Tensor], names: list[str], shapes: dict[str, tuple],
                info: dict) -> dict[str, torch.Tensor]:
    """LoRA factors {name: float32 tensor} whose scaled product is the coded residual: rank k
    per module, zero-padded to the module's r."""
    pairs = lora_modules(names)
    dims = [(shapes[b][0], shapes[a][1]) for a, b in pairs]
    root = math.sqrt(info["scaling"])
    out = {}
    for (a_name, b_name), (u, v), k in zip(pairs, decode(payload, dims, info["ranks"],
                                                          info["bits"]), info["ranks"]):
        a = torch.zeros(shapes[a_name])
        b = torch.zeros(shapes[b_name])
        a[:k], b[:, :k] = v / root, u / root
        out[a_name], out[b_name] = a, b
    return out


def check_lora_header(names: list[str], shapes: dict[str, tuple], info: dict,
                      stored: dict[str, list[int]]) -> str | None:
    """What is wrong with a LoRA expert's ERE header against the payload's stored shapes, or
    None."""
    try:
        pairs = lora_modules(names)
    except EREError as err:
        return str(err)
    dims = []
    for (a, b) in pairs:
        sa, sb = shapes[a], shapes[b]
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            return f"{a} and {b} do not form a product B·A"
        dims.append((sb[0], sa[1]))
    limits = [shapes[a][0] for a, _ in pairs]
    return _check_header(dims, limits, info, stored)


def check_matrices_header(shapes: list[tuple], info: dict, stored: dict[str, list[int]]
                          ) -> str | None:
    """The same for a full-model residual: every coded tensor is a matrix of rank ≤ min dim."""
    if any(len(s) != 2 for s in shapes):
        return "ERE residual tensors must be matrices"
    return _check_header([tuple(s) for s in shapes], [min(s) for s in shapes], info, stored)


def _check_header(dims: list[tuple[int, int]], limits: list[int], info: dict,
                  stored: dict[str, list[int]]) -> str | None:
    """Every size a decoder allocates is bounded by the payload: the ranks within their limits,
    the payload's lengths exactly what dims and ranks imply, and no matrix wider than the
    longest row stored (zero-rank matrices have no rows of their own)."""
    if not isinstance(info, dict) or info.get("bits") not in QUANT_BITS:
        return f"unknown ERE quantization {info.get('bits') if isinstance(info, dict) else info!r}"
    for key, low, high in (("scaling", 0, math.inf), ("budget_bits", 0, math.inf),
                           ("energy_kept", -1e-9, 1 + 1e-9)):
        if not is_finite_number(info.get(key)) or not low < info[key] <= high:
            return f"ERE {key} is {info.get(key)!r}, not a number in range"
    ranks = info.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != len(dims):
        return f"ERE ranks must list one rank per coded matrix ({len(dims)})"
    for k, limit in zip(ranks, limits):
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= limit:
            return f"rank {k!r} is not in [0, {limit}]"
    lengths = expected_lengths(dims, ranks, info["bits"])
    for key, n in lengths.items():
        want = [n, 2] if key == "ere.scales" else [n]
        if stored.get(key) != want:
            return f"payload {key} has shape {stored.get(key)}, the header implies {want}"
    longest = max([d for (o, i), k in zip(dims, ranks) if k for d in (o, i)], default=0)
    widest = max((max(o, i) for o, i in dims), default=0)
    if widest > max(longest, 1 << 16):
        return f"a matrix of width {widest} is larger than any stored factor"
    return None


# --- full-model residuals ------------------------------------------------------------------------
def compress_matrices(tau: dict[str, torch.Tensor], bits_per_param: float, bits: int
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """ERE payload and header fields for residual matrices {name: out×in} (θ_ft − θ_base)."""
    budget = budget_bytes_for(sum(t.numel() for t in tau.values()), bits_per_param, bits)
    spectra = [spectrum_of_matrix(t) for t in tau.values()]
    ranks = allocate_ranks(spectra, budget, bits)
    info = {"bits": bits, "budget_bits": bits_per_param, "scaling": 1.0, "ranks": ranks,
            "energy_kept": _energy_kept(spectra, ranks)}
    return encode(spectra, ranks, bits), info


def decode_matrices(payload: dict[str, torch.Tensor], names: list[str],
                    shapes: dict[str, tuple], info: dict) -> dict[str, torch.Tensor]:
    factors = decode(payload, [shapes[n] for n in names], info["ranks"], info["bits"])
    return {n: u @ v for n, (u, v) in zip(names, factors)}


# --- the codec ---------------------------------------------------------------------------------
def _encoding(bits: int) -> str:
    return f"int{bits}" if bits < 16 else "fp16"


@register
class ERE(Codec):
    """Payload: ere.u, ere.v (the kept factor rows' codes end to end) and ere.scales. Header
    field `ere`: bits, budget_bits, scaling, ranks (one per module or matrix), energy_kept."""
    name, Options, header_fields, size_option = "ere", EreOptions, ("ere",), "budget_bits"

    def init(self, name, tensor, config):
        if is_residual(config) and tensor.dim() != 2:  # a residual's layer norms and biases
            return None
        return super().init(name, tensor, config)

    def compress(self, tau, config, options: EreOptions):
        if is_residual(config):
            payload, info = compress_matrices(tau, options.budget_bits, options.quant_bits)
            factors = decode_matrices(payload, list(tau), {k: t.shape for k, t in tau.items()}, info)
        else:
            payload, info = compress_lora(tau, config, options.budget_bits, options.quant_bits)
            factors = decode_lora(payload, list(tau), {k: t.shape for k, t in tau.items()}, info)
        return payload, {"ere": info}, factors

    def validate(self, meta, stored, numel, limit):
        entries, info = meta["tensors"], meta["ere"]
        if not isinstance(info, dict):
            raise CodecError("header field ere must be an object")
        if is_residual(meta["adapter_config"]):
            problem = check_matrices_header([e["shape"] for e in entries], info, stored)
        else:
            problem = check_lora_header([e["name"] for e in entries],
                                        {e["name"]: tuple(e["shape"]) for e in entries}, info, stored)
        if problem:
            raise CodecError(problem)

    def decode(self, payload, meta):
        check_dtypes(payload, {"ere.u": torch.uint8, "ere.v": torch.uint8, "ere.scales": torch.float32})
        decode = decode_matrices if is_residual(meta["adapter_config"]) else decode_lora
        factors = decode(payload, [e["name"] for e in meta["tensors"]],
                         {e["name"]: tuple(e["shape"]) for e in meta["tensors"]}, meta["ere"])
        check_fits(meta, {k: float(t.abs().max()) if t.numel() else 0.0 for k, t in factors.items()})
        return factors

    def summary(self, meta):
        info = meta["ere"]
        return {"encoding": _encoding(info["bits"]), "selection": "rank",
                "budget_bits": info["budget_bits"], "mean_rank": sum(info["ranks"]) / len(info["ranks"])}

    def check_summary(self, entry):  # the fields a listing prints
        bad = [k for k in ("budget_bits", "mean_rank") if not is_finite_number(entry.get(k))]
        bad += [] if isinstance(entry.get("encoding"), str) else ["encoding"]
        return f"its {bad[0]} is damaged" if bad else None

    def setting_text(self, summary):
        return f"{summary['budget_bits']:g}b/p {summary['encoding']} r~{summary['mean_rank']:.1f}"

    def inspect_lines(self, meta):
        info, ranks = meta["ere"], meta["ere"]["ranks"]
        what = "each matrix" if is_residual(meta["adapter_config"]) else "each module's B·A"
        return [("compression", f"ere: low-rank factors of {what}, {_encoding(info['bits'])} with "
                                f"a scale per row, budget {info['budget_bits']:g} bits/param"),
                ("ranks", f"{min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.2f}) over "
                          f"{len(ranks)} modules, {100 * info['energy_kept']:.1f}% of the energy kept"),
                ("payload", f"{bits_per_value(meta):.3f} bits/param")]

    def same_setting(self, entry, options: EreOptions):
        return entry.get("budget_bits") == options.budget_bits and \
            entry.get("encoding") == _encoding(options.quant_bits)
