"""The one way `--experts` items are read: a text file of one expert per line, or an expert
itself (a PEFT dir, an expert file, a Hub id). No list ships with the package: LoraHub's 196 ids are the user's
input, a file of one id per line."""
from __future__ import annotations

from pathlib import Path


def read_experts_file(path: str | Path) -> list[str]:
    """One expert (Hub id or PEFT dir) per line; blank lines and # comments skipped."""
    return [line.strip() for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def is_list_file(path: Path) -> bool:
    """A text file of experts, not an expert file (safetensors: binary, its header length
    starts it)."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return b"\0" not in f.read(4096)


def resolve_experts(items: list[str]) -> list[str]:
    """Each item as the experts it names: a text file, its lines; anything else (a PEFT dir,
    an expert file, a Hub id) itself."""
    experts = []
    for item in items:
        experts += read_experts_file(item) if is_list_file(Path(item)) else [item]
    return experts


def experts_from_args(items: list[str], experts_file: str | None = None) -> list[str]:
    """--experts items (resolve_experts) and then --experts-file's lines."""
    return resolve_experts(items) + (read_experts_file(experts_file) if experts_file else [])


def check_source(source: str, what: str = "expert") -> None:
    """Refuse, by name, a source that is no local path and not a Hub id either (a typo'd list
    file, say), before anything looks for it in a cache or on the Hub."""
    from lorahub_compeft.io.adapters import looks_like_hub_id
    if not Path(source).exists() and not looks_like_hub_id(source):
        raise ValueError(f"{what} {source!r}: no such file or directory, and not a Hub id "
                         "(owner/name)")
