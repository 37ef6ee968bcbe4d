"""Big-Bench Hard (BBH): task specs, data loading, prompts and the exact-match metric.

The 27 BBH tasks are described declaratively by JSON specs shipped in
``lorahub_compeft.tasks`` (``tasks/bbh/<task>.json`` in the source tree)::

    {"name": "date_understanding",
     "instruction": "Infer the date from context.",
     "answer": {"kind": "choice"},
     "max_new_tokens": 8}

``answer.kind`` selects how answers are normalized before exact match (see
:func:`normalize_answer`); nothing in this module branches on task names.

Examples come from a local copy of the official release (``<dir>/<task>.json`` with
``{"examples": [{"input", "target"}, ...]}``) when a directory is given or
``LORAHUB_COMPEFT_BBH_DIR`` is set, and from the Hugging Face Hub (``lukaemon/bbh``, or
offline its copy in the datasets cache) otherwise. Prompts follow LoraHub: ``<instruction>\\n\\nQ: <input>\\nA:``.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lorahub_compeft.sampling import sample_indices

__all__ = [
    "BBH_DIR_ENV",
    "BBH_HUB_DATASET",
    "BBH_TASKS",
    "BBHDataError",
    "draw_few_shot",
    "exact_match",
    "format_icl_prompt",
    "format_prompt",
    "load_examples",
    "load_task_spec",
    "normalize_answer",
    "accuracy",
]

BBH_DIR_ENV = "LORAHUB_COMPEFT_BBH_DIR"
BBH_HUB_DATASET = "lukaemon/bbh"


class BBHDataError(ValueError):
    """A BBH task file is missing or does not have the expected structure."""


# --------------------------------------------------------------------------- specs


def _spec_dir():
    """Directory (a Traversable) holding the BBH specs."""
    try:
        return resources.files("lorahub_compeft.tasks").joinpath("bbh")
    except ModuleNotFoundError:
        # Uninstalled source checkout: `lorahub_compeft.tasks` only exists once setup.cfg's
        # package_dir mapping is installed, but the specs sit right beside the package.
        return Path(__file__).resolve().parents[2] / "tasks" / "bbh"


def _list_tasks() -> tuple[str, ...]:
    specs = _spec_dir()
    if not specs.is_dir():
        return ()
    return tuple(sorted(p.name[: -len(".json")] for p in specs.iterdir() if p.name.endswith(".json")))


BBH_TASKS: tuple[str, ...] = _list_tasks()


def _check_task(task: str) -> None:
    if task not in BBH_TASKS:
        raise ValueError(f"unknown BBH task {task!r}; valid tasks: {', '.join(BBH_TASKS)}")


def load_task_spec(name: str) -> dict[str, Any]:
    """Return the spec of BBH task ``name`` (a fresh dict on every call)."""
    _check_task(name)
    return json.loads(_spec_dir().joinpath(f"{name}.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- data


def load_examples(task: str, bbh_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Load all examples of ``task`` as ``[{"input": str, "target": str}, ...]``.

    Source, in order of precedence: ``bbh_dir``, the ``LORAHUB_COMPEFT_BBH_DIR``
    environment variable (a directory holding ``<task>.json`` or ``tasks/<task>.json``),
    and finally the Hub dataset ``lukaemon/bbh`` (config ``task``, split ``test``).
    """
    _check_task(task)
    if bbh_dir is None:
        bbh_dir = os.environ.get(BBH_DIR_ENV) or None
    if bbh_dir is None:
        return _load_from_hub(task)
    return _load_from_dir(task, Path(bbh_dir))


