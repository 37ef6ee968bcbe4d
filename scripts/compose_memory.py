"""Peak RSS of one composition on a model object, as the runner's worker does it: the base
loaded once, then compose(experts, shots, model=base) with the 5 shots of a BBH task. Prints
the fp32 model's size, the experts' stack (N experts' LoRA tensors in fp32) and the process's
peak RSS during compose (VmHWM reset just before), above the RSS it started from.

    python scripts/compose_memory.py --model DIR --experts DIR... [--deep-copy]

--deep-copy composes on copy.deepcopy(base) instead, as compose did before it shared the
weights (the "before" of docs/results/rehearsal.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch


def rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--experts", nargs="+", required=True)
    p.add_argument("--bbh-dir", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                            "data" / "bbh"))
    p.add_argument("--task", default="navigate")
    p.add_argument("--budget", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--deep-copy", action="store_true")
    p.add_argument("--resident", action="store_true",
                   help="copy the loaded weights into memory of the process's own (transformers "
                        "maps the safetensors file, whose pages the kernel may drop under memory "
                        "pressure, which makes RSS peaks lower bounds)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from lorahub_compeft.compose import session
    from lorahub_compeft.compose.composer import compose
    from lorahub_compeft.eval.benchmarks import BBHBenchmark
    from lorahub_compeft.io.models import load_model
    if args.deep_copy:
        session.shared_weights_copy = copy.deepcopy  # what load_base did before
    base, tokenizer = load_model(args.model)
    base.eval()
    if args.resident:
        for param in base.parameters():
            param.data = param.data.clone()
    model_bytes = sum(t.numel() * 4 for t in base.parameters())
    task = BBHBenchmark(args.bbh_dir).load(args.task, 1)
    start = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    result = compose(args.experts, task.few_shot_examples(), model=base, tokenizer=tokenizer,
                     select="random", n_experts=len(args.experts), budget=args.budget,
                     dtype=args.dtype, mix="factors", progress=False)
    peak = rss("VmHWM")
    stack = sum(t.numel() * t.element_size() for t in vars(result.stack).values()
                if isinstance(t, torch.Tensor))  # the stack's own tensors (dense: N x P fp32)
    figures = {"deep_copy": args.deep_copy, "resident": args.resident,
               "precision": result.precision,
               "model_fp32_gb": model_bytes / 1e9, "rss_before_gb": start / 1e9,
               "peak_gb": peak / 1e9, "peak_above_start_gb": (peak - start) / 1e9,
               "stack_gb": stack / 1e9, "n_experts": len(args.experts)}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
