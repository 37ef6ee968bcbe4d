"""`compress`, `inspect`, `export` and `merge`: commands on expert files."""
from __future__ import annotations

import json
from pathlib import Path

from lorahub_compeft.cli.options import (MAX_RANK, add_compression_options, bounded_int,
                                         compression_options, finite_float, human_bytes,
                                         setting_text, size_line)


def add_parsers(sub) -> None:
    p = sub.add_parser("compress", help="compress a PEFT adapter (dir or Hub id) with ComPEFT or ERE",
                       description="ComPEFT (default): keep the top-k of the task vector, as signs "
                                   "times one scale, stored near its entropy bound. ERE (--codec "
                                   "ere): low-rank factors of each LoRA module's B·A, rank "
                                   "allocated under one budget. Either in one .safetensors file.")
    p.add_argument("source", help="PEFT adapter directory or Hub id (owner/name), or with --base "
                                  "a fully fine-tuned model directory")
    p.add_argument("--base", help="the model SOURCE was fully fine-tuned from: compress the "
                                  "residual θ_ft − θ_base")
    p.add_argument("-o", "--output", required=True, help="the expert file to write (.safetensors)")
    p.add_argument("--name", help="the expert's name (default: the Hub id or directory name)")
    p.add_argument("--force", action="store_true", help="replace an existing expert file")
    add_compression_options(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("inspect", help="show what an expert file holds and how small it is",
                       description="Reads the header only; the payload is not decoded.")
    p.add_argument("path", help="an expert file (.safetensors) written by `compress`")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="decode an expert file back into a standard PEFT directory "
                                      "(a residual: into the full model)")
    p.add_argument("path", help="an expert file (.safetensors) written by `compress`")
    p.add_argument("--base", help="residual experts: the base model directory (default: the "
                                  "one recorded at compression)")
    p.add_argument("-o", "--output", required=True, help="folder to write (new or empty)")
    p.add_argument("--force", action="store_true",
                   help="replace a folder holding only what export writes (the adapter's or "
                        "model's files, never other files)")
    p.set_defaults(func=cmd_export)

    _add_merge_parser(sub)


def cmd_compress(args) -> int:
    from lorahub_compeft.store.expert import compress
    from lorahub_compeft.io.files import check_file_target
    codec, options = compression_options(args)  # a wrong flag fails before anything is read
    out = check_file_target(args.output, args.force)
    source = args.source
    if args.base:
        from lorahub_compeft.io.residuals import residual_adapter
        source = residual_adapter(args.source, args.base)
    expert = compress(source, options, codec=codec, name=args.name, revision=args.revision)
    expert.save(out, force=args.force)
    print(f"{out}: {expert.codec} ({setting_text(expert.summary())}), "
          f"{size_line(out.stat().st_size, expert.sizes)}")
    return 0


def cmd_inspect(args) -> int:
    from lorahub_compeft.codecs.base import codec_of, coded_numel
    from lorahub_compeft.store.expert import load_expert
    expert = load_expert(args.path)
    info, meta = expert.summary(), expert.meta
    if args.json:
        print(json.dumps(dict(info, meta_tensors=len(meta["tensors"])), indent=2))
        return 0
    lines = [("expert", info["name"]), ("source", json.dumps(info["source"])),
             ("base model", info["base_model"]),
             _adapter_line(info, len(meta["tensors"]), coded_numel(meta)),
             *codec_of(meta).inspect_lines(meta),
             ("file", size_line(Path(args.path).stat().st_size, expert.sizes))]
    if expert.sizes["carried_bytes"]:
        lines.append(("carried", f"{human_bytes(expert.sizes['carried_bytes'])} of full tensors "
                                 f"({', '.join(e['name'] for e in meta['carried'])})"))
    for label, text in lines:
        print(f"{label:<12} {text}")
    return 0


def _adapter_line(info: dict, tensors: int, numel: int) -> tuple[str, str]:
    if info["peft_type"] == "RESIDUAL":
        return "residual", f"full fine-tuning θ_ft − θ_base, {tensors} tensors coded, {numel:,} parameters"
    return ("adapter", f"{info['peft_type']} r={info['r']} targets={info['target_modules']}, "
                       f"{tensors} tensors, {numel:,} parameters")


def cmd_export(args) -> int:
    from lorahub_compeft.store.expert import load_expert
    expert = load_expert(args.path)
    out = expert.export(args.output, force=args.force, base=args.base)
    if expert.config.get("peft_type") == "RESIDUAL":
        print(f"wrote model {out} (base + decoded residual; load it with from_pretrained)")
    else:
        print(f"wrote PEFT adapter {out} (load it with PeftModel.from_pretrained)")
    return 0


def _add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge experts (dense or compressed) into one LoRA adapter",
                       description="Task arithmetic or TIES on each module's product "
                                   "s·B·A (not on A and B apart), written back as one LoRA "
                                   "adapter by SVD.")
    p.add_argument("experts", nargs="+", help="expert files, PEFT dirs or Hub ids")
    p.add_argument("-o", "--output", required=True, help="directory for the merged PEFT adapter")
    p.add_argument("--method", choices=("task_arithmetic", "ties"), default="task_arithmetic")
    p.add_argument("--weights", help="comma-separated, one per expert (default: 1/N for "
                                     "task_arithmetic, 1 for ties)")
    p.add_argument("--density", type=finite_float(0, "a fraction", above=True), default=0.2,
                   help="ties: fraction of each expert's ΔW entries kept per module (default 0.2)")
    p.add_argument("--rank", type=bounded_int(1, MAX_RANK, "the merged adapter's rank"),
                   help="rank of the merged adapter (default: the sum of the experts' ranks)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from lorahub_compeft.io.adapters import save_adapter
    from lorahub_compeft.merge import merge
    out = Path(args.output)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; choose another path or pass --force")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise ValueError(f"bad --weights {args.weights!r}; use e.g. 0.5,0.5") from None
    result = merge(args.experts, args.method, weights, args.density, args.rank)
    save_adapter(out, result.adapter.tensors, result.adapter.config, force=args.force)
    print(f"wrote {out}: {args.method} of {len(args.experts)} experts, rank "
          f"{result.adapter.config['r']}, {100 * result.energy_kept:.1f}% of the merged update kept")
    return 0
