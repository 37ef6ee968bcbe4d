"""Real, tiny models and adapters for the tests: built from configs, trained for a few steps.

Nothing is faked: the base is a T5ForConditionalGeneration saved with save_pretrained, its
tokenizer a word-level `tokenizers` model saved as a PreTrainedTokenizerFast, and experts are
trained with peft and saved the way peft saves them.
"""
from __future__ import annotations

import json
import struct

from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import (GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, T5Config,
                          T5ForConditionalGeneration)

from zoo_build.tokenizer import build_tokenizer as word_level_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon red green blue cyan pink gray answer say the word echo").split()
SPECIALS = ["<pad>", "</s>", "<unk>"]


def build_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """The package's word-level tokenizer over the test vocabulary, each word with and
    without a leading space (after a newline a word has none)."""
    tok = word_level_tokenizer([" ".join(WORDS) + " : ? .", "\n".join(WORDS)])
    tok.save_pretrained(directory)
    return tok


def _save_tiny(directory: Path, seed: int, make_model) -> Path:
    """Tokenizer first (the model's vocab size comes from it), then a seeded random model."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(directory)
    torch.manual_seed(seed)
    make_model(len(tok)).save_pretrained(directory)
    return directory


def build_tiny_t5(directory: Path, seed: int = 0) -> Path:
    return _save_tiny(directory, seed, lambda vocab: T5ForConditionalGeneration(T5Config(
        vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
        num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        dropout_rate=0.0)))


def build_tiny_gpt2(directory: Path, seed: int = 0) -> Path:
    return _save_tiny(directory, seed, lambda vocab: GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
        eos_token_id=1, bos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)))


def constant_task(word: str, n: int = 8) -> list[dict]:
    """A task whose answer is always `word`: trivially learnable, distinct per expert."""
    return [{"input": f"say the word : {WORDS[i % 20]} ?", "target": word} for i in range(n)]


def train_expert(base_dir: Path, out_dir: Path, examples: list[dict], kind: str = "lora",
                 steps: int = 60, seed: int = 0, causal: bool = False, r: int = 4,
                 modules_to_save=None) -> Path:
    """Fine-tune a peft adapter on `examples` for a few Adam steps and save it."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = (AutoModelForCausalLM if causal else AutoModelForSeq2SeqLM).from_pretrained(base_dir)
    task_type = "CAUSAL_LM" if causal else "SEQ_2_SEQ_LM"
    targets = ["c_attn"] if causal else ["q", "v"]
    if kind == "lora":
        config = LoraConfig(task_type=task_type, r=r, lora_alpha=2 * r, target_modules=targets,
                            lora_dropout=0.0, modules_to_save=modules_to_save)
    else:
        config = IA3Config(task_type=task_type, target_modules=["k", "v", "wo"],
                           feedforward_modules=["wo"])
    model = get_peft_model(model, config)
    if causal:
        texts = [e["input"] + " " + e["target"] for e in examples]
        batch = tok(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch = tok([e["input"] for e in examples], return_tensors="pt", padding=True)
        labels = tok([e["target"] for e in examples], return_tensors="pt", padding=True)["input_ids"]
        labels = labels.masked_fill(labels == tok.pad_token_id, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(out_dir)
    return out_dir


def rewrite_safetensors_header(path: Path, mutate) -> None:
    """Edit a safetensors file's JSON header in place (offsets kept), as damage or a forger
    would; mutate(header) changes the parsed header dict."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def edit_v2_header(path: Path, mutate, sign: bool = True, allow_nan: bool = False) -> None:
    """Edit the decoded header of a v2 expert file; `sign` recomputes header_sha256 as a forger
    would (then only the reader's field checks stand in the way). The JSON is written in the
    canonical form, with NaN and Infinity if `allow_nan` (a forger's serializer may allow them)."""
    import base64
    import hashlib
    import zlib

    def edit(h):
        meta = h["__metadata__"]
        body = json.loads(zlib.decompress(base64.b85decode(meta["header"])))
        mutate(body)
        raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                         allow_nan=allow_nan).encode()
        meta["header"] = base64.b85encode(zlib.compress(raw)).decode()
        if sign:
            meta["header_sha256"] = hashlib.sha256(raw).hexdigest()
    rewrite_safetensors_header(path, edit)
