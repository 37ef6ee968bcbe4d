"""Methods as units: a name, a parameters dataclass, and `run(task, model, experts, seed)`.

Every field of a method's `Params` is part of each result's setting (and so of its resume
key), so a new parameter needs no change elsewhere. A field added after results were keyed
(`mix`) is left out of the key at the value that reproduces those results, so they keep it. A new method is a small registered class;
a selection protocol, for example, would read::

    @dataclass(frozen=True)
    class SelectParams(CompeftParams):
        select: str = "loss"
        restarts: int = 1

    @register
    class CompeftSelect(Compeft):
        name, Params = "compeft-select", SelectParams
        def choose(self, task, model, experts, seed): ...   # rank experts, keep n_experts
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lorahub_compeft.config import (DEFAULT_N, PAPER_COMPEFT, PAPER_COMPOSE, CompeftOptions,
                                    ComposeConfig, replace)
from lorahub_compeft.eval.pool import ExpertPool
from lorahub_compeft.eval.benchmarks import TaskData

log = logging.getLogger(__name__)


# --- the model every method of a worker shares -------------------------------------------------
@dataclass
class Base:
    """A base model loaded once per worker, on its device, with its tokenizer."""
    name: str
    model: Any
    tokenizer: Any
    batch_size: int = 16

    @classmethod
    def load(cls, name: str, batch_size: int = 16, device=None) -> "Base":
        import torch

        from lorahub_compeft.io.models import load_model
        model, tokenizer = load_model(name)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(name, model.to(device).eval(), tokenizer, batch_size)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from lorahub_compeft.io.models import generate
        return generate(self.model, self.tokenizer, prompts, max_new_tokens, self.batch_size)


def model_identity(name: str) -> str:
    """A local model by its absolute path (the working directory must not matter), a Hub id
    as given."""
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


# --- methods -----------------------------------------------------------------------------------
def later_field(default, before):
    """A parameter added after results were keyed, whose value `before` is what they ran:
    left out of the key at that value (Params.to_json)."""
    return field(default=default, metadata={"keyed_unless": before})


def mix_param(default: str):
    return later_field(default, before="factors")  # results before `mix` mixed factors


def start_param(default: str):
    return later_field(default, before="zero")  # results before `start` started at w = 0


@dataclass(frozen=True)
class Params:
    """A method's parameters; every field is part of the result key."""

    def to_json(self) -> dict:
        """The parameters as a result's setting holds them (a later_field at its old value
        left out)."""
        data = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if "keyed_unless" in f.metadata and data[f.name] == f.metadata["keyed_unless"]:
                del data[f.name]
        return data

    @classmethod
    def ran_with(cls, stored: dict, name: str):
        """The value of the later_field `name` a result's stored parameters (to_json's) ran
        with: left out of the key, its `before` value."""
        if name in stored:
            return stored[name]
        return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["keyed_unless"]

    @classmethod
    def from_json(cls, data: dict) -> "Params":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; this method takes {sorted(known)}")
        return cls(**data)


@dataclass
class Answers:
    predictions: list[str]
    info: dict = field(default_factory=dict)  # what the method learnt or read, for the row


class Method:
    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    uses_experts: ClassVar[bool] = False

    def __init__(self, params: Params | None = None):
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"{self.name} takes {self.Params.__name__}, got {type(self.params).__name__}")

    def run(self, task: TaskData, model: Base, experts: ExpertPool | None, seed: int) -> Answers:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, **params) -> Method:
    """A registered method with `params` (unknown ones refused), the rest defaults."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[name]
    return cls(cls.Params.from_json(params))


def method_options(name: str, options: dict) -> dict:
    """The subset of command-line `options` that method `name` takes."""
    return {k: v for k, v in options.items() if k in {f.name for f in dataclasses.fields(METHODS[name].Params)}}


@register
class ZeroShot(Method):
    """The base model alone, LoraHub's prompt."""
    name = "zeroshot"

    def run(self, task, model, experts, seed):
        return Answers(model.generate([task.prompt(r["input"]) for r in task.rows], task.max_new_tokens))


@register
class ICL(Method):
    """The few-shot examples in context before each question."""
    name = "icl"

    def run(self, task, model, experts, seed):
        return Answers(model.generate([task.icl_prompt(r["input"]) for r in task.rows],
                                      task.max_new_tokens))