def _load_from_dir(task: str, bbh_dir: Path) -> list[dict[str, str]]:
    candidates = [bbh_dir / f"{task}.json", bbh_dir / "tasks" / f"{task}.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        tried = ", ".join(str(p) for p in candidates)
        raise BBHDataError(f"BBH task {task!r}: no data file found (tried {tried})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BBHDataError(f"BBH task {task!r}: {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise BBHDataError(f"BBH task {task!r}: {path} has no 'examples' list")
    return _validate_examples(task, str(path), data["examples"])


def _load_from_hub(task: str) -> list[dict[str, str]]:
    """Through load_dataset: downloaded, or, when the Hub cannot be reached, from the datasets
    cache (where `lorahub-compeft download` puts it), else one line naming what is missing."""
    import datasets  # deferred: heavy import, and only this path needs it

    from lorahub_compeft.io.adapters import hub_unreachable
    offline = hub_unreachable()
    verbosity = datasets.logging.get_verbosity()
    if offline:  # "using the latest cached version", twice per load: expected, so not shown
        datasets.logging.set_verbosity_error()
    try:
        rows = datasets.load_dataset(BBH_HUB_DATASET, task, split="test")
    except Exception as err:
        if offline is None:
            raise
        raise BBHDataError(
            f"BBH task {task!r}: {BBH_HUB_DATASET} (config {task!r}) is not in the datasets "
            f"cache {datasets.config.HF_DATASETS_CACHE} and the Hub cannot be reached "
            f"({offline}; {type(err).__name__}); fill the cache once where there is network "
            "(lorahub-compeft download), or pass --bbh-dir DIR, a folder of BBH <task>.json "
            "files") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return _validate_examples(task, f"{BBH_HUB_DATASET} (config {task!r}, split 'test')", list(rows))


def _validate_examples(task: str, source: str, examples: Sequence[Any]) -> list[dict[str, str]]:
    if not examples:
        raise BBHDataError(f"BBH task {task!r}: {source} contains no examples")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping):
            raise BBHDataError(
                f"BBH task {task!r}: {source}: example {i} is a {type(ex).__name__}, not an object"
            )
        for field in ("input", "target"):
            if not isinstance(ex.get(field), str):
                problem = "is missing" if field not in ex else f"is not a string ({ex[field]!r})"
                raise BBHDataError(f"BBH task {task!r}: {source}: example {i}: {field!r} {problem}")
        # Keep only the two fields we use so downstream code never sees extra columns.
        out.append({"input": ex["input"], "target": ex["target"]})
    return out


# ------------------------------------------------------------------------- prompts


def format_prompt(instruction: str, question: str) -> str:
    """LoraHub's zero-shot prompt: the task instruction, a blank line, then Q/A (the
    package's one prompt format; an empty instruction leaves just the Q/A)."""
    if not instruction:
        return f"Q: {question}\nA:"
    return f"{instruction}\n\nQ: {question}\nA:"


def format_icl_prompt(
    instruction: str, shots: Sequence[Mapping[str, str]], question: str
) -> str:
    """In-context prompt: instruction, then each shot as ``Q: ..\\nA: target``, then the question.

    Blocks are separated by blank lines, so with no shots this equals :func:`format_prompt`.
    """
    blocks = [f"Q: {s['input']}\nA: {s['target']}" for s in shots]
    blocks.append(f"Q: {question}\nA:")
    return instruction + "\n\n" + "\n\n".join(blocks)


# -------------------------------------------------------------------------- metric

_WHITESPACE = re.compile(r"\s+")
_OPTION = re.compile(r"\(?([a-z])\)?")  # "(a)", "a", "a)", "(a" -- the whole answer only
_NUMBER = re.compile(r"[+-]?(\d+|\d{1,3}(,\d{3})+)(\.\d+)?")  # optional thousands commas


def _basic(text: str) -> str:
    """Rules applied to every kind: NFKC, case-fold, collapse whitespace, drop one trailing period."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _choice(text: str, answer: Mapping[str, Any]) -> str:
    # A bare option letter, with or without parentheses, means that option: "A" == "(a)".
    m = _OPTION.fullmatch(text)
    return f"({m.group(1)})" if m else text


def _number(text: str, answer: Mapping[str, Any]) -> str:
    # Compare numbers by value: "12.0" == "12" == "+12", "1,000" == "1000".
    if not _NUMBER.fullmatch(text):
        return text
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _sequence(text: str, answer: Mapping[str, Any]) -> str:
    # unit "char" (Dyck brackets): every non-space character is a token, so "]]>" == "] ] >".
    # unit "word" (word lists): whitespace already collapsed by _basic.
    if answer.get("unit") == "char":
        return " ".join(text.replace(" ", ""))
    return text


def _identity(text: str, answer: Mapping[str, Any]) -> str:
    return text


# Label kinds (True/False, Yes/No, valid/invalid) need nothing beyond case-folding: their
# labels are single words, and matching inside longer text would be answer extraction, not
# normalization.
_KIND_RULES: dict[str, Callable[[str, Mapping[str, Any]], str]] = {
    "choice": _choice,
    "boolean": _identity,
    "yes_no": _identity,
    "valid_invalid": _identity,
    "number": _number,
    "sequence": _sequence,
    "free": _identity,
}


def normalize_answer(text: str, spec_answer: Mapping[str, Any] | None = None) -> str:
    """Canonical form of an answer, so that exact match ignores harmless surface variation.

    Always: Unicode NFKC, leading/trailing whitespace stripped, inner whitespace runs
    collapsed to one space, case-folded, one trailing period dropped. Then, by
    ``spec_answer["kind"]`` (no kind-specific rule when ``spec_answer`` is None):

    - ``choice``: a bare option letter becomes ``(x)``: "(A)", "A", "a)" -> "(a)";
      anything longer (e.g. an option's text) is left as is.
    - ``number``: a plain decimal number becomes its canonical value:
      "12.0", "+12" -> "12"; "1,000" -> "1000"; "0.50" -> "0.5".
    - ``sequence`` with ``unit: "char"``: characters re-spaced: "]]>" -> "] ] >".
    - ``sequence`` (``unit: "word"``), ``boolean``, ``yes_no``, ``valid_invalid``,
      ``free``: the common rules only ("True." -> "true").

    Normalization never searches a longer text for an answer; a verbose prediction stays
    verbose and does not match.
    """
    text = _basic(text)
    if spec_answer is None:
        return text
    kind = spec_answer.get("kind")
    if kind not in _KIND_RULES:
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {sorted(_KIND_RULES)}")
    return _KIND_RULES[kind](text, spec_answer)


def exact_match(prediction: str, target: str, spec_answer: Mapping[str, Any] | None = None) -> bool:
    """True if prediction and target are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction, spec_answer) == normalize_answer(target, spec_answer)


# ----------------------------------------------------------------------- few-shot


def draw_few_shot(
    examples: Sequence[dict[str, str]], k: int = 5, *, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split ``examples`` into ``k`` seeded few-shot examples and the rest (for evaluation).

    Uses a private ``random.Random(seed)``, so the global RNG is neither read nor
    advanced and the same seed always gives the same split. ``shots`` come in drawn
    order; ``rest`` keeps the original order.
    """
    n = len(examples)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k >= n:
        raise ValueError(
            f"cannot draw k={k} few-shot examples from {n}: at least one must remain for evaluation"
        )
    picked = sample_indices(n, k, seed)
    chosen = set(picked)
    shots = [examples[i] for i in picked]
    rest = [ex for i, ex in enumerate(examples) if i not in chosen]
    return shots, rest


def accuracy(predictions: list[str], targets: list[str],
             match: Callable[[str, str], bool]) -> float:
    if not targets:
        raise ValueError("no examples to score")
    return sum(match(p, t) for p, t in zip(predictions, targets, strict=True)) / len(targets)

