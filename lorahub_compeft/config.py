"""Every default of the package, once. The Python API, the command line and the runner's methods
read these dataclasses (the command line builds its flags from their fields: default and help
text included), so the same verb gives the same result from each. The paper's settings are
presets beside them, one argument or flag away. docs/defaults.md says how each default was
chosen (always on validation seeds).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def option(default, help: str, **metadata):
    """A dataclass field with its help text (what `--help` prints for its flag)."""
    return field(default=default, metadata={"help": help, **metadata})


def replace(config, **changes):
    """`config` with `changes`; an unknown name is an error that lists the known ones."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for {type(config).__name__}; "
                        f"it takes {', '.join(sorted(known))}")
    return dataclasses.replace(config, **changes)


def choices(options: type, name: str) -> tuple:
    """The values field `name` of an options class allows (its metadata's `choices`)."""
    return next(f for f in dataclasses.fields(options) if f.name == name).metadata["choices"]


# --- compression: one options class per shipped codec (codecs/ registers them) ------------------
# A field's metadata may also say how the command line reads it: `short` (a one-letter flag),
# `choices`, `parse` (text -> value; ValueError names the problem) and, for a bool, `off` (the
# flag that turns it off, and its help) instead of --no-<name>.
def number_or_auto(text: str) -> float | str:
    """'auto' or a positive number (how --alpha is read)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"alpha must be a positive number or 'auto', got {text!r}") from None
    if not value > 0:
        raise ValueError(f"alpha must be positive, got {text}")
    return value


@dataclass(frozen=True)
class CompeftOptions:
    """ComPEFT: keep the top-k of the task vector, each kept value as sign * alpha * sigma."""
    density: float = option(0.5, "fraction of task-vector entries kept, in (0, 1]; chosen on the "
                                 "zoo's validation seeds (the paper's: 0.1)", short="-k")
    alpha: float | str = option("auto", "kept entries become sign * alpha * std(tau); 'auto' picks "
                                        "the alpha whose LoRA products B·A are closest to the "
                                        "original's (the paper's: 1)", parse=number_or_auto)
    per_tensor: bool = option(True, "top-k and scale within each tensor",
                              off=("--global", "top-k and one scale over the whole adapter (the "
                                               "paper's code)"))
    encoding: str = option("golomb", "golomb: near the entropy bound; bitmask: two bit masks",
                           choices=("golomb", "bitmask"))


PAPER_COMPEFT = CompeftOptions(density=0.1, alpha=1.0, per_tensor=False)


@dataclass(frozen=True)
class EreOptions:
    """ERE: low-rank factors of each LoRA module's B·A, ranks allocated under one byte budget."""
    budget_bits: float = option(1.0, "payload budget in bits per LoRA value")
    quant_bits: int = option(4, "bits per stored factor value (4, 8 or 16), one scale per row; at "
                                "equal bytes 4-bit factors beat 8-bit on the zoo",
                             choices=(4, 8, 16))


# --- composition ---------------------------------------------------------------------------------
# N when experts are chosen by few-shot loss (chosen on the zoo's validation seeds), and
# LoraHub's N for its random draw.
DEFAULT_N = {"loss": 3, "random": 20}
