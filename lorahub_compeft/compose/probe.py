"""dtype "auto": the precision that scores fastest, measured on this machine, model and batch.

Only the swapped linear layers differ between precisions (precision.py), so the probe times
them, on the inputs they really get, at the search's start (LoRA at zero, w = 0):
1. one forward of the model itself gives the reference loss and, through hooks, every
   swappable layer's input; the layers fall into a few kinds (weight shape, rows);
2. in fp32 and in each precision the device runs natively (bf16 where native_bf16; int8 on a
   CPU with an int8 engine), copies of up to PROBE_LAYERS layers of each kind are timed on
   those inputs (repeated K times for K candidates per forward): one warm-up call, then
   PROBE_REPEATS rounds, the median kept. A precision's forward is predicted as the
   reference's, less its layers' time in fp32, plus their time in that precision;
3. the precision predicted fastest, if at least PROBE_MARGIN faster than the model's own, is
   checked: its loss at w = 0, one forward through its copies, must be within PROBE_RTOL of
   the reference's (else the next is checked; the model's own always qualifies).
The choice is cached per (device, CPU flags, torch and its threads, model shape, batch shape),
in the process and in the user's cache dir (cache_file()), so a second composition of that
shape measures nothing. A cache entry that does not validate is ignored with a warning and
measured again. The loss at w = 0 measured in the chosen precision is the search's zero loss
(one forward the probe saves the search).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from lorahub_compeft.io.files import atomic_write_text, read_json
from lorahub_compeft.compose.precision import (LinearCopies, Precision, cpu_flags, dtype_name,
                                               low_copy, lower_precisions, swappable)

log = logging.getLogger(__name__)

# The loss at w = 0 through a precision's copies may differ from the model's own by at most
# this fraction of it: several times the rounding of one value (2^-8 apart at 1 in bf16, 2^-7
# for int8's 7-bit inputs), so rounding passes and a precision that breaks the model does not.
PROBE_RTOL = 0.02
PROBE_MARGIN = 0.10   # a lower precision must be predicted this much faster to be worth its error
PROBE_REPEATS = 3     # timed rounds per kind of layer, after one warm-up call
PROBE_LAYERS = 2      # layers of each kind timed (different weights: not one layer kept in cache)
PROBE_FILE = Path("lorahub-compeft") / "precision.json"
CACHE_VERSION = 1
_memory: dict[str, dict] = {}  # this process's choices, by key


def cache_file() -> Path:
    """$LORAHUB_COMPEFT_CACHE/precision.json where set, else PROBE_FILE in the user's cache."""
    if os.environ.get("LORAHUB_COMPEFT_CACHE"):
        return Path(os.environ["LORAHUB_COMPEFT_CACHE"]) / PROBE_FILE.name
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / PROBE_FILE


def probe_key(model, batches: list[dict], per_forward: int, device: torch.device) -> dict:
    """What the measurement depends on, as JSON."""
    shapes = [[n, list(p.shape), dtype_name(p.dtype)] for n, p in model.named_parameters()]
    digest = hashlib.sha256(json.dumps([type(model.get_base_model()).__name__, shapes])
                            .encode()).hexdigest()[:16]
    if device.type == "cuda":
        where = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        where = f"{device.type}:" + hashlib.sha256(" ".join(sorted(cpu_flags())).encode()
                                                   ).hexdigest()[:16]
    return {"device": where, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": digest, "k": per_forward,
            "batches": [{k: list(v.shape) for k, v in sorted(b.items())} for b in batches]}


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def choose(precision: Precision, model, loss_at: Callable[[LinearCopies | None], float],
           batches: list[dict], per_forward: int, device: torch.device
           ) -> tuple[Precision, LinearCopies | None]:
    """The precision to score in and its copies (None: the model itself). A forced precision
    is taken as given; "auto" is measured or read from the cache. loss_at(copies): the loss
    at w = 0 with those copies swapped in."""
    if not precision.auto:
        copies = LinearCopies(model, precision.low) if precision.low else None
        return precision, copies
    start = time.perf_counter()
    own = dtype_name(next(model.parameters()).dtype)
    lows = lower_precisions(device, model) if swappable(model) else []
    if not lows:
        return Precision(precision.dtype, auto=True, measured={
            "chosen": own, "cached": False, "seconds": 0.0, "candidates": {}}), None
    key = probe_key(model, batches, per_forward, device)
    record = cached(key, [own, *lows])
    from_cache, copies, making = record is not None, None, 0.0
    if record is None:
        record, copies, making = measure(model, loss_at, lows, own, per_forward,
                                         device.type == "cuda")
        remember(key, record)
    # Making the kept copies is setup, as for a forced precision: not the probe's cost.
    measured = dict(record, cached=from_cache, seconds=time.perf_counter() - start - making)
    low = None if record["chosen"] == own else record["chosen"]
    if low is not None and copies is None:
        copies = LinearCopies(model, low)  # from the cache: copies made, nothing measured
    return Precision(precision.dtype, low, auto=True, measured=measured), copies


