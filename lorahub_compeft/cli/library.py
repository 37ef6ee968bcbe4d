"""`library add | list | remove | rebuild`: a local folder of compressed experts."""
from __future__ import annotations

import sys

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
    from lorahub_compeft.codecs.base import codec_of
    from lorahub_compeft.store.library import ExpertLibrary
    if args.action == "add":
        if args.name and len(args.sources) > 1:
            raise SystemExit("error: --name works with one source only")
        codec, options = compression_options(args)
        lib = ExpertLibrary(args.root)
        entries = lib.add_many(args.sources, options, codec=codec, name=args.name,
                               force=args.force, revision=args.revision)
        for e in entries:
            print(f"stored {e['name']} ({human_bytes(e['file_bytes'])})")
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
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'type':<5} {'r':>3} {'codec':<7} {'setting':<22} {'file':>10} "
          f"{'vs fp16':>8}")
    total = 0
    for r in rows:
        total += r["file_bytes"]
        print(f"{r['name']:<{width}}  {str(r['peft_type']):<5} {r['r'] or '-':>3} "
              f"{codec_of(r).name:<7} {setting_text(r):<22} {human_bytes(r['file_bytes']):>10} "
              f"{r['sizes']['fp16_bytes'] / r['file_bytes']:>7.1f}x")
    print(f"{len(rows)} experts, {human_bytes(total)} in all (whole files)")
    return 0
