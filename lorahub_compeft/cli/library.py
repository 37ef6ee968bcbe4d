"""`library add | list | remove | rebuild`: a local folder of compressed experts."""
from __future__ import annotations

import dataclasses
import sys
import unicodedata
from pathlib import Path

from lorahub_compeft.cli.options import (add_compression_options, compression_options, human_bytes,
                                         setting_text)


def add_parsers(sub) -> None:
    p = sub.add_parser("library", help="manage a local library of compressed experts",
                       description="A folder of expert files plus index.json. `add` compresses "
                                   "PEFT dirs or Hub ids on ingest.")
    lib = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = lib.add_parser("add", help="compress adapters into the library")
    a.add_argument("root", help="library folder (created if missing)")
    a.add_argument("sources", nargs="+", help="PEFT dirs or Hub ids")
    a.add_argument("--name", help="name for a single source")
    a.add_argument("--force", action="store_true",
                   help="replace experts of the same name stored with other settings")
    add_compression_options(a)
    a = lib.add_parser("list", help="list experts with whole-file sizes and ratios (writes nothing)")
    a.add_argument("root", help="library folder")
    a = lib.add_parser("remove", help="remove experts by name (all names are checked first)")
    a.add_argument("root", help="library folder")
    a.add_argument("names", nargs="+", help="expert names, as `library list` shows them")
    a = lib.add_parser("rebuild", help="rebuild index.json from the expert files")
    a.add_argument("root", help="library folder")
    p.set_defaults(func=cmd_library)


def cmd_library(args) -> int:
    from tqdm.auto import tqdm

    from lorahub_compeft.codecs.base import codec_of
    from lorahub_compeft.store.library import ExpertLibrary
    if args.action == "add":
        if args.name and len(args.sources) > 1:
            raise SystemExit("error: --name works with one source only")
        codec, options = compression_options(args)
        files = [s for s in args.sources if Path(s).is_file()]  # expert files: stored as they are
        if files and _compression_flags(args):
            raise ValueError(f"{files[0]} is an expert file, stored as it is; compression flags "
                             "apply to PEFT dirs and Hub ids (add it without them)")
        lib = ExpertLibrary(args.root)
        entries = [lib.add(s, name=args.name, force=args.force, **({} if s in files else {
            "options": options, "codec": codec, "revision": args.revision}))
            for s in tqdm(args.sources, desc="compressing experts", unit="expert")]
        for e in entries:
            print(f"{'already stored' if e['name'] in lib.already_stored else 'stored'} {e['name']} "
                  f"({human_bytes(e['file_bytes'])})")
        return 0
    if args.action == "remove":
        ExpertLibrary(args.root, create=False).remove(*args.names)
        print("removed " + ", ".join(args.names))
        return 0
    if args.action == "rebuild":
        print(f"indexed {len(ExpertLibrary(args.root, create=False).rebuild_index())} experts")
        return 0
    lib = ExpertLibrary(args.root, read_only=True)  # listing writes nothing
    rows = lib.entries()
    stray, temp = lib.stray_files(), lib.temp_files()
    if stray or temp:
        print(f"note: {len(stray)} expert file(s) not in the index and {len(temp)} temporary "
              "file(s), left by an interrupted writer; the next `library add` adopts the files "
              "that verify and removes the temporary ones", file=sys.stderr)
    if not rows:
        print(f"{args.root}: empty library")
        return 0
    width = max(_width(r["name"]) for r in rows)
    print(f"{_pad('name', width)}  {'type':<5} {'r':>3} {'codec':<7} {'setting':<22} {'file':>10} "
          f"{'vs fp16':>8}")
    total = 0
    for r in rows:
        total += r["file_bytes"]
        print(f"{_pad(r['name'], width)}  {str(r['peft_type']):<5} {r['r'] or '-':>3} "
              f"{codec_of(r).name:<7} {setting_text(r):<22} {human_bytes(r['file_bytes']):>10} "
              f"{r['sizes']['fp16_bytes'] / r['file_bytes']:>7.1f}x")
    print(f"{len(rows)} experts, {human_bytes(total)} in all (whole files)")
    return 0


def _compression_flags(args) -> bool:
    """Whether the command line sets how to compress (--codec, --preset or a codec's flag)."""
    from lorahub_compeft.codecs import base as codecs
    return args.codec != codecs.DEFAULT_CODEC or bool(args.preset) or any(
        getattr(args, f.name, None) is not None for unit in codecs.REGISTRY.values()
        for f in dataclasses.fields(unit.Options))


def _width(text: str) -> int:
    """Terminal columns: East Asian wide and full-width characters take two, combining and
    zero-width ones none."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf") else
               2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))
