"""What a codec is, and the registry of them.

A codec turns a task vector (an adapter's tensors minus their init, or a full fine-tuning
residual) into payload tensors and header fields, checks a header before anything is
allocated, and decodes a payload again. The store (store/) writes and reads the file around
it and never asks which codec it holds; the command line builds each codec's flags from its
`Options` dataclass (config.py). A new codec is a subclass registered with `register`:

    @register
    class Toy(Codec):
        name, Options, header_fields = "toy", ToyOptions, ("toy",)
        def compress(self, tau, config, options): ...   # -> payload, header fields, weights
        def decode(self, payload, meta): ...            # -> weights
        def summary(self, meta): ...                    # -> the index's fields
        def setting_text(self, summary): ...

Errors: bad input to compression is a CompressionError; a header or payload a codec cannot
trust is a CodecError, which the store turns into an ExpertFileError naming the file.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from lorahub_compeft.config import replace
from lorahub_compeft.io.adapters import task_vector_init
from lorahub_compeft.io.residuals import is_residual

DEFAULT_CODEC = "compeft"  # the package's codec; files whose header names no codec are ComPEFT
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32,
                                                       torch.float64)}


class CompressionError(ValueError):
    """Bad input to compression: the message says what is wrong and how to fix it."""


class CodecError(ValueError):
    """A header or payload that a codec cannot trust (the store adds the file's name)."""


class Codec:
    """One way to code a task vector. Class attributes say what it is; methods do the work."""
    name: ClassVar[str]                         # the header's "codec"
    Options: ClassVar[type]                     # its options dataclass, defaults and help text
    presets: ClassVar[dict[str, Any]] = {}      # named Options, e.g. {"paper": PAPER_COMPEFT}
    header_fields: ClassVar[tuple[str, ...]] = ()  # required beside the common ones
    sparse: ClassVar[bool] = False              # decodes to a TernaryVector composition can use
    tagged: ClassVar[bool] = True               # writes "codec": name into the header
    size_option: ClassVar[str] = "density"      # the option that sets how much is kept

    def options(self, options=None, **overrides):
        """Its Options: the given ones (else the defaults) with `overrides`; an unknown name
        or another codec's Options is an error."""
        if options is None:
            options = self.Options()
        elif not isinstance(options, self.Options):
            raise TypeError(f"codec {self.name!r} takes {self.Options.__name__}, got "
                            f"{type(options).__name__}")
        return replace(options, **overrides)

    def init(self, name: str, tensor: torch.Tensor, config: dict) -> float | None:
        """What the tensor's task vector is measured from, or None: carried as is. An
        adapter's LoRA and (IA)³ tensors from their init; a residual is all task vector."""
        return 0.0 if is_residual(config) else task_vector_init(name)

    def compress(self, tau: dict[str, torch.Tensor], config: dict, options
                 ) -> tuple[dict, dict, Any]:
        """(payload tensors, header fields, weights): the weights are what `decode` gives."""
        raise NotImplementedError

    def validate(self, meta: dict, stored: dict[str, list[int]], numel: int, limit: int) -> None:
        """Raise CodecError for a header field decoding would trust. `stored`: the payload's
        tensor shapes; numel: the coded tensors' values; limit: the most a file this size may
        claim. The common fields (tensors, carried, sizes, config) are checked already."""

    def decode(self, payload: dict[str, torch.Tensor], meta: dict) -> Any:
        """The weights from a payload whose digest matched; CodecError if they cannot be."""
        raise NotImplementedError

    def task_vector(self, weights, meta: dict) -> dict[str, torch.Tensor]:
        """tau-hat per coded tensor, in each tensor's dtype (weights: a dict of tensors here)."""
        dtypes = {e["name"]: DTYPES[e["dtype"]] for e in meta["tensors"]}
        return {k: v.to(dtypes[k]) for k, v in weights.items()}

    def summary(self, meta: dict) -> dict:
        """Its fields for the library's index and listings, from the header alone."""
        return {}

    def check_summary(self, entry: dict) -> str | None:
        """What is wrong with an index entry's codec fields, or None."""
        return None

    def setting_text(self, summary: dict) -> str:
        """Its setting in a few characters, for listings."""
        return ", ".join(f"{f.name}={summary.get(f.name)}" for f in dataclasses.fields(self.Options))

    def inspect_lines(self, meta: dict) -> list[tuple[str, str]]:
        """(label, text) lines `inspect` prints about the coding."""
        return [("payload", f"{bits_per_value(meta):.3f} bits/param")]

    def same_setting(self, entry: dict, options) -> bool:
        """Whether an index entry was made with `options` (then adding it again changes
        nothing); False compresses again."""
        return False


def is_count(value, minimum: int = 0) -> bool:
    """An int (not a bool) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def coded_numel(meta: dict) -> int:
    return sum(math.prod(e["shape"]) for e in meta["tensors"])


def bits_per_value(meta: dict) -> float:
    """The coded payload (carried tensors left out) in bits per coded value."""
    sizes = meta["sizes"]
    return 8 * (sizes["payload_bytes"] - sizes["carried_bytes"]) / coded_numel(meta)


def check_task_vector(tensors: dict[str, torch.Tensor]) -> None:
    if not tensors:
        raise CompressionError("the adapter has no task-vector tensors (LoRA A/B or (IA)^3 "
                               "vectors) to compress")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CompressionError(f"tensor {name} has dtype {t.dtype}; only floating-point "
                                   "adapter tensors can be compressed")
        if t.numel() == 0:
            raise CompressionError(f"tensor {name} is empty")
        low, high = torch.aminmax(t.detach())  # NaN propagates; 6x faster than isfinite().all()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise CompressionError(f"tensor {name} holds NaN or Inf; the adapter is damaged "
                                   "(retrain or re-export it)")


def check_dtypes(payload: dict[str, torch.Tensor], wanted: dict[str, torch.dtype]) -> None:
    """CodecError unless each named payload tensor is there with its dtype (a forger may change
    them; the digest then matches)."""
    for key, dtype in wanted.items():
        found = payload[key].dtype if key in payload else None
        if found != dtype:
            raise CodecError(f"payload {key} is {str(found or 'missing').removeprefix('torch.')}, "
                             f"not {str(dtype).removeprefix('torch.')}; the file is damaged")


def check_fits(meta: dict, peaks: dict[str, float]) -> None:
    """CodecError unless init + the largest |tau-hat| of each coded tensor (`peaks`) is finite in
    the tensor's own dtype (a NaN peak fails too)."""
    for entry in meta["tensors"]:
        if not abs(entry["init"]) + peaks[entry["name"]] <= torch.finfo(DTYPES[entry["dtype"]]).max:
            raise CodecError(f"tensor {entry['name']} decodes to NaN, or its init and values "
                             f"overflow {entry['dtype']}; the file is damaged")


def human_bytes(n: float) -> str:
    """A size as listings print it: 812 B, 27.70 KB, 1.20 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


# --- the registry ----------------------------------------------------------------------------
REGISTRY: dict[str, Codec] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Register a codec class (one instance of it serves every file)."""
    if not getattr(cls, "name", None) or cls.name in REGISTRY and type(REGISTRY[cls.name]) is not cls:
        raise ValueError(f"codec name {getattr(cls, 'name', None)!r} is empty or taken")
    REGISTRY[cls.name] = cls()
    return cls


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Codec:
    if name not in REGISTRY:
        raise ValueError(f"codec must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def codec_of(meta: dict) -> Codec:
    """The codec of a header or an index entry."""
    return get(meta.get("codec", DEFAULT_CODEC))


def choose(codec: str | None, options) -> Codec:
    """The codec named, else the one whose Options `options` are, else the default."""
    if codec is not None or options is None:
        return get(codec or DEFAULT_CODEC)
    for unit in REGISTRY.values():
        if isinstance(options, unit.Options):
            return unit
    raise TypeError(f"options must be a codec's Options ({', '.join(u.Options.__name__ for u in REGISTRY.values())}), "
                    f"got {type(options).__name__} {options!r}; e.g. CompeftOptions(density=0.1) "
                    "or density=0.1")
