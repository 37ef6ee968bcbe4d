"""Options and parsers several commands share: compression, selection, precision, threads,
seeds, expert lists; and how sizes are printed."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


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


def parse_alpha(text: str):
    """'auto' or a positive number."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a positive number or 'auto', got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"alpha must be positive, got {text}")
    return value


def add_selection_scope(p: argparse.ArgumentParser) -> None:
    """--per-tensor (the default) or --global top-k selection and scale."""
    from lorahub_compeft.codecs.compeft import DEFAULT_COMPRESSION
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--per-tensor", dest="per_tensor", action="store_true",
                       default=DEFAULT_COMPRESSION["per_tensor"],
                       help="top-k and scale within each tensor (default)")
    scope.add_argument("--global", dest="per_tensor", action="store_false",
                       help="top-k and one scale over the whole adapter (the paper's code)")


def add_compression_options(p: argparse.ArgumentParser, encoding: bool = True) -> None:
    from lorahub_compeft.codecs.compeft import DEFAULT_COMPRESSION as d, PAPER_COMPRESSION as paper
    p.add_argument("--density", "-k", type=float, default=d["density"],
                   help=f"fraction of task-vector entries kept, in (0, 1] (default {d['density']}, "
                        f"chosen on the zoo's validation seeds; the paper's: {paper['density']})")
    p.add_argument("--alpha", type=parse_alpha, default=d["alpha"],
                   help="kept entries become sign * alpha * std(tau); 'auto' (default) picks the "
                        "alpha whose LoRA products B·A are closest to the original's; the paper's: "
                        f"{paper['alpha']:g}")
    add_selection_scope(p)
    if not encoding:
        return
    p.add_argument("--encoding", choices=("golomb", "bitmask"), default="golomb",
                   help="golomb: near the entropy bound (default); bitmask: two bit masks")
    p.add_argument("--codec", choices=("compeft", "ere"), default="compeft",
                   help="compeft: sparse ternary (default; --density, --alpha, --per-tensor, "
                        "--encoding); ere: low-rank factors of each LoRA module's B·A "
                        "(--budget-bits, --quant-bits)")
    p.add_argument("--budget-bits", type=float, default=1.0,
                   help="ere: payload budget in bits per LoRA value (default 1)")
    p.add_argument("--quant-bits", type=int, choices=(4, 8, 16), default=4,
                   help="ere: bits per stored factor value, one scale per row (default 4)")
    p.add_argument("--revision", help="Hub revision when the source is a Hub id")


def codec_options(args) -> dict:
    return {"codec": args.codec, "budget_bits": args.budget_bits, "quant_bits": args.quant_bits}


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


def read_experts_file(path: str) -> list[str]:
    """One expert (Hub id or PEFT dir) per line; blank lines and # comments skipped."""
    return [line.strip() for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def size_line(file_bytes: int, sizes: dict) -> str:
    """The whole file's size and ratio (what a user stores and downloads); the coded payload
    as a detail."""
    return (f"{human_bytes(file_bytes)}, {sizes['fp16_bytes'] / file_bytes:.1f}x smaller than fp16 "
            f"({human_bytes(sizes['fp16_bytes'])}), {sizes['fp32_bytes'] / file_bytes:.1f}x than fp32 "
            f"(coded payload {human_bytes(sizes['payload_bytes'])}, "
            f"{sizes['fp16_bytes'] / sizes['payload_bytes']:.1f}x)")


def setting_text(summary: dict) -> str:
    """A codec's parameters in a few characters, for listings."""
    if summary.get("codec", "compeft") == "ere":
        return f"{summary['budget_bits']:g}b/p {summary['encoding']} r~{summary['mean_rank']:.1f}"
    tensor = " pt" if summary.get("selection") == "per_tensor" else ""
    return f"k={summary['density']:g} a={summary['alpha']:g}{tensor}"
