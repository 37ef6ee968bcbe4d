"""The fault campaign's targeted cases (scripts/fault_campaign.py runs them): named forgeries
and damage a random mutation rarely hits, and hand-edited library indexes.

Expert files, each case once per reference it applies to (a shipped format-1 ComPEFT file, a
format-2 ComPEFT file, a format-2 ERE file):
  v1-dtype     a payload tensor's dtype edited in the safetensors header, the shape fitted to
               the same bytes (format 1's digest covers bytes only, so it still matches)
  v1-codec     a "codec" field added to a format-1 header
  payload      a format-2 payload tensor replaced or retyped (no scales, a bfloat16 Golomb
               stream, ERE codes and scales of another dtype), digests recomputed
  ere          ERE header forgeries: an init that overflows float16, ranks, budget, energy
  config       adapter_config.r or rank_pattern forged to 2,000,000
  regex        target_modules a regex string (one that backtracks for minutes included)
Each case is "signed" when a forger recomputed every digest the format has; a case that is not
signed and decodes to other weights is a silent decode, a failure.

Index: a library of three experts whose index.json is edited by hand (fields removed or of
other types, two names on one file, paths outside, a lock that is a link, user files planted
beside it), then `library list`, `library add` of a fourth expert, `library rebuild` and
`library list` again, through the command line, in a worker with the address-space cap.
Outcomes: read (every command exit 0), refused (some exit 2, one line), failures: escaped:exit1
(the "this is a bug" exit) or escaped:<Type>, lost-files (an expert or user file deleted),
outside (a file written outside the library).
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import struct
from pathlib import Path

INDEX_WORKER = r"""
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from pathlib import Path
from lorahub_compeft.cli import main
def files(root, outside):
    return {str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()
            and not p.name.startswith(".index.json.") and p.name != "index.json" and p.name != ".lock"}
for line in sys.stdin:
    root, extra = json.loads(line)
    outside = Path(root).parent / "outside"
    before = files(root, outside)
    codes, out = [], None
    for argv in (["library", "list", root], ["library", "add", root, extra],
                 ["library", "rebuild", root], ["library", "list", root]):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                codes.append(main(argv))
        except SystemExit as err:
            codes.append(err.code)
        except BaseException as err:
            out = "escaped:" + type(err).__name__
            break
    if out is None:
        lost = before - files(root, outside)
        out = ("outside" if outside.exists() else "lost-files" if lost else
               "escaped:exit1" if 1 in codes or None in codes else
               "read" if set(codes) == {0} else "refused")
    print(out, flush=True)
