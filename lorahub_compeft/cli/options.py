"""Options and parsers several commands share: compression, selection, precision, threads,
seeds, expert lists; and how sizes are printed."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import textwrap

from lorahub_compeft.codecs import base as codecs
from lorahub_compeft.codecs.base import human_bytes


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32", "int8"), default="auto",
                   help="how the search runs the base model; auto (default): bf16 where the "
                        "device computes it natively, else on a CPU int8 copies of the linear "
                        "layers of models of t5-small's size or more, else fp32. int8 forces "
                        "int8 scoring (CPU). The composed adapter is fp32 and answers come from "
                        "the unquantized model whatever is chosen")


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch's intra-op threads (default: one per core, but only the idle "
                        "cores when other processes keep the machine busy)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def idle_cores() -> int | None:
    """The cores other processes leave idle (1-minute load average), when fewer than torch's
    threads; None when the machine is quiet or its load is unknown. Threads that wait for busy
    cores cost far more than they give: on a busy 2-core machine `demo` on one task took 346 s
    with 2 threads and 43 s with 1."""
    import os

    import torch
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    idle = max(1, round(cores - load))
    return idle if idle < torch.get_num_threads() else None


def apply_threads(args) -> None:
    """Set torch's threads from --threads (else from idle_cores), here and, through
    OMP_NUM_THREADS, in the worker processes a command starts."""
    import os

    import torch
    threads = getattr(args, "threads", None) or idle_cores()
    if threads is None:
        return
    logging.getLogger(__name__).info("using %d torch thread(s)", threads)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


class WholeWordsHelp(argparse.HelpFormatter):
    """Help wrapped at spaces only, so that names such as select-compeft stay whole."""
    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


# --- compression: each codec's flags, built from its Options dataclass (config.py) -------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value) -> str:
    """An option's value as help texts print it (1.0 as 1)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parser(parse):
    """An argparse type from a parse function whose ValueError names the problem."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return convert


def add_codec_flags(p, unit: codecs.Codec, fields=None, note=None, title: str | None = None) -> None:
    """One flag per field of the codec's Options (or of `fields`), with the field's help.
    Every flag defaults to None, "not given"; the help shows the default a field takes then,
    the dataclass's, or `note(field)` (e.g. each method's own)."""
    group = p.add_argument_group(title or f"--codec {unit.name}", unit.Options.__doc__)
    for f in dataclasses.fields(unit.Options):
        if fields is not None and f.name not in fields:
            continue
        if f.type in (bool, "bool"):
            _add_switch(group, f, note)
            continue
        meta = f.metadata
        flags = [_flag(f.name)] + ([meta["short"]] if "short" in meta else [])
        kind = _parser(meta["parse"]) if "parse" in meta else type(f.default)
        default = note(f) if note else f"default {shown(f.default)}"
        group.add_argument(*flags, dest=f.name, type=kind, choices=meta.get("choices"),
                           help=f"{meta['help']} ({default})")


def _add_switch(group, f, note) -> None:
    """A bool field: --name / --no-name, or the pair its metadata names (--per-tensor /
    --global); "the default" marks the flag that is one, unless a note says otherwise."""
    off_flag, off_help = f.metadata.get("off", (f"--no-{f.name.replace('_', '-')}", "the opposite"))
    on_help = f.metadata["help"]
    if note:
        on_help += f" ({note(f)})"
    elif f.default:
        on_help += " (the default)"
    else:
        off_help += " (the default)"
    both = group.add_mutually_exclusive_group()
    both.add_argument(_flag(f.name), dest=f.name, action="store_const", const=True, help=on_help)
    both.add_argument(off_flag, dest=f.name, action="store_const", const=False, help=off_help)


def add_compression_options(p: argparse.ArgumentParser) -> None:
    """--codec (the registered ones), --preset, every codec's flags, --revision."""
    presets = {name: f"{unit.name} " + ", ".join(f"{k}={shown(v)}" for k, v in
                                                 dataclasses.asdict(options).items())
               for unit in codecs.REGISTRY.values() for name, options in unit.presets.items()}
    p.add_argument("--codec", choices=codecs.names(), default=codecs.DEFAULT_CODEC,
                   help=f"how the task vector is coded (default {codecs.DEFAULT_CODEC}); each "
                        "codec takes only its own flags, listed below")
    p.add_argument("--preset", choices=sorted(presets) or None,
                   help="start from a named setting of the codec instead of its defaults ("
                        + "; ".join(f"{k}: {v}" for k, v in sorted(presets.items()))
                        + "); flags given beside it change single fields")
    taken = set()  # a field two codecs share is one flag
    for unit in codecs.REGISTRY.values():
        fields = [f.name for f in dataclasses.fields(unit.Options) if f.name not in taken]
        add_codec_flags(p, unit, fields)
        taken.update(fields)
    p.add_argument("--revision", help="Hub revision when the source is a Hub id")


def compression_options(args) -> tuple[str, object]:
    """The codec --codec names and its Options: --preset's (else the defaults) with the flags
    given. A flag of another codec is refused, naming the codec it belongs to."""
    unit = codecs.get(args.codec)
    own = {f.name for f in dataclasses.fields(unit.Options)}
    given = {}
    for other in codecs.REGISTRY.values():
        for f in dataclasses.fields(other.Options):
            value = getattr(args, f.name, None)
            if value is None:
                continue
            if f.name not in own:
                raise ValueError(f"{_flag(f.name)} is an option of --codec {other.name}, not of "
                                 f"--codec {unit.name} (it takes "
                                 f"{', '.join(_flag(n) for n in sorted(own)) or 'no flags'})")
            given[f.name] = value
    preset = None
    if args.preset:
        if args.preset not in unit.presets:
            raise ValueError(f"--preset {args.preset} is not a setting of --codec {unit.name} "
                             f"(its presets: {', '.join(unit.presets) or 'none'})")
        preset = unit.presets[args.preset]
    return unit.name, unit.options(preset, **given)


def add_select_options(p: argparse.ArgumentParser) -> None:
    """--select and -n, their defaults and help from config.ComposeConfig."""
    from lorahub_compeft.config import SELECT_MODES, ComposeConfig
    p.add_argument("--select", choices=SELECT_MODES, default=ComposeConfig().select,
                   help=f"{ComposeConfig.help('select')} (default {ComposeConfig().select})")
    p.add_argument("-n", "--n-experts", type=positive_int, default=ComposeConfig().n_experts,
                   help=ComposeConfig.help("n_experts"))


def parse_seeds(text: str) -> list[int]:
    """'1-5' or '1,3,7' -> a list of seeds."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            lo, hi = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seeds {text!r}; use e.g. 1-5 or 1,2,3") from None
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad seed range {part!r}: it holds no seed; write "
                                             f"it low-high, e.g. {hi}-{lo}")
        seeds += range(lo, hi + 1)
    return seeds


def size_line(file_bytes: int, sizes: dict) -> str:
    """The whole file's size and ratio (what a user stores and downloads); the coded payload
    as a detail."""
    return (f"{human_bytes(file_bytes)}, {sizes['fp16_bytes'] / file_bytes:.1f}x smaller than fp16 "
            f"({human_bytes(sizes['fp16_bytes'])}), {sizes['fp32_bytes'] / file_bytes:.1f}x than fp32 "
            f"(coded payload {human_bytes(sizes['payload_bytes'])}, "
            f"{sizes['fp16_bytes'] / sizes['payload_bytes']:.1f}x)")


def setting_text(summary: dict) -> str:
    """A codec's parameters in a few characters, for listings."""
    return codecs.codec_of(summary).setting_text(summary)
