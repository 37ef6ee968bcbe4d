"""Training the zoo: a tiny T5 instruction-tuned on the upstream tasks, then one LoRA expert
per upstream task, and exact-match reports for both.

Everything is seeded and runs on CPU in minutes; `scripts/build_zoo.py` is the command line.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from lorahub_compeft.eval.bbh import exact_match
from lorahub_compeft.eval.bbh import accuracy
from lorahub_compeft.io.models import generate as generate_answers
from lorahub_compeft.zoo.tasks import generate, get_task, task_names
from zoo_build.tokenizer import build_zoo_tokenizer

log = logging.getLogger(__name__)

# Seed offsets keep training, validation and reporting data apart for every build seed.
TRAIN_SEED, EVAL_SEED = 1_000, 2_000


@dataclass
class BaseSpec:
    """The base model and its multitask (Flan-style) training run."""
    d_model: int = 128
    d_ff: int = 512
    num_layers: int = 3
    num_heads: int = 4
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    examples_per_task: int = 12_000


@dataclass
class ExpertSpec:
    """One LoRA expert per upstream task.

    The expert should carry its task by itself rather than lean on the instruction, so
    that adding it to the base means "do this task" whatever the prompt says: a share
    `drop_instruction` of its training prompts has no instruction line and a share
    `swap_instruction` has another upstream task's instruction (never a held-out one).
    """
    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q", "k", "v", "o", "wi", "wo")
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    drop_instruction: float = 0.3
    swap_instruction: float = 0.3
    examples: int = 4_000


@dataclass
class BuildSpec:
    seed: int = 0
    base: BaseSpec = field(default_factory=BaseSpec)
    expert: ExpertSpec = field(default_factory=ExpertSpec)
    eval_examples: int = 200
    upstream: tuple[str, ...] | None = None  # default: every upstream task
    bbh_dir: str | None = None               # real BBH data, to cover its vocabulary


# ---------------------------------------------------------------------------- data
def encode(tokenizer, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    enc_in = tokenizer([e["input"] for e in examples])["input_ids"]
    enc_out = tokenizer([e["target"] for e in examples])["input_ids"]
    return list(zip(enc_in, enc_out))


def collate(pairs, pad_id: int = 0) -> dict[str, torch.Tensor]:
    n_in = max(len(a) for a, _ in pairs)
    n_out = max(len(b) for _, b in pairs)
    ids = torch.full((len(pairs), n_in), pad_id)
    labels = torch.full((len(pairs), n_out), -100)  # -100: ignored by the loss
    for i, (a, b) in enumerate(pairs):
        ids[i, :len(a)] = torch.tensor(a)
        labels[i, :len(b)] = torch.tensor(b)
    return {"input_ids": ids, "attention_mask": (ids != pad_id).long(), "labels": labels}


def batches(pairs, batch_size: int, rng: random.Random, group: int = 32):
    """An endless stream of batches. Examples are shuffled, then sorted by length within
    windows of `group` batches so that padding wastes little compute."""
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        window = batch_size * group
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = sorted(order[start:start + window], key=lambda i: len(pairs[i][0]))
            cut = [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
            rng.shuffle(cut)
            for idx in cut:
                if len(idx) == batch_size:
                    yield collate([pairs[i] for i in idx])


def _train(model, params, stream, steps: int, lr: float, warmup: int, desc: str):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # linear warmup, then cosine decay to 10% of lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup))
                                              * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    running = None
    for step in range(steps):
        loss = model(**next(stream)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("%s step %d/%d loss %.4f", desc, step + 1, steps, running)
    model.eval()
    return running


# ---------------------------------------------------------------------------- eval
def answer_accuracy(model, tokenizer, examples: list[dict], max_new_tokens: int = 8) -> float:
    """Fraction of examples whose greedy answer matches the target (the package's one
    exact match, `bbh.exact_match`)."""
    preds = generate_answers(model, tokenizer, [e["input"] for e in examples], max_new_tokens,
                             batch_size=100)
    return accuracy(preds, [e["target"] for e in examples], exact_match)


def eval_set(task: str, n: int, seed: int) -> list[dict]:
    return generate(task, n, seed=EVAL_SEED + seed)


# ---------------------------------------------------------------------------- build steps
def make_tokenizer(out_dir: Path, spec: BuildSpec):
    tok = build_zoo_tokenizer(bbh_dir=spec.bbh_dir, seed=spec.seed)
    tok.save_pretrained(out_dir)
    return tok


def train_base(out_dir: Path, tokenizer, spec: BuildSpec) -> Path:
    """Multitask instruction tuning from scratch on every upstream task, mixed uniformly."""
    b = spec.base
    torch.manual_seed(spec.seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=b.d_model, d_kv=b.d_model // b.num_heads,
        d_ff=b.d_ff, num_layers=b.num_layers, num_decoder_layers=b.num_layers,
        num_heads=b.num_heads, feed_forward_proj="relu", dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = T5ForConditionalGeneration(config)
    log.info("base: %d parameters", sum(p.numel() for p in model.parameters()))
    pairs = []
    for task in upstream_tasks(spec):
        pairs += encode(tokenizer, generate(task, b.examples_per_task, seed=TRAIN_SEED + spec.seed))
    stream = batches(pairs, b.batch_size, random.Random(spec.seed))
    loss = _train(model, list(model.parameters()), stream, b.steps, b.lr, b.warmup, "base")
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("base saved to %s (final loss %.4f)", out_dir, loss)
    return out_dir


def lora_config(spec: ExpertSpec) -> LoraConfig:
    return LoraConfig(task_type="SEQ_2_SEQ_LM", r=spec.r, lora_alpha=spec.alpha,
                      target_modules=list(spec.targets), lora_dropout=0.0, bias="none")


def load_base(base_dir: Path) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration.from_pretrained(base_dir).eval()


def expert_data(task: str, spec: BuildSpec) -> list[dict]:
    """The expert's training prompts: its own instruction, none, or another task's."""
    e = spec.expert
    n_drop = int(round(e.examples * e.drop_instruction))
    n_swap = int(round(e.examples * e.swap_instruction))
    seed = TRAIN_SEED + 100 + spec.seed
    data = generate(task, e.examples - n_drop - n_swap, seed=seed)
    data += generate(task, n_drop, seed=seed + 1, instruction="")
    others = [t for t in upstream_tasks(spec) if t != task]
    for i, other in enumerate(others):  # n_swap examples spread over the other tasks
        n = n_swap * (i + 1) // len(others) - n_swap * i // len(others)
        data += generate(task, n, seed=seed + 2 + i, instruction=get_task(other).instruction)
    return data


def train_expert(base_dir: Path, out_dir: Path, task: str, tokenizer, spec: BuildSpec) -> Path:
    e = spec.expert
    torch.manual_seed(spec.seed)
    model = get_peft_model(load_base(base_dir), lora_config(e))
    params = [p for p in model.parameters() if p.requires_grad]
    pairs = encode(tokenizer, expert_data(task, spec))
    stream = batches(pairs, e.batch_size, random.Random(f"{task}/{spec.seed}"), group=8)
    _train(model, params, stream, e.steps, e.lr, warmup=20, desc=f"expert {task}")
    model.save_pretrained(out_dir)
    return out_dir


def train_experts(base_dir: Path, out_dir: Path, tokenizer, spec: BuildSpec) -> dict[str, Path]:
    paths = {}
    for task in upstream_tasks(spec):
        start = time.time()
        paths[task] = train_expert(base_dir, out_dir / task, task, tokenizer, spec)
        log.info("expert %s trained in %.1fs", task, time.time() - start)
    return paths


def upstream_tasks(spec: BuildSpec) -> list[str]:
    return list(spec.upstream) if spec.upstream else task_names("upstream")


def report(base_dir: Path, expert_dirs: dict[str, Path], tokenizer, spec: BuildSpec) -> dict:
    """Exact match of the base on every task and of each expert on its own task."""
    base = load_base(base_dir)
    rows = {}
    for task in task_names():
        if get_task(task).split == "upstream" and task not in upstream_tasks(spec):
            continue
        data = eval_set(task, spec.eval_examples, spec.seed)
        row = {"split": get_task(task).split, "base": answer_accuracy(base, tokenizer, data)}
        if task in expert_dirs:
            model = PeftModel.from_pretrained(load_base(base_dir), expert_dirs[task]).eval()
            row["expert"] = answer_accuracy(model, tokenizer, data)
            bare = [{"input": "Q: " + x["input"].split("\n\nQ: ", 1)[1], "target": x["target"]}
                    for x in data]
            row["expert_no_instruction"] = answer_accuracy(model, tokenizer, bare)
        rows[task] = row
        log.info("EM %-26s %s", task, {k: (round(v, 3) if isinstance(v, float) else v)
                                        for k, v in row.items()})
    return rows


def build(out_dir: str | Path, spec: BuildSpec | None = None) -> dict:
    """Tokenizer, base, experts and report into `out_dir`; returns the paths. The layout:
    out_dir/base (model + tokenizer), out_dir/experts/<task> (PEFT dirs), out_dir/report.json.
    """
    spec = spec or BuildSpec()
    out = Path(out_dir).resolve()
    start = time.time()
    tok = make_tokenizer(out / "base", spec)
    # Reload, so training sees exactly what a user of the saved files gets.
    tok = AutoTokenizer.from_pretrained(out / "base")
    base_dir = train_base(out / "base", tok, spec)
    t_base = time.time() - start
    expert_dirs = train_experts(base_dir, out / "experts", tok, spec)
    t_experts = time.time() - start - t_base
    rows = report(base_dir, expert_dirs, tok, spec)
    timing = {"base_s": t_base, "experts_s": t_experts, "total_s": time.time() - start}
    (out / "report.json").write_text(json.dumps(
        {"spec": asdict(spec), "timing": timing, "em": rows}, indent=2) + "\n")
    log.info("build done in %.1f min", timing["total_s"] / 60)
    return {"base": base_dir, "experts": expert_dirs, "report": out / "report.json",
            "timing": timing}
