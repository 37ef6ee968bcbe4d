"""The library's folder and index.json: file names, what an index entry must hold, which
temporary names the library's writes make, and what makes a folder a library (library.py)."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

from lorahub_compeft.codecs import base as codecs

INDEX_NAME = "index.json"
INDEX_VERSION = 1
LOCK_NAME = ".lock"
SUFFIX = ".safetensors"
# what atomic_write_bytes names its temporary file beside index.json or an expert file
TEMP_NAME = re.compile(r"^\.(index\.json|[^/]+\.safetensors)\.[A-Za-z0-9_]+\.tmp$")


class LibraryError(ValueError):
    """A library operation that cannot be done; the message says why and what to do."""


def file_name_for(name: str) -> str:
    """An expert's file name: the name percent-escaped (injective: two names never share a
    file), e.g. owner/name -> owner%2Fname.safetensors. Names made of letters, digits, _ . -
    keep their spelling."""
    if not isinstance(name, str) or not name or len(name) > 200 or "\0" in name:
        raise LibraryError(f"{name!r} cannot be used as an expert name; use 1 to 200 "
                           "characters, e.g. owner/name")
    safe = quote(name, safe="")
    if safe.startswith("."):
        safe = "%2E" + safe[1:]
    return f"{safe}{SUFFIX}"


def plain_name(file: object) -> bool:
    """A file name the index may point at: one plain component inside the root."""
    return isinstance(file, str) and file.endswith(SUFFIX) and "/" not in file and \
        "\\" not in file and "\0" not in file and not file.startswith(".")


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def entry_problem(name: str, entry) -> str | None:
    """What is wrong with an index entry (every field a listing or a writer reads), or None."""
    if not isinstance(entry, dict):
        return "not an object"
    if entry.get("name") != name:
        return f"its name is {entry.get('name')!r}"
    if not plain_name(entry.get("file")):
        return f"its file {entry.get('file')!r} is not a file name inside the library"
    sizes = entry.get("sizes")
    if not isinstance(sizes, dict) or not all(_positive(sizes.get(k)) for k in ("payload_bytes", "fp16_bytes")) \
            or "file_bytes" in entry and not _positive(entry["file_bytes"]):
        return "its sizes are damaged"
    if not isinstance(entry.get("peft_type"), str) or "r" not in entry or \
            not (entry["r"] is None or _positive(entry["r"])):
        return "its peft_type or r is damaged"
    if not isinstance(entry.get("base_model"), (str, type(None))):
        return f"its base_model {entry.get('base_model')!r} is not a name"
    codec = entry.get("codec", codecs.DEFAULT_CODEC)
    if codec not in codecs.names():
        return f"its codec {codec!r} is not one this lorahub-compeft reads"
    return codecs.get(codec).check_summary(entry)


def is_library(root: Path) -> bool:
    """Says so (index.json), holds only expert and library files, or is empty."""
    if (root / INDEX_NAME).is_file():
        return True
    return all(p.name.endswith(SUFFIX) or p.name == LOCK_NAME or TEMP_NAME.match(p.name)
               for p in root.iterdir())
