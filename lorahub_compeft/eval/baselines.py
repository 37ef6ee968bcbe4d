"""The baselines beside composition, as the runner's methods: do learnt weights pay?

    uniform    the experts `select` composes (the same N, the same choice by few-shot loss),
               averaged with w = 1/N, no search: compose(weights="uniform")
    single     the one expert with the lowest few-shot loss, alone (w = 1)
    arrow      training-free routing of each token to the top_k experts of the pool whose top
               singular directions it is closest to: PEFT's own Arrow (create_arrow_model)
    lora-tune  a fresh LoRA of the experts' shape (r, lora_alpha, target modules), trained with
               Adam on the few shots (LoraHub's Table 1)
    fft        the base itself fine-tuned with Adam on the few shots (Table 1), on a copy
    *-compeft  uniform, single and arrow over the pool's ComPEFT experts (default compression)

lora-tune and fft count their cost in forward+backward passes (row["passes"]); their steps and
learning rates were chosen on the zoo's validation split (scripts/baseline_grid.py).
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lorahub_compeft.config import CompeftOptions, ComposeConfig
from lorahub_compeft.eval.methods import (Answers, ComposeParams, CompressedExperts, Method,
                                          Params, Select, SelectParams, register)

SELECT = SelectParams()  # uniform and single choose as select does, with its defaults


# --- training-free: select's choice without the search ------------------------------------------
@dataclass(frozen=True)
class UniformParams(Params):
    """select's choice (the same N; budget sets how many candidates selection scores exactly,
    3/4 of it, as select's does), then w = 1/N."""
    preset: ClassVar[ComposeConfig] = ComposeConfig(weights="uniform")
    n_experts: int = SELECT.n_experts
    budget: int = SELECT.budget
    objective: str = SELECT.objective
    dtype: str = SELECT.dtype
    compose_config = ComposeParams.compose_config


@register
class Uniform(Select):
    """The N experts select would compose, averaged (dense experts)."""
    name, Params = "uniform", UniformParams


@dataclass(frozen=True)
class SingleParams(Params):
    """The expert with the lowest few-shot loss alone: select's choice with N = 1, w = 1."""
    preset: ClassVar[ComposeConfig] = ComposeConfig(weights="uniform", n_experts=1)
    budget: int = SELECT.budget
    objective: str = SELECT.objective
    dtype: str = SELECT.dtype
    compose_config = ComposeParams.compose_config


@register
class Single(Select):
    """The one expert of the pool with the lowest few-shot loss, alone (dense experts)."""
    name, Params = "single", SingleParams


@dataclass(frozen=True)
class DefaultCompression(Params):
    density: float = CompeftOptions().density
    alpha: float | str = CompeftOptions().alpha
    per_tensor: bool = CompeftOptions().per_tensor


@dataclass(frozen=True)
class UniformCompeftParams(UniformParams, DefaultCompression):
    pass


@register
class UniformCompeft(CompressedExperts, Uniform):
    name, Params = "uniform-compeft", UniformCompeftParams


@dataclass(frozen=True)
class SingleCompeftParams(SingleParams, DefaultCompression):
    pass


@register
class SingleCompeft(CompressedExperts, Single):
    name, Params = "single-compeft", SingleCompeftParams


# --- Arrow, through PEFT ------------------------------------------------------------------------
@dataclass(frozen=True)
class ArrowParams(Params):
    """PEFT's ArrowConfig: top_k experts per token, the routing softmax's temperature (PEFT's
    defaults). The power iteration for each expert's direction is seeded with the cell's seed."""
    top_k: int = 3
    temperature: float = 1.0

    @property
    def n_experts(self) -> int:  # plan() checks that the pool holds this many, before any cell
        return self.top_k


def arrow_model(base, adapter_dirs: list[str], params: ArrowParams, seed: int):
    """PEFT's Arrow router over the adapters, on a copy of `base`; a failure of PEFT's as one
    line that names it."""
    from peft import ArrowConfig, create_arrow_model
    config = ArrowConfig(top_k=params.top_k, router_temperature=params.temperature, rng_seed=seed)
    try:
        return create_arrow_model(copy.deepcopy(base), adapter_dirs, config).eval()
    except Exception as err:  # PEFT's checks: ranks, shapes, target modules, layer types
        why = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ValueError(f"arrow: PEFT's create_arrow_model cannot route these experts on this "
                         f"model ({type(err).__name__}: {why})") from err


@register
class Arrow(Method):
    """Every expert of the pool routed per token by PEFT's Arrow (dense experts)."""
    name, Params, uses_experts = "arrow", ArrowParams, True

    def adapter_dirs(self, experts, names: list[str], scratch: Path) -> tuple[list[str], int]:
        """A PEFT dir (or Hub id) per expert, and the bytes of the files read; an expert file
        is exported to a PEFT dir in `scratch`."""
        from lorahub_compeft.store.expert import load_expert
        dirs = [experts.dense(n) for n in names]
        dirs = [str(load_expert(d).export(scratch / f"file{i}")) if Path(d).is_file() else d
                for i, d in enumerate(dirs)]
        return dirs, sum(experts.dense_bytes(n) for n in names)

    def run(self, task, model, experts, seed):
        from lorahub_compeft.io.models import generate
        names = sorted(experts.identities)
        with tempfile.TemporaryDirectory(prefix="lorahub-compeft-arrow-") as scratch:
            dirs, nbytes = self.adapter_dirs(experts, names, Path(scratch))
            routed = arrow_model(model.model, dirs, self.params, seed)  # weights read now
        predictions = generate(routed, model.tokenizer, [task.prompt(r["input"]) for r in task.rows],
                               task.max_new_tokens, model.batch_size)
        return Answers(predictions, {"experts": [experts.identities[n] for n in names],
                                     "bytes_read": nbytes, "files_read": len(names)})


