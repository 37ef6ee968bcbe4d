"""compose() on a model object (the runner's worker passes its model to every cell) wraps a
copy that shares the model's weights instead of a second copy of them, and leaves the
caller's model as it was: same modules, same values, same dtype."""
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import support
from lorahub_compeft.compose.composer import compose
from lorahub_compeft.io.models import shared_weights_copy


def base_weights(model) -> dict[str, torch.Tensor]:
    """The base's own parameters by their plain names (PEFT's `.base_layer` dropped)."""
    return {n.replace(".base_layer", "").removeprefix("base_model.model."): p
            for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compose_on_a_model_object_shares_its_weights(tiny_t5, experts, dtype):
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    types = {n: type(m) for n, m in base.named_modules()}
    result = compose(experts, support.constant_task("red"), model=base,
                     tokenizer=AutoTokenizer.from_pretrained(tiny_t5), budget=2, dtype=dtype,
                     progress=False)
    composed = base_weights(result.model)
    if dtype == "fp32":  # no second copy: the composed model's base weights are the caller's
        mine = base_weights(base)
        assert set(mine) <= set(composed)
        assert all(composed[n].data_ptr() == p.data_ptr() for n, p in mine.items())
    assert {n: type(m) for n, m in base.named_modules()} == types  # nothing wrapped
    assert not hasattr(base, "peft_config")
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32
               for k, v in base.state_dict().items())
    assert result.generate(["say the word : red ?"], max_new_tokens=2)


def test_the_copy_keeps_tied_weights_tied_and_owns_its_modules(tiny_t5):
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    base.encoder.embed_tokens = base.shared  # tied, as T5 ties them
    copy = shared_weights_copy(base)
    assert copy.encoder.embed_tokens.weight is copy.shared.weight
    assert copy.shared.weight is not base.shared.weight
    assert copy.shared.weight.data_ptr() == base.shared.weight.data_ptr()
    assert all(a is not b for a, b in zip(copy.modules(), base.modules()))
    copy.to(torch.bfloat16)
    assert base.shared.weight.dtype == torch.float32
