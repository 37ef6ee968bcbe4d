"""Expert lists shipped with the package (eval/data/<name>.json), addressable by name, and the
one way `--experts` items are read: a list's name, a file of one expert per line, or an expert
itself (a PEFT dir or a Hub id)."""
from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)


def _data():
    return resources.files("lorahub_compeft.eval").joinpath("data")


def list_names() -> tuple[str, ...]:
    """The shipped lists, by name."""
    return tuple(sorted(p.name[:-len(".json")] for p in _data().iterdir()
                        if p.name.endswith(".json")))


def expert_list(name: str) -> list[dict]:
    """A shipped list's entries: [{"id": Hub id, "revision": commit or None}, ...]."""
    if name not in list_names():
        raise ValueError(f"no expert list {name!r}; shipped lists: {', '.join(list_names())}")
    return json.loads(_data().joinpath(f"{name}.json").read_text(encoding="utf-8"))["experts"]


def read_experts_file(path: str | Path) -> list[str]:
    """One expert (Hub id or PEFT dir) per line; blank lines and # comments skipped."""
    return [line.strip() for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def resolve_experts(items: list[str]) -> list[str]:
    """Each item as the experts it names: an existing file, its lines; a shipped list's name,
    its ids; anything else (a PEFT dir, a Hub id) itself. A path wins over a list of the same
    name, with a warning."""
    experts = []
    for item in items:
        path = Path(item)
        if path.is_file():
            experts += read_experts_file(path)
            continue
        if item in list_names():
            if path.exists():
                log.warning("%s: using the local folder, not the shipped expert list of that "
                            "name", item)
            else:
                experts += [e["id"] for e in expert_list(item)]
                continue
        experts.append(item)
    return experts


def experts_from_args(items: list[str], experts_file: str | None = None) -> list[str]:
    """--experts items (resolve_experts) and then --experts-file: a file, or a shipped list's
    name."""
    experts = resolve_experts(items)
    if experts_file is None:
        return experts
    if experts_file in list_names() and not Path(experts_file).exists():
        return experts + [e["id"] for e in expert_list(experts_file)]
    return experts + read_experts_file(experts_file)