@dataclass(frozen=True)
class ArrowCompeftParams(ArrowParams, DefaultCompression):
    pass


@register
class ArrowCompeft(CompressedExperts, Arrow):
    """Arrow over the ComPEFT experts, each exported to a temporary PEFT dir."""
    name, Params = "arrow-compeft", ArrowCompeftParams

    def adapter_dirs(self, experts, names, scratch):
        from lorahub_compeft.store.expert import load_expert
        paths, nbytes = self.expert_files(experts, names)
        return [str(load_expert(p).export(scratch / str(i))) for i, p in enumerate(paths)], nbytes


# --- trained on the few shots -------------------------------------------------------------------
@dataclass(frozen=True)
class TuneParams(Params):
    """Adam steps on the few shots (all in one batch: one forward+backward each), its learning
    rate, and the torch seed of the training (a fresh LoRA's init, the model's dropout)."""
    steps: int = 1
    lr: float = 1e-3
    train_seed: int = 0

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer (Adam steps), got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"lr must be a number > 0 (Adam's learning rate), got {self.lr!r}")


def train(model, parameters: list, batches: list[dict], n_examples: int, params: TuneParams
          ) -> tuple[float, float]:
    """Adam on compose's "paper" objective (mean cross-entropy over all target tokens), in
    train mode; the few-shot loss before and after."""
    import torch

    from lorahub_compeft.compose.objective import few_shot_loss, task_loss
    before = few_shot_loss(model.eval(), batches, n_examples)
    optimizer = torch.optim.Adam(parameters, lr=params.lr)
    model.train()
    with torch.enable_grad():
        for _ in range(params.steps):
            optimizer.zero_grad()
            task_loss(model, batches, n_examples).backward()
            optimizer.step()
    return before, few_shot_loss(model.eval(), batches, n_examples)


class Tuned(Method):
    """A copy of the base (with what `trainable` adds) trained on the task's few shots, then
    answering. The worker's model is never changed: every cell trains its own copy."""
    Params = TuneParams

    def trainable(self, model, experts) -> tuple[object, list, dict]:
        """The model to train (a copy), the parameters Adam updates, and what the row records."""
        raise NotImplementedError

    def run(self, task, model, experts, seed):
        import torch

        from lorahub_compeft.compose.objective import default_max_length, tokenize_examples
        from lorahub_compeft.io.models import generate
        device = next(model.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.params.train_seed)
            tuned, parameters, info = self.trainable(model, experts)
            examples = task.few_shot_examples()
            batches = tokenize_examples(
                examples, model.tokenizer, bool(tuned.config.is_encoder_decoder),
                default_max_length(model.tokenizer, tuned), len(examples), device)
            before, after = train(tuned, parameters, batches, len(examples), self.params)
        predictions = generate(tuned, model.tokenizer, [task.prompt(r["input"]) for r in task.rows],
                               task.max_new_tokens, model.batch_size)
        return Answers(predictions, {**info, "passes": self.params.steps * len(batches),
                                     "zero_loss": before, "best_loss": after,
                                     "trained_parameters": sum(p.numel() for p in parameters)})


@dataclass(frozen=True)
class LoraTuneParams(TuneParams):  # the validation grid's best (docs/results/methods.md)
    steps: int = 50
    lr: float = 3e-4


def lora_shape(model, experts) -> dict:
    """The pool's experts' LoRA shape (they must agree: validate_experts), as LoraConfig's
    fields."""
    from lorahub_compeft.compose.experts import expert_handles, validate_experts
    handles = expert_handles([experts.dense(n) for n in sorted(experts.identities)])
    validate_experts(handles, model.name)
    config = handles[0].config
    task_type = config.get("task_type") or ("SEQ_2_SEQ_LM" if model.model.config.is_encoder_decoder
                                            else "CAUSAL_LM")
    return {"r": config["r"], "lora_alpha": config["lora_alpha"],
            "target_modules": sorted(config["target_modules"]),
            "use_rslora": bool(config.get("use_rslora")),
            "lora_dropout": float(config.get("lora_dropout") or 0.0), "task_type": task_type}


@register
class LoraTune(Tuned):
    """A fresh LoRA of the experts' shape trained on the few shots (LoraHub's Table 1)."""
    name, Params, uses_experts = "lora-tune", LoraTuneParams, True

    def trainable(self, model, experts):
        from peft import LoraConfig, get_peft_model
        shape = lora_shape(model, experts)
        tuned = get_peft_model(copy.deepcopy(model.model), LoraConfig(**shape))
        return tuned, [p for p in tuned.parameters() if p.requires_grad], {"lora": shape}


@dataclass(frozen=True)
class FftParams(TuneParams):  # the validation grid's best (docs/results/methods.md)
    steps: int = 30
    lr: float = 1e-4


@register
class Fft(Tuned):
    """Every parameter of (a copy of) the base fine-tuned on the few shots (LoraHub's Table 1)."""
    name, Params = "fft", FftParams

    def trainable(self, model, experts):
        tuned = copy.deepcopy(model.model)
        for p in tuned.parameters():
            p.requires_grad_(True)
        return tuned, list(tuned.parameters()), {}
