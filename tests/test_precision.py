"""dtype "auto" by measurement (probe.py), its cache, and the fp32 model the user gets whatever
precision the search scored in. Every path is forced, so that all run on any CPU: the CPU's
flags are patched both ways and the probe's layer timings replaced where a test needs a
given precision to win."""
import json
import math

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import support
from lorahub_compeft.compose import precision as precisions
from lorahub_compeft.compose import probe
from lorahub_compeft.compose.composer import compose
from lorahub_compeft.compose.precision import CastLinear, Int8Linear
from lorahub_compeft.io.models import generate

WORDS = ("red", "green", "blue")
PROMPTS = ["say the word : alpha ?", "say the word : kappa ?"]
XEON = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni"})
EPYC = frozenset({"avx2", "fma"})
INT8 = precisions.INT8


@pytest.fixture(scope="module")
def experts(tiny_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision-experts")
    return [str(support.train_expert(tiny_t5, root / w, support.constant_task(w), steps=30,
                                     seed=i)) for i, w in enumerate(WORDS)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test measures afresh: its own cache file, an empty process cache."""
    monkeypatch.setenv("LORAHUB_COMPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(probe, "_memory", {})
    return tmp_path / "cache" / "precision.json"


def fake_layer_times(monkeypatch, seconds: dict):
    """The probe's layer timings replaced: seconds[name] per forward (None: the model's own)."""
    calls = []

    def timed(kinds, low, sync):
        calls.append(low)
        return seconds[low]
    monkeypatch.setattr(probe, "_time_layers", timed)
    return calls


def compose_green(experts, **options):
    return compose(experts, support.constant_task("green"), budget=6, seed=1, progress=False,
                   **options)


FORCED = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}, "int8": {"dtype": "int8"},
          "auto-bf16": {}, "auto-int8": {}, "auto-fp32": {}}


@pytest.mark.parametrize("path", list(FORCED))
def test_the_user_gets_fp32_whatever_the_search_ran(tiny_t5, experts, path, tmp_path,
                                                    monkeypatch):
    """result.model, generate (compose --eval), merged_model and the saved adapter are fp32
    and agree with the saved adapter loaded on a fresh fp32 base, in every precision the search
    can run: forced, or chosen by auto on a CPU with native bf16 (the Xeon of issue 20)."""
    monkeypatch.setattr(precisions, "cpu_flags", lambda: XEON)
    if path.startswith("auto"):
        winner = {"auto-bf16": "bfloat16", "auto-int8": INT8, "auto-fp32": None}[path]
        fake_layer_times(monkeypatch, {None: 1.0, "bfloat16": 2.0, INT8: 2.0, winner: 0.0})
        monkeypatch.setattr(probe, "PROBE_RTOL", math.inf)  # whatever its loss: this is about the model
    result = compose_green(experts, **FORCED[path])
    expected = {"fp32": "float32", "bf16": "bfloat16", "int8": INT8, "auto-bf16": "bfloat16",
                "auto-int8": INT8, "auto-fp32": "float32"}[path]
    assert result.precision == expected
    assert (result.precision_measured or {}).get("chosen", expected) == expected
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    assert result.flat.dtype == torch.float32
    assert not any(isinstance(m, (CastLinear, Int8Linear)) for m in result.model.modules())
    assert all(t.dtype == torch.float32 for t in result.lora_tensors().values())
    merged = result.merged_model()
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    out = result.save_adapter(tmp_path / "adapter")
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    fresh = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out).eval()
    assert {p.dtype for p in fresh.parameters()} == {torch.float32}
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    labels = tok(["green", "green"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(result.model(**batch, labels=labels).logits,
                                   fresh(**batch, labels=labels).logits)
    assert result.generate(PROMPTS) == generate(fresh, tok, PROMPTS) == generate(merged, tok, PROMPTS)
    saved = json.loads((out / "composition.json").read_text())
    assert saved["precision"] == expected
    assert saved["precision_measured"] == result.precision_measured


@pytest.mark.parametrize("dtype", ["auto", "int8", "bf16"])
def test_a_model_object_keeps_its_dtype(tiny_t5, experts, dtype, monkeypatch):
    """A model the caller passes comes back in its own dtype (a copy; theirs untouched)."""
    monkeypatch.setattr(precisions, "cpu_flags", lambda: XEON)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).to(torch.bfloat16)
    result = compose_green(experts, model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_t5),
                           dtype=dtype)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if dtype == "auto":  # bf16 copies of a bf16 model would change nothing: not measured
        assert set(result.precision_measured["candidates"]) == {"bfloat16", INT8}
    fp32 = compose_green(experts, model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_t5),
                         dtype="fp32")  # asked for: converted
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("flags", [EPYC, XEON], ids=["epyc", "xeon"])
def test_auto_keeps_the_fastest_precision_whose_loss_agrees(experts, flags, monkeypatch):
    """The fastest precision predicted at least PROBE_MARGIN faster is checked against fp32's
    loss at w = 0; one that disagrees is dropped for the next; fp32 always qualifies."""
    monkeypatch.setattr(precisions, "cpu_flags", lambda: flags)
    lows = ["bfloat16", INT8] if flags == XEON else [INT8]
    # int8 fastest: checked and kept (its loss within the tolerance of fp32's)
    fake_layer_times(monkeypatch, {None: 1.0, "bfloat16": 0.5, INT8: 0.0})
    monkeypatch.setattr(probe, "PROBE_RTOL", 0.5)
    result = compose_green(experts)
    measured = result.precision_measured
    assert result.precision == measured["chosen"] == INT8 and not measured["cached"]
    assert set(measured["candidates"]) == {"float32", *lows}
    fp32_loss = measured["candidates"]["float32"]["loss"]
    assert measured["candidates"][INT8]["loss"] == pytest.approx(fp32_loss, rel=0.5)
    assert measured["candidates"][INT8]["loss"] != fp32_loss  # really through int8 copies
    assert result.zero_loss == pytest.approx(measured["candidates"][INT8]["loss"], rel=1e-6)
    # no lower precision agrees: each is checked in order of speed, fp32 kept
    monkeypatch.setattr(probe, "_memory", {})
    monkeypatch.setattr(probe, "PROBE_RTOL", 0.0)
    probe.cache_file().unlink()
    result = compose_green(experts)
    assert result.precision == "float32"
    assert all("loss" in result.precision_measured["candidates"][low] for low in lows)
    # a gain under the margin is not worth the error: not even checked
    monkeypatch.setattr(probe, "_memory", {})
    probe.cache_file().unlink()
    fake_layer_times(monkeypatch, {None: 1.0, "bfloat16": 1.0, INT8: 1.0 - 1e-3})
    result = compose_green(experts)
    assert result.precision == "float32"
    assert "loss" not in result.precision_measured["candidates"][INT8]


def test_real_measurement_on_the_tiny_model(experts, monkeypatch):
    """Unpatched timings: the tiny model spends its forward outside its linear layers, so no
    lower precision saves PROBE_MARGIN of it; the record holds real, positive timings."""
    monkeypatch.setattr(precisions, "cpu_flags", lambda: XEON)
    result = compose_green(experts)
    measured = result.precision_measured
    assert result.precision == measured["chosen"] == "float32"
    for name in ("float32", "bfloat16", INT8):
        assert measured["candidates"][name]["linear_ms"] > 0
    assert measured["tolerance"] == probe.PROBE_RTOL and measured["margin"] == probe.PROBE_MARGIN


def test_the_choice_is_cached_in_the_process_and_on_disk(experts, own_cache, monkeypatch):
    """A second composition of the same shapes measures nothing, from the process or the file;
    the probe's seconds are booked as timings["probe"], apart from setup; a damaged file or
    entry is ignored with a warning, measured again and rewritten."""
    monkeypatch.setattr(precisions, "cpu_flags", lambda: EPYC)
    calls = fake_layer_times(monkeypatch, {None: 1.0, INT8: 0.0})
    monkeypatch.setattr(probe, "PROBE_RTOL", 0.5)
    first = compose_green(experts)
    assert first.precision == INT8 and calls == [None, INT8]
    assert first.timings["probe"] == first.precision_measured["seconds"] > 0
    entries = json.loads(own_cache.read_text())["entries"]
    assert [e["chosen"] for e in entries.values()] == [INT8]
    # the process's cache
    again = compose_green(experts)
    assert calls == [None, INT8] and again.precision == INT8
    assert again.precision_measured["cached"] and again.losses == first.losses
    assert again.timings["probe"] < first.timings["probe"]
    # the file's, in a new process (the process cache emptied)
    monkeypatch.setattr(probe, "_memory", {})
    again = compose_green(experts)
    assert calls == [None, INT8] and again.precision_measured["cached"]
    assert again.losses == first.losses
    # another batch shape is another key
    compose(experts, support.constant_task("green", 5), budget=2, progress=False)
    assert calls == [None, INT8] * 2 and len(json.loads(own_cache.read_text())["entries"]) == 2
    # damaged: the file, then one entry's fields
    (key, entry), = [(k, e) for k, e in entries.items()]
    damage = {"not JSON": lambda: "{not json",
              "chose 'int3'": lambda: {**entry, "chosen": "int3"},
              "timings are not finite": lambda: {**entry, "candidates": {
                  **entry["candidates"], INT8: {"linear_ms": float("nan"), "forward_ms": 1.0}}},
              "recorded for another key": lambda: {**entry, "key": {**entry["key"], "k": 9}},
              "not this machine's precisions": lambda: {**entry, "candidates": {
                  "float32": entry["candidates"]["float32"]}}}
    for problem, damaged in damage.items():
        value = damaged()
        own_cache.write_text(value if isinstance(value, str) else json.dumps(
            {"version": probe.CACHE_VERSION, "entries": {key: value}}))
        monkeypatch.setattr(probe, "_memory", {})
        before = len(calls)
        with pytest.warns(UserWarning, match=problem if problem != "not JSON" else "damaged"):
            result = compose_green(experts)
        assert len(calls) == before + 2 and not result.precision_measured["cached"]
        assert json.loads(own_cache.read_text())["entries"][key]["chosen"] == INT8  # rewritten


def test_an_unwritable_cache_costs_only_a_measurement(experts, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LORAHUB_COMPEFT_CACHE", str(blocker / "cache"))  # under a plain file
    result = compose_green(experts)
    assert result.precision_measured is not None and np.isfinite(result.best_loss)