def measure(model, loss_at, lows: list[str], own: str, k: int, cuda: bool
            ) -> tuple[dict, LinearCopies | None, float]:
    """The probe's steps 1-3 (module docstring): the record to cache, the chosen copies and
    the seconds making them took."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kinds: dict[tuple, list] = {}  # (out, in, rows) -> [calls per forward, [(layer, input)]]

    def capture(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        kind = kinds.setdefault((module.out_features, module.in_features, len(x)), [0, []])
        kind[0] += 1
        if len(kind[1]) < PROBE_LAYERS:
            kind[1].append((module, x.repeat(k, 1)))

    handles = [layer.register_forward_pre_hook(capture) for _, _, layer in swappable(model)]
    try:
        reference_seconds, reference = _timed(lambda: loss_at(None), sync)
    finally:
        for handle in handles:
            handle.remove()
    linear = {name: _time_layers(kinds, None if name == own else name, sync)
              for name in (own, *lows)}
    candidates = {name: {"linear_ms": 1e3 * seconds,
                         "forward_ms": 1e3 * (reference_seconds - linear[own] + seconds)}
                  for name, seconds in linear.items()}
    candidates[own].update(loss=reference, checked_forward_ms=1e3 * reference_seconds)
    chosen, copies, making = own, None, 0.0
    for low in sorted(lows, key=linear.get):
        if candidates[low]["forward_ms"] > (1 - PROBE_MARGIN) * 1e3 * reference_seconds:
            break
        making, trial = _timed(lambda: LinearCopies(model, low), lambda: None)
        seconds, loss = _timed(lambda: loss_at(trial), sync)
        candidates[low].update(loss=loss, checked_forward_ms=1e3 * seconds)
        if agrees(loss, reference):
            chosen, copies = low, trial
            break
        making = 0.0  # dropped: making them was the probe's cost
    log.info("dtype auto: %s (predicted ms per forward: %s)", chosen,
             ", ".join(f"{n} {c['forward_ms']:.1f}" for n, c in candidates.items()))
    return {"chosen": chosen, "candidates": candidates, "tolerance": PROBE_RTOL,
            "margin": PROBE_MARGIN}, copies, making


def agrees(loss: float, reference: float) -> bool:
    return math.isfinite(loss) and abs(loss - reference) <= PROBE_RTOL * abs(reference)


def _timed(fn, sync) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


@torch.no_grad()
def _time_layers(kinds: dict[tuple, list], low: str | None, sync) -> float:
    """Seconds per forward in the swapped layers, in precision `low` (None: as they are)."""
    total = 0.0
    for count, samples in kinds.values():
        layers = [(layer if low is None else low_copy(layer, low), x) for layer, x in samples]
        layers[0][0](layers[0][1])  # warm-up
        sync()
        times = [_timed(lambda: layer(x), sync)[0]
                 for _ in range(PROBE_REPEATS) for layer, x in layers]
        total += count * statistics.median(times)
    return total


# --- the cache -----------------------------------------------------------------------------------
def cached(key: dict, names: list[str]) -> dict | None:
    """The choice recorded for `key` (this process's, else the cache file's) if it validates
    against the precisions this machine can run now (`names`); else None, with a warning when
    an entry was there but damaged."""
    ident = key_id(key)
    if ident in _memory:
        return _memory[ident]
    entries = _read_entries()
    if ident not in entries:
        return None
    problem = _invalid(entries[ident], key, names)
    if problem:
        warnings.warn(f"ignoring the precision cache's entry for this model in {cache_file()}: "
                      f"{problem}; measuring again", stacklevel=2)
        return None
    _memory[ident] = {k: entries[ident][k] for k in ("chosen", "candidates", "tolerance", "margin")}
    return _memory[ident]


def remember(key: dict, record: dict) -> None:
    """Keep `record` for `key` in the process and in the cache file (written atomically; a
    cache that cannot be written costs the next process a measurement, nothing else)."""
    ident = key_id(key)
    _memory[ident] = record
    entries = _read_entries()
    entries[ident] = dict(record, key=key)
    try:
        atomic_write_text(cache_file(), json.dumps({"version": CACHE_VERSION,
                                                    "entries": entries}, indent=1) + "\n")
    except OSError as err:
        log.warning("could not write the precision cache %s (%s)", cache_file(), err)


def _read_entries() -> dict:
    """The cache file's entries; {} when it is missing, and (with a warning) when it is damaged:
    it is then rewritten whole at the next measurement."""
    path = cache_file()
    if not path.exists():
        return {}
    try:
        data = read_json(path, limit=4 << 20)
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring the damaged precision cache {path} ({err}); it will be "
                      "rewritten", stacklevel=3)
        return {}
    if (not isinstance(data, dict) or data.get("version") != CACHE_VERSION
            or not isinstance(data.get("entries"), dict)):
        warnings.warn(f"ignoring the precision cache {path}: not a version-{CACHE_VERSION} "
                      "cache; it will be rewritten", stacklevel=3)
        return {}
    return data["entries"]


def _invalid(entry, key: dict, names: list[str]) -> str | None:
    """Why a cache entry cannot be trusted, or None."""
    if not isinstance(entry, dict):
        return "not an object"
    if entry.get("key") != key:
        return "recorded for another key"
    candidates = entry.get("candidates")
    if not isinstance(candidates, dict) or set(candidates) != set(names):
        return f"measured {sorted(candidates) if isinstance(candidates, dict) else candidates!r}, " \
               f"not this machine's precisions {sorted(names)}"
    if entry.get("chosen") not in names:
        return f"chose {entry.get('chosen')!r}"
    for name, c in candidates.items():
        numbers = [c.get(f) for f in ("linear_ms", "forward_ms")] if isinstance(c, dict) else [None]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            return f"{name}: timings are not finite numbers"
    for field, value in (("tolerance", PROBE_RTOL), ("margin", PROBE_MARGIN)):
        if entry.get(field) != value:
            return f"{field} {entry.get(field)!r} is not this version's {value}"
    return None
