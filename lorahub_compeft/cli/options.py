"""Options and parsers several commands share: compression, selection, precision, threads,
seeds and every numeric flag's range; and how sizes are printed."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import textwrap

from lorahub_compeft.codecs import base as codecs
from lorahub_compeft.codecs.base import human_bytes
from lorahub_compeft.io import threads
from lorahub_compeft.io.threads import choose_threads


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32", "int8"), default="auto",
                   help="how the search scores candidates; auto (default): the fastest of "
                        "fp32, bf16 (where the device has it natively) and int8 (CPU) measured "
                        "on the first batch whose loss agrees with fp32's, cached per machine "
                        "and shape. The composed adapter is fp32 and answers come from the "
                        "unquantized model whatever is chosen")


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=thread_count, metavar="N",
                   help="torch's intra-op threads (default: one per core, but only the idle "
                        "cores when other processes keep the machine busy, shared by --workers)")


# --- numbers: every numeric flag is read by one of these, so that a value out of range is
# refused, naming the range, before anything runs or is stored ------------------------------
MAX_RANK = 65_536  # of an adapter written (merge, compose --rank); no model's layer is wider
MAX_NEW_TOKENS = 4096  # of an answer generated


def bounded_int(least: int, most: int | None, what: str = ""):
    """An argparse type: an integer in [least, most] (no cap when most is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least or most is not None and value > most:
            kind = "a positive integer" if least == 1 else f"an integer of at least {least}"
            cap = "" if most is None else f" of at most {most:,}"
            raise argparse.ArgumentTypeError(f"expected {kind}{cap}"
                                             + (f" ({what})" if what else "") + f", got {text!r}")
        return value
    parse.__name__ = "integer"  # what argparse calls the type in its own messages
    return parse


positive_int = bounded_int(1, None)


def count_option(name: str):
    """The argparse type of ComposeConfig's count `name`: its range from config.COUNT_LIMITS,
    the one the Python API checks."""
    from lorahub_compeft.config import COUNT_LIMITS
    most, what = COUNT_LIMITS[name]
    return bounded_int(1, most, what)


def finite_float(least: float, what: str, above: bool = False):
    """An argparse type: a finite number >= least (> least with `above`)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > least if above else value >= least) or value == float("inf"):
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if above else '>='} {least:g} ({what}), "
                f"got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def thread_count(text: str) -> int:
    """--threads: at most the cores this process may run on (more only wait for each other)."""
    return bounded_int(1, threads.machine_cores(), "this machine's cores")(text)


def apply_threads(args) -> None:
    """Set torch's threads from --threads (else from the idle cores: io/threads.py), here and,
    through OMP_NUM_THREADS, in the worker processes a command starts; without --threads,
    --workers N processes on this machine share those cores (at least one thread each), since
    N processes of a thread per core each make the threads wait for each other."""
    import os

    import torch
    workers = getattr(args, "workers", 1) if getattr(args, "backend", "local") == "local" else 1
    count = choose_threads(getattr(args, "threads", None), workers)
    if count is None:
        return
    logging.getLogger(__name__).info("using %d torch thread(s)", count)
    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)


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
    p.add_argument("-n", "--n-experts", type=count_option("n_experts"),
                   default=ComposeConfig().n_experts,
                   help=ComposeConfig.help("n_experts"))


MAX_SEEDS = 10_000  # seeds of one run; a run of a few hundred cells per seed is days already


def parse_seeds(text: str) -> list[int]:
    """'1-5' or '1,3,7' -> a list of seeds, each in [0, 2**32), at most MAX_SEEDS of them
    (counted before the list is built)."""
    ranges = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            lo, hi = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seeds {text!r}; use e.g. 1-5 or 1,2,3") from None
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad seed range {part!r}: it holds no seed; write "
                                             f"it low-high, e.g. {hi}-{lo}")
        if hi >= 2 ** 32:
            raise argparse.ArgumentTypeError(f"bad seed {hi} in {text!r}: seeds lie in "
                                             "[0, 2**32)")
        ranges.append(range(lo, hi + 1))
    count = sum(map(len, ranges))
    if count > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"{text!r} holds {count:,} seeds; give at most "
                                         f"{MAX_SEEDS:,}")
    return [seed for seeds in ranges for seed in seeds]


def size_line(file_bytes: int, sizes: dict) -> str:
    """The whole file's size and ratio (what a user stores and downloads); the coded payload
    as a detail."""
    payload = sizes["payload_bytes"]
    return (f"{human_bytes(file_bytes)}, {sizes['fp16_bytes'] / file_bytes:.1f}x smaller than fp16 "
            f"({human_bytes(sizes['fp16_bytes'])}), {sizes['fp32_bytes'] / file_bytes:.1f}x than fp32 "
            f"(coded payload {human_bytes(payload)}"
            + (f", {sizes['fp16_bytes'] / payload:.1f}x)" if payload else ")"))


def setting_text(summary: dict) -> str:
    """A codec's parameters in a few characters, for listings."""
    return codecs.codec_of(summary).setting_text(summary)
