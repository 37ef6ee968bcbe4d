"""Every default of the package, once. The Python API, the command line and the runner's methods
read these dataclasses (the command line builds its flags from their fields: default and help
text included), so the same verb gives the same result from each. The paper's settings are
presets beside them, one argument or flag away. docs/defaults.md says how each default was
chosen (always on validation seeds).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def option(default, help: str, **metadata):
    """A dataclass field with its help text (what `--help` prints for its flag)."""
    return field(default=default, metadata={"help": help, **metadata})


def replace(config, **changes):
    """`config` with `changes`; an unknown name is an error that lists the known ones."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for {type(config).__name__}; "
                        f"it takes {', '.join(sorted(known))}")
    return dataclasses.replace(config, **changes)


def choices(options: type, name: str) -> tuple:
    """The values field `name` of an options class allows (its metadata's `choices`)."""
    return next(f for f in dataclasses.fields(options) if f.name == name).metadata["choices"]


# --- compression: one options class per shipped codec (codecs/ registers them) ------------------
# A field's metadata may also say how the command line reads it: `short` (a one-letter flag),
# `choices`, `parse` (text -> value; ValueError names the problem) and, for a bool, `off` (the
# flag that turns it off, and its help) instead of --no-<name>.
def number_or_auto(text: str) -> float | str:
    """'auto' or a positive number (how --alpha is read)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"alpha must be a positive number or 'auto', got {text!r}") from None
    if not value > 0:
        raise ValueError(f"alpha must be positive, got {text}")
    return value


@dataclass(frozen=True)
class CompeftOptions:
    """ComPEFT: keep the top-k of the task vector, each kept value as sign * alpha * sigma."""
    density: float = option(0.5, "fraction of task-vector entries kept, in (0, 1]; chosen on the "
                                 "zoo's validation seeds (the paper's: 0.1)", short="-k")
    alpha: float | str = option("auto", "kept entries become sign * alpha * std(tau); 'auto' picks "
                                        "the alpha whose LoRA products B·A are closest to the "
                                        "original's (the paper's: 1)", parse=number_or_auto)
    per_tensor: bool = option(True, "top-k and scale within each tensor",
                              off=("--global", "top-k and one scale over the whole adapter (the "
                                               "paper's code)"))
    encoding: str = option("golomb", "golomb: near the entropy bound; bitmask: two bit masks",
                           choices=("golomb", "bitmask"))


PAPER_COMPEFT = CompeftOptions(density=0.1, alpha=1.0, per_tensor=False)


@dataclass(frozen=True)
class EreOptions:
    """ERE: low-rank factors of each LoRA module's B·A, ranks allocated under one byte budget."""
    budget_bits: float = option(1.0, "payload budget in bits per LoRA value")
    quant_bits: int = option(4, "bits per stored factor value (4, 8 or 16), one scale per row; at "
                                "equal bytes 4-bit factors beat 8-bit on the zoo",
                             choices=(4, 8, 16))


# --- composition ---------------------------------------------------------------------------------
# N when experts are chosen by few-shot loss (chosen on the zoo's validation seeds), and
# LoraHub's N for its random draw.
DEFAULT_N = {"loss": 3, "random": 20}

SELECT_MODES = ("loss", "random")   # how compose() chooses N of the experts it is given
OBJECTIVES = ("paper", "lorahub")   # what its search minimises (compose/objective.py)
MIXES = ("factors", "product")      # how w combines the experts (compose/stacks.py)
OBJECTIVE_OPTIMIZER = {"paper": "Shiwa", "lorahub": "NGOpt"}  # searched with, unless one is named
WEIGHTINGS = ("search", "uniform")  # how w is set: learnt by the search, or 1/N (a baseline)
# Where the first search starts: the best chosen expert alone (the package's: +4.5 EM dense,
# +1.4 ComPEFT on the zoo's validation seeds, docs/results/protocols.md), or w = 0 (LoraHub's).
STARTS = ("best", "zero")

# budget "auto": the search's evaluations as a function of N, and the stop that ends it sooner
# (chosen on the zoo's validation seeds: docs/defaults.md). 40, LoraHub's budget, was chosen
# for N = 20; COBYLA (what Shiwa runs at these sizes) spends its first N + 1 evaluations on
# its initial simplex, so the rest of the budget scales with N + 1.
AUTO_BUDGET_PER_WEIGHT = 5   # budget auto = min(40, AUTO_BUDGET_PER_WEIGHT * (N + 1))
AUTO_BUDGET_CAP = 40
# With budget auto a search stops after N + AUTO_PATIENCE_EXTRA steps without improvement:
# a fixed 6 was right at N = 3 and cost 1.8 EM at N = 8, where N + 3 (11) loses nothing.
AUTO_PATIENCE_EXTRA = 3


