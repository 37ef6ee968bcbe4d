"""Batched greedy generation and exact-match scoring, for seq2seq and causal LMs alike."""
from __future__ import annotations

import torch


def load_model(name: str, dtype: torch.dtype | None = None):
    """A base model and its tokenizer by name or path: seq2seq when the config says
    encoder-decoder (T5, Flan-T5), a causal LM otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    config = AutoConfig.from_pretrained(name)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(name, **kwargs), AutoTokenizer.from_pretrained(name)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16,
             batch_size: int = 32, max_length: int | None = None) -> list[str]:
    """Greedy answers to `prompts`, decoded without special tokens and stripped."""
    model.eval()
    is_causal = not getattr(model.config, "is_encoder_decoder", False)
    if not is_causal:
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_length, False)
    # Causal LMs pad on the left (new tokens must follow each prompt directly) and need a pad
    # token: set both for this call only, and leave the caller's tokenizer as it was.
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_length, True)
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_length, is_causal):
    device = next(model.parameters()).device
    # Batch prompts of similar length together (less padding), answer in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          truncation=max_length is not None, max_length=max_length).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=tokenizer.pad_token_id)
        if is_causal:
            out = out[:, batch["input_ids"].shape[1]:]
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
            answers[i] = text.strip()
    return answers