@dataclass(frozen=True)
class ComposeParams(Params):
    """LoraHub's protocol (config.PAPER_COMPOSE): the N experts `choose` drew, all composed."""
    preset: ClassVar[ComposeConfig] = PAPER_COMPOSE  # compose()'s settings this method starts from
    n_experts: int = PAPER_COMPOSE.n_experts
    budget: int = PAPER_COMPOSE.budget
    objective: str = PAPER_COMPOSE.objective
    optimizer: str | None = PAPER_COMPOSE.optimizer  # None: the objective's default
    dtype: str = PAPER_COMPOSE.dtype  # how the search runs the base; the row records which
    mix: str = mix_param(PAPER_COMPOSE.mix)  # the paper's protocol mixes factors
    start: str = start_param(PAPER_COMPOSE.start)  # and starts at w = 0

    def compose_config(self) -> ComposeConfig:
        """compose()'s settings: the preset, with this method's fields that are its fields."""
        fields = {f.name for f in dataclasses.fields(ComposeConfig)}
        return replace(self.preset, **{k: v for k, v in dataclasses.asdict(self).items()
                                       if k in fields})


@register
class LoraHub(Method):
    """Composition over N dense experts, as LoraHub runs."""
    name, Params, uses_experts = "lorahub", ComposeParams, True

    def choose(self, task, model, experts: ExpertPool, seed: int) -> list[str]:
        """The same N experts for every method of a (task, seed)."""
        return experts.sample(self.params.n_experts, seed)

    def expert_files(self, experts: ExpertPool, names: list[str]) -> tuple[list, int]:
        """What compose() reads for each chosen expert, and the bytes of those files."""
        return ([experts.dense(n) for n in names], sum(experts.dense_bytes(n) for n in names))

    def run(self, task, model, experts, seed):
        from lorahub_compeft.compose.composer import compose
        from lorahub_compeft.compose.experts import expert_handles
        names = self.choose(task, model, experts, seed)
        files, nbytes = self.expert_files(experts, names)
        files = [str(f) for f in files]
        # compose names a dense dir by its folder: map its names back to the pool's
        pool_name = dict(zip((h.name for h in expert_handles(files)), names))
        result = compose(files, task.few_shot_examples(), model.model, tokenizer=model.tokenizer,
                         config=self.params.compose_config(), seed=seed, progress=False)
        predictions = result.generate([task.prompt(r["input"]) for r in task.rows],
                                      task.max_new_tokens, batch_size=model.batch_size)
        return Answers(predictions, {
            "experts": [experts.identities[pool_name[k]] for k in result.experts],
            "bytes_read": nbytes, "files_read": len(files),
            "weights": [result.weights[k] for k in result.experts],
            "best_loss": result.best_loss, "zero_loss": result.zero_loss,
            "precision": result.precision, "compose_timings": result.timings})




class CompressedExperts:
    """expert_files for methods over ComPEFT experts: each chosen expert compressed with the
    method's density, alpha and per_tensor."""

    def expert_files(self, experts, names):
        p = self.params
        options = CompeftOptions(density=p.density, alpha=p.alpha, per_tensor=p.per_tensor)
        paths = [experts.compressed(n, options) for n in names]
        return paths, sum(path.stat().st_size for path in paths)


@dataclass(frozen=True)
class CompeftParams(ComposeParams):  # the paper's compression (Table 7)
    density: float = PAPER_COMPEFT.density
    alpha: float | str = PAPER_COMPEFT.alpha
    per_tensor: bool = PAPER_COMPEFT.per_tensor


@register
class Compeft(CompressedExperts, LoraHub):
    """The same N experts, ComPEFT-compressed, composed."""
    name, Params = "compeft", CompeftParams


@dataclass(frozen=True)
class SelectParams(ComposeParams):
    """The package's protocol (config.ComposeConfig()): every expert a candidate, N chosen by
    few-shot loss."""
    preset: ClassVar[ComposeConfig] = ComposeConfig()
    n_experts: int = DEFAULT_N["loss"]
    budget: int | str = ComposeConfig().budget  # "auto"; the paper's methods keep 40
    restarts: int = ComposeConfig().restarts
    mix: str = mix_param(ComposeConfig().mix)  # the package's default
    start: str = start_param(ComposeConfig().start)  # the package's: the best expert alone


@register
class Select(LoraHub):
    """The package's default protocol: every expert of the pool scored alone on the few-shot
    examples, the N lowest composed (dense experts)."""
    name, Params = "select", SelectParams

    def choose(self, task, model, experts, seed):
        return sorted(experts.identities)  # every expert is a candidate; compose() picks N


@dataclass(frozen=True)
class SelectCompeftParams(SelectParams):  # the default compression
    density: float = CompeftOptions().density
    alpha: float | str = CompeftOptions().alpha
    per_tensor: bool = CompeftOptions().per_tensor


@register
class SelectCompeft(CompressedExperts, Select):
    """The default protocol over ComPEFT experts at the default compression."""
    name, Params = "select-compeft", SelectCompeftParams
