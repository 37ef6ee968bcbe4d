"""Benchmark the ComPEFT codec against its entropy bound and general-purpose compressors.

Input: a LoRA adapter of LoraHub's flan-t5-large shape (r=16 on q and v of 144 attention blocks,
4,718,592 parameters), made locally with LoRA-like statistics (A ~ larger, B ~ smaller), plus
any PEFT adapter dirs given on the command line.

    python scripts/bench_codec.py                 # full table
    python scripts/bench_codec.py --quick         # a small adapter, one density, few repeats
    python scripts/bench_codec.py path/to/adapter_dir --json out.json
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import statistics
import time

import torch

from lorahub_compeft.codecs import coding
from lorahub_compeft.io.adapters import Adapter, load_adapter
from lorahub_compeft.config import PAPER_COMPEFT, replace
from lorahub_compeft.store.expert import compress, load_expert

DENSITIES = (0.05, 0.1, 0.2, 0.3)
LINK_BITS_PER_S, LINK_RTT_S, N_FETCH = 100e6, 0.05, 20


def flan_t5_large_shaped_adapter(seed: int = 0, layers: int = 24, d_model: int = 1024,
                                 r: int = 16) -> Adapter:
    """Random LoRA tensors of LoraHub's flan-t5-large expert shape: 48 encoder + 96 decoder
    modules (q and v of self-attention, plus cross-attention in the decoder)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    blocks = [("encoder", i, 0, "SelfAttention") for i in range(layers)]
    blocks += [("decoder", i, j, att) for i in range(layers)
               for j, att in ((0, "SelfAttention"), (1, "EncDecAttention"))]
    for stack, i, j, att in blocks:
        for proj in ("q", "v"):
            key = f"base_model.model.{stack}.block.{i}.layer.{j}.{att}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, d_model, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_model, r, generator=g) * 0.004
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": ["q", "v"],
              "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": "google/flan-t5-large"}
    return Adapter(tensors, config, {"path": "synthetic flan-t5-large-shaped LoRA"})


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(adapter: Adapter, densities, repeats: int, tmpdir) -> list[dict]:
    flat = torch.cat([t.reshape(-1).float() for t in adapter.tensors.values()])
    fp16 = torch.cat([t.reshape(-1).half() for t in adapter.tensors.values()]).numpy().tobytes()
    numel = flat.numel()
    general = {"gzip": len(gzip.compress(fp16, 9)), "bz2": len(bz2.compress(fp16, 9)),
               "lzma": len(lzma.compress(fp16))}
    try:
        import zstandard
        general["zstd"] = len(zstandard.ZstdCompressor(level=19).compress(fp16))
    except ImportError:
        pass
    rows = []
    for density in densities:
        for encoding in ("golomb", "bitmask"):
            setting = replace(PAPER_COMPEFT, density=density, encoding=encoding)
            expert = compress(adapter, setting)
            encode_s = median_time(lambda: compress(adapter, setting), repeats)
            path = expert.save(f"{tmpdir}/e-{density}-{encoding}.safetensors", force=True)

            def decode():
                return load_expert(path).state_dict()
            decode_s = median_time(decode, repeats)
            rec = torch.cat([t.reshape(-1).float() for t in decode().values()])
            stream_bytes = expert.sizes["payload_bytes"] - expert.sizes["carried_bytes"]
            file_bytes = path.stat().st_size
            bound = coding.ternary_entropy_bits(density, numel) / 8
            fetch = lambda size, dec: N_FETCH * (8 * size / LINK_BITS_PER_S + LINK_RTT_S + dec)
            rows.append({
                "density": density, "encoding": encoding, "numel": numel,
                "bits_per_param": 8 * stream_bytes / numel,
                "payload_bytes": stream_bytes, "file_bytes": file_bytes,
                "entropy_bound_bytes": bound, "over_bound_pct": 100 * (stream_bytes / bound - 1),
                "ratio_fp32": 4 * numel / file_bytes, "ratio_fp16": 2 * numel / file_bytes,
                **{f"ratio_vs_{k}": v / file_bytes for k, v in general.items()},
                "encode_s": encode_s, "decode_s": decode_s, "decode_mparams_per_s": numel / decode_s / 1e6,
                "rel_error": float((rec - flat).norm() / flat.norm()),
                "fetch20_s": fetch(file_bytes, decode_s), "fetch20_dense_fp32_s": fetch(4 * numel, 0.0),
            })
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    extra = [k for k in rows[0] if k.startswith("ratio_vs_")]
    head = ["k", "encoding", "bits/param", "vs bound", "x fp32", "x fp16",
            *[f"x {k.removeprefix('ratio_vs_')}(fp16)" for k in extra],
            "encode ms", "decode ms", "decode Mparam/s", "rel. error", "fetch 20 s (dense fp32)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["density"], r["encoding"], f"{r['bits_per_param']:.3f}", f"{r['over_bound_pct']:+.2f}%",
                 f"{r['ratio_fp32']:.1f}", f"{r['ratio_fp16']:.1f}", *[f"{r[k]:.1f}" for k in extra],
                 f"{1e3 * r['encode_s']:.0f}", f"{1e3 * r['decode_s']:.1f}",
                 f"{r['decode_mparams_per_s']:.0f}", f"{r['rel_error']:.3f}",
                 f"{r['fetch20_s']:.2f} ({r['fetch20_dense_fp32_s']:.2f})"]
        print("| " + " | ".join(map(str, cells)) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapters", nargs="*", help="extra PEFT adapter dirs to measure")
    parser.add_argument("--quick", action="store_true", help="small adapter, one density, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    import tempfile
    torch.set_num_threads(1)  # "one core", as the decode target says
    densities, repeats = ((0.1,), 2) if args.quick else (DENSITIES, args.repeats)
    shaped = flan_t5_large_shaped_adapter(layers=2 if args.quick else 24)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results[f"flan-t5-large-shaped LoRA ({shaped.numel:,} params)"] = bench(shaped, densities, repeats, tmp)
        for path in args.adapters:
            adapter = load_adapter(path)
            results[f"{path} ({adapter.numel:,} params)"] = bench(adapter, densities, repeats, tmp)
    for title, rows in results.items():
        print_table(title, rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