def auto_budget(n_experts: int) -> int:
    """The evaluations per search that budget "auto" gives N experts."""
    return min(AUTO_BUDGET_CAP, AUTO_BUDGET_PER_WEIGHT * (n_experts + 1))


def auto_patience(n_experts: int) -> int:
    """The steps without improvement after which a search with budget "auto" stops."""
    return n_experts + AUTO_PATIENCE_EXTRA


@dataclass(frozen=True)
class ComposeConfig:
    """compose()'s settings: which experts, how their weights are searched, how the search runs
    the model. A bad value is refused when the config is made (a ValueError naming the field)."""
    select: str = option("loss", "how N experts are chosen when more are given: loss scores each "
                                 "alone on the examples and keeps the N lowest; random is "
                                 "LoraHub's seeded draw (the paper's protocol, with N = 20)")
    n_experts: int | None = option(None, "experts to compose (default "
                                         f"{DEFAULT_N['loss']} with select loss, "
                                         f"{DEFAULT_N['random']} with select random)")
    restarts: int = option(1, "searches from different starts (the first where start says); the "
                              "lowest few-shot loss is kept")
    seed: int = option(1, "seed of the expert draw and the optimizer")
    budget: int | str = option("auto", "optimizer evaluations per search; auto: "
                                       f"min({AUTO_BUDGET_CAP}, {AUTO_BUDGET_PER_WEIGHT}*(N+1)) "
                                       "for N experts, with the patience stop (LoraHub's: 40)")
    patience: int | None = option(None, "stop a search once its best loss has gone this many "
                                        "steps without improving by 0.1 percent (default: "
                                        f"N+{AUTO_PATIENCE_EXTRA} with budget auto; with a "
                                        "number "
                                        "given, the whole budget)")
    optimizer: str | None = option(None, "any nevergrad optimizer (default: Shiwa for the paper "
                                         "objective, NGOpt for lorahub)")
    objective: str = option("paper", "paper: mean cross-entropy over all target tokens; "
                                     "lorahub: the released code's loss scaling (and NGOpt)")
    l1: float = option(0.05, "weight of the regularizer l1 * mean|w| added to the loss")
    bounds: float = option(1.5, "every weight is searched in [-bounds, bounds]")
    batch_size: int | None = option(None, "examples per forward (default: all of them)")
    max_length: int | None = option(None, "tokens kept per example (default: the model's limit)")
    dtype: str | None = option("auto", "how the search scores candidates; auto: measured at the "
                                       "start (cached per machine and shape), the fastest of "
                                       "fp32, bf16 where native and int8 on a CPU whose loss "
                                       "agrees with fp32's. bf16 and int8 are copies of the "
                                       "linear layers: the composed model, its answers and the "
                                       "adapter are fp32 whatever is chosen")
    candidates_per_step: int = option(1, "candidates scored per forward (more helps on GPUs)")
    threads: int | None = option(None, "torch's intra-op threads while composing (default: one "
                                       "per core, but only the idle cores when other processes "
                                       "keep the machine busy); the caller's setting is "
                                       "restored after")
    mix: str = option("factors", "how w combines the experts: factors mixes each module's "
                                 "factors, A = sum w_i A_i and B = sum w_i B_i (LoraHub's); "
                                 "product adds their updates, sum w_i s B_i A_i, exactly: a "
                                 "LoRA of rank N*r")
    start: str = option("best", "where the first search starts: best is the chosen expert with "
                                "the lowest few-shot loss alone (w = 1 for it, 0 for the rest; "
                                "with select random each chosen expert is scored alone first, "
                                "one forward each); zero is w = 0 (LoraHub's)")
    weights: str = option("search", "search: w learnt by the optimizer on the examples; uniform: "
                                    "w = 1/N for the N chosen experts, no search (the baseline "
                                    "that says whether learning w pays)")

    def __post_init__(self):
        problem = _compose_problem(self)
        if problem:
            raise ValueError(problem)

    def resolved(self) -> "ComposeConfig":
        """The defaults that depend on other fields filled in: n_experts (DEFAULT_N[select]),
        budget and patience (budget auto: auto_budget(N) and auto_patience(N)) and optimizer
        (the objective's)."""
        n = DEFAULT_N[self.select] if self.n_experts is None else self.n_experts
        auto = self.budget == "auto"
        return dataclasses.replace(
            self, n_experts=n, budget=auto_budget(n) if auto else self.budget,
            patience=auto_patience(n) if auto and self.patience is None else self.patience,
            optimizer=self.optimizer or OBJECTIVE_OPTIMIZER[self.objective])

    @classmethod
    def help(cls, name: str) -> str:
        return cls.__dataclass_fields__[name].metadata["help"]


