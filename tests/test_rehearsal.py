"""The rehearsal at a small shape (CI): a cache in the real layout, LoraHub-format experts,
`reproduce` run offline through the command line, and per method its figures."""
import re

import pytest

from conftest import BBH
from rehearse_reproduction import lorahub_state_dict, main, t5_config

pytestmark = pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")


def test_small_rehearsal_prints_figures_per_method(tmp_path, capfd):
    methods = ["zeroshot", "icl", "lorahub", "compeft", "select"]
    assert main(["--shape", "small", "--experts", "3", "-n", "2", "--budget", "2",
                 "--max-eval", "2", "--methods", ",".join(methods),
                 "--workdir", str(tmp_path / "rehearsal")]) == 0
    out = capfd.readouterr().out
    assert "$ lorahub-compeft reproduce --cache" in out
    rows = {m.group(1): m.groups() for m in
            re.finditer(r"^\| (\S+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\S+) \| ([\d.]+) \| "
                        r"([\d.]+) \|$", out, re.M)}
    assert list(rows) == methods
    assert all(float(r[5]) > 0 and float(r[6]) > 0 for r in rows.values())  # RSS, hours
    assert rows["lorahub"][4] == "2" and rows["zeroshot"][4] == "-"  # the search's forwards
    assert "Exact match" in out  # reproduce's report, printed at its end


def test_the_full_shape_is_flan_t5_large():
    config = t5_config("flan-t5-large")
    assert (config.d_model, config.d_ff, config.num_layers, config.num_decoder_layers,
            config.num_heads, config.d_kv, config.vocab_size) == (1024, 2816, 24, 24, 16, 64, 32128)
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"
    # flan-t5-large's config.json says tie_word_embeddings false: transformers 5 reads that as
    # T5 v1.1's "no decoder output scaling" (and ties the weights whatever the config says)
    assert config.scale_decoder_outputs is False
    tensors = lorahub_state_dict("small", seed=0)
    assert len(tensors) == 2 * 2 * (2 + 2 * 2)  # A and B, q and v, 2 encoder + 2x2 decoder
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight",
                                                                 ".lora_B.weight"))
               for k in tensors)
