"""Greedy generation leaves the caller's tokenizer as it found it."""
from transformers import AutoModelForCausalLM, AutoTokenizer

import support
from lorahub_compeft.io.models import generate


def test_generate_restores_padding_side_and_pad_token(tmp_path):
    base = support.build_tiny_gpt2(tmp_path / "gpt2")
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    tok.padding_side, tok.pad_token = "right", None
    answers = generate(model, tok, ["say the word : red ?", "red"], max_new_tokens=2)
    assert len(answers) == 2
    assert tok.padding_side == "right" and tok.pad_token is None