# The range of each count ComposeConfig holds: below 1 nothing runs, and the cap refuses a
# mistyped value (restarts 1e12 searched for ever, candidates_per_step 1e9 asks for terabytes)
# before any model is loaded. Each cap is far above what a run on the zoo or BBH uses.
COUNT_LIMITS = {  # field: (the most, what it counts)
    "n_experts": (1000, "experts to compose"),
    "restarts": (100, "searches"),
    "budget": (10_000, "optimizer evaluations per search, or 'auto'"),
    "patience": (10_000, "steps without improvement before a search stops"),
    "candidates_per_step": (256, "candidates per forward"),
    "batch_size": (65_536, "examples per forward"),
    "max_length": (1_000_000, "tokens per example"),
    "threads": (4096, "torch threads"),
}
OPTIONAL_COUNTS = ("n_experts", "patience", "batch_size", "max_length", "threads")  # None: default


def count_problem(name: str, value, optional: bool = False) -> str | None:
    """What is wrong with `value` for the count `name` of COUNT_LIMITS, as one line; None if
    nothing (`optional`: None means the default)."""
    most, what = COUNT_LIMITS[name]
    if value is None and optional or _integer(value) and 1 <= value <= most:
        return None
    return (f"{name} must be a positive integer of at most {most:,} ({what}), got {value!r}"
            + ("; or None for the default" if optional else ""))


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and float("-inf") < value < float("inf"))  # NaN fails both comparisons


def _torch_dtype(value) -> bool:
    import torch  # only asked of a value that is not a name: its caller has torch loaded
    return isinstance(value, torch.dtype)


def _compose_problem(c: ComposeConfig) -> str | None:
    """What is wrong with a composition config, as the one line that says the fix; None if
    nothing. The optimizer's name and the dtype's value are checked where they are resolved
    (nevergrad's registry, the device), still before any model is loaded."""
    if c.select not in SELECT_MODES:
        return f"unknown select {c.select!r}; use one of {', '.join(SELECT_MODES)}"
    if c.objective not in OBJECTIVES:
        return f"unknown objective {c.objective!r}; use one of {', '.join(OBJECTIVES)}"
    if c.mix not in MIXES:
        return f"unknown mix {c.mix!r}; use one of {', '.join(MIXES)}"
    if c.start not in STARTS:
        return f"unknown start {c.start!r}; use one of {', '.join(STARTS)}"
    if c.weights not in WEIGHTINGS:
        return f"unknown weights {c.weights!r}; use one of {', '.join(WEIGHTINGS)}"
    for name in COUNT_LIMITS:
        value = getattr(c, name)
        if name == "budget" and value == "auto":
            continue
        problem = count_problem(name, value, optional=name in OPTIONAL_COUNTS)
        if problem:
            return problem
    if not _integer(c.seed) or not 0 <= c.seed < 2 ** 32:
        return f"seed must be an integer in [0, 2**32), got {c.seed!r}"
    if not _number(c.l1) or c.l1 < 0:
        return f"l1 must be a finite number >= 0 (the regularizer's weight), got {c.l1!r}"
    if not _number(c.bounds) or c.bounds <= 0:
        return f"bounds must be a finite number > 0 (w lies in [-bounds, bounds]), got {c.bounds!r}"
    if c.optimizer is not None and (not isinstance(c.optimizer, str) or not c.optimizer):
        return (f"optimizer must be a nevergrad optimizer's name such as 'Shiwa', or None for "
                f"the objective's, got {c.optimizer!r}")
    if c.dtype is not None and not isinstance(c.dtype, str) and not _torch_dtype(c.dtype):
        return (f"dtype must be 'auto', 'bf16', 'fp32', 'int8', a torch.dtype or None (the "
                f"model's own), got {c.dtype!r}")
    return None


PAPER_COMPOSE = ComposeConfig(select="random", n_experts=20, budget=40,  # LoraHub's protocol
                              mix="factors", start="zero")