"""


# ------------------------------------------------------------------------------ expert files
def split_header(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_header(header: dict, rest: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + rest


SIZES = {"BF16": 2, "F16": 2, "U16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8,
         "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _retype(data: bytes, key: str, dtype: str) -> bytes | None:
    """The safetensors header of one tensor edited to another dtype over the same bytes."""
    header, rest = split_header(data)
    start, end = header[key]["data_offsets"]
    if (end - start) % SIZES[dtype] or header[key]["dtype"] == dtype:
        return None
    header[key]["dtype"], header[key]["shape"] = dtype, [(end - start) // SIZES[dtype]]
    return join_header(header, rest)


def _v1_meta(data: bytes, edit) -> bytes:
    header, rest = split_header(data)
    edit(header["__metadata__"])
    return join_header(header, rest)


def forged_bytes(src: Path, payload_edit=None, meta_edit=None) -> bytes:
    """A format-2 file rewritten by a forger: payload and header edited, every digest recomputed."""
    from safetensors import safe_open
    from safetensors.torch import save
    from lorahub_compeft.store.format import encode_header, payload_digest, read_header
    meta = read_header(src)
    with safe_open(str(src), "pt") as handle:
        payload = {k: handle.get_tensor(k) for k in handle.keys()}
    if payload_edit:
        payload_edit(payload)
    if meta_edit:
        meta_edit(meta)
    meta["payload_sha256"] = payload_digest(payload)
    return save({k: v.contiguous() for k, v in payload.items()}, metadata=encode_header(meta))


def _edit_config(data: bytes, src: Path, version: int, change: dict) -> bytes:
    if version == 1:  # format 1 has no header digest: a plain edit is all a forger needs
        def edit(meta):
            meta["adapter_config"] = json.dumps(dict(json.loads(meta["adapter_config"]), **change))
        return _v1_meta(data, edit)
    return forged_bytes(src, meta_edit=lambda m: m["adapter_config"].update(change))


REGEXES = [".*", r".*\.(q|v)$", "(" * 25 + "a*" * 25 + ")" * 25 + "$", "["]


def expert_cases(refs: dict[str, Path]) -> list[tuple[str, bool, bytes, Path]]:
    """(family:label, signed, the file's bytes, its reference) for every case."""
    import torch
    cases = []
    v1 = refs["v1"]
    data = v1.read_bytes()
    header, _ = split_header(data)
    for key in sorted(k for k in header if k != "__metadata__"):
        for dtype in ("BF16", "F16", "U16", "I8", "F8_E4M3", "F8_E5M2", "I32", "F32", "BOOL"):
            edited = _retype(data, key, dtype)
            if edited is not None:
                cases.append((f"v1-dtype:{key}:{dtype}", True, edited, v1))
    for value in ('"ere"', '"compeft"', "ere", '"toy"', "5"):
        cases.append((f"v1-codec:{value}", True, _v1_meta(data, lambda m, v=value: m.update(codec=v)), v1))
    for name, change in (("r", {"r": 2_000_000}), ("rank_pattern", {"rank_pattern": {"q": 2_000_000}}),
                         ("r-bool", {"r": True}), ("rank_pattern-str", {"rank_pattern": {"q": "8"}})):
        for ref, version in ((v1, 1), (refs["v2"], 2), (refs["ere"], 2)):
            cases.append((f"config:{name}:{ref.stem}", True,
                          _edit_config(ref.read_bytes(), ref, version, change), ref))
    for i, regex in enumerate(REGEXES):
        for ref, version in ((v1, 1), (refs["v2"], 2)):
            cases.append((f"regex:{i}:{ref.stem}", True,
                          _edit_config(ref.read_bytes(), ref, version, {"target_modules": regex}), ref))
    v2, ere = refs["v2"], refs["ere"]

    def stream_bf16(p):
        key = next(k for k in sorted(p) if k.startswith("stream.") and len(p[k]) > 1)
        p[key] = p[key][:len(p[key]) // 2 * 2].view(torch.bfloat16)
    payload = [("no-scales", v2, lambda p: p.pop("scales")), ("stream-bf16", v2, stream_bf16),
               ("scales-f16", v2, lambda p: p.update(scales=p["scales"].half())),
               ("stream-int8", v2, lambda p: p.update({k: v.view(torch.int8) for k, v in p.items()
                                                       if k.startswith("stream.")}))]
    for key in ("ere.u", "ere.v", "ere.scales"):
        for dtype in (torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int32,
                      torch.float64, torch.float8_e4m3fn):
            payload.append((f"{key}-{str(dtype).removeprefix('torch.')}", ere,
                            lambda p, k=key, d=dtype: p.update({k: p[k].to(d)})))
    payload.append(("ere-no-v", ere, lambda p: p.pop("ere.v")))
    for label, ref, edit in payload:
        cases.append((f"payload:{label}", True, forged_bytes(ref, payload_edit=edit), ref))

    def fp16_init(value):
        def edit(meta):
            for entry in meta["tensors"]:
                entry["dtype"] = "float16"
            meta["tensors"][0]["init"] = value
        return edit

    def ere_field(key, value):
        def edit(meta):
            if value is None:
                meta["ere"].pop(key, None)
            else:
                meta["ere"][key] = copy.deepcopy(value)
        return edit
    forgeries = [(f"init-fp16-{v:g}", fp16_init(v)) for v in (3.4e38, 70000.0, 65504.0)]
    forgeries += [(f"{k}-{v!r}", ere_field(k, v)) for k, v in (
        ("budget_bits", None), ("energy_kept", None), ("ranks", None), ("bits", None),
        ("scaling", 1e308), ("scaling", True), ("bits", 3), ("energy_kept", 2.0), ("ranks", "1"))]
    forgeries.append(("rank-true", lambda m: m["ere"]["ranks"].__setitem__(0, True)))
    forgeries.append(("no-ere", lambda m: m.pop("ere")))
    for label, edit in forgeries:
        cases.append((f"ere:{label}", True, forged_bytes(ere, meta_edit=edit), ere))
    return cases


# ------------------------------------------------------------------------------ the index
JUNK = [None, True, -1, 0, 1.5, "x", "", [], {}, [1], {"a": 1}, "12 KB"]
FIELDS = ["name", "r", "peft_type", "file", "sizes", "codec", "file_bytes", "base_model", "density",
          "alpha", "source", "encoding"]


def edit_index(root: Path, rng: random.Random) -> str:
    """One hand edit of a library's index.json (or what lies beside it); returns its kind."""
    path = root / "index.json"
    try:  # an earlier edit may have replaced the index as a whole: then only whole-file edits
        index = json.loads(path.read_text())
        experts = index["experts"]
        names = sorted(experts)
    except (ValueError, KeyError, TypeError, RecursionError):
        names = []
    entry_edits = ["drop", "junk", "junk", "shared", "outside"] if len(names) > 1 else []
    kind = rng.choice(entry_edits + ["whole", "lock", "user_files"])
    name = rng.choice(names) if names else None
    if kind == "drop":
        experts[name].pop(rng.choice(FIELDS), None)
    elif kind == "junk":
        experts[name][rng.choice(FIELDS)] = copy.deepcopy(rng.choice(JUNK))
    elif kind == "shared":
        other = rng.choice([n for n in names if n != name])
        experts[other]["file"] = experts[name]["file"]
    elif kind == "outside":
        experts[name]["file"] = rng.choice(["../outside/x.safetensors", "/etc/hostname", "sub/x.safetensors"])
    elif kind == "whole":
        path.write_text(rng.choice(["not json", "[1, 2]", json.dumps({"version": 2, "experts": {}}),
                                    json.dumps({"version": 1, "experts": []}), "[" * 100000]))
        return kind
    elif kind == "lock":
        (root / ".lock").unlink(missing_ok=True)
        (root / ".lock").symlink_to(root.parent / "outside")
        return kind
    elif kind == "user_files":
        (root / ".notes.old").mkdir(exist_ok=True)
        (root / ".notes.old" / "notes.txt").write_text("mine")
        (root / "x.tmp").write_text("mine")
        return kind
    path.write_text(json.dumps(index))
    return kind


def index_trial(template: Path, work: Path, i: int, rng: random.Random) -> tuple[Path, list[str]]:
    trial = work / f"index{i}"
    shutil.rmtree(trial, ignore_errors=True)
    trial.mkdir()
    root = trial / "lib"
    shutil.copytree(template, root)
    kinds = [edit_index(root, rng) for _ in range(rng.choice([1, 1, 2]))]
    return root, kinds
