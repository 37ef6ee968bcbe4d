"""The forward path: dtype choice, K candidates per forward against K separate forwards."""
import numpy as np
import pytest
import torch

import support
from lorahub_compeft.compose import precision as precisions
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft.compose.composer import compose
from lorahub_compeft.store.expert import compress
from lorahub_compeft.compose.precision import (CastLinear, Int8Linear, LinearCopies, Precision,
                                               lower_precisions, native_bf16, resolve_precision)
from lorahub_compeft.compose.scoring import Scorer
from lorahub_compeft.compose.objective import (encoder_batches, few_shot_loss,
                                               pack_encoder_inputs, packing_pays, packs_encoder,
                                               tokenize_examples)
from lorahub_compeft.compose.search import optimizer_class

WORDS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def experts(tiny_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("forward-experts")
    return [str(support.train_expert(tiny_t5, root / w, support.constant_task(w), steps=30,
                                     seed=i)) for i, w in enumerate(WORDS)]


def scorers(result, examples, objective, per_forward, batch_size=None):
    model = result.model
    batches = tokenize_examples(examples, result.tokenizer, model.config.is_encoder_decoder,
                                32, batch_size or len(examples), result.flat.device)
    one = Scorer(model, result.stack, result.flat, batches, len(examples), objective)
    many = Scorer(model, result.stack, result.flat, batches, len(examples), objective,
                  per_forward=per_forward)
    return one, many


# Mixed lengths, so that padding differs between rows and batches.
EXAMPLES = support.constant_task("green", 3) + [
    {"input": "say the word : alpha beta gamma delta ?", "target": "blue red"},
    {"input": "echo", "target": "pink"}]


@pytest.mark.parametrize("objective,batch_size", [("paper", None), ("lorahub", 2)])
def test_k_candidates_per_forward_match_k_forwards(experts, objective, batch_size):
    result = compose(experts, EXAMPLES, budget=1, progress=False)
    one, many = scorers(result, EXAMPLES, objective, per_forward=3, batch_size=batch_size)
    weights = np.random.default_rng(0).uniform(-1.5, 1.5, size=(5, len(experts)))  # 3 + 2
    separate = one.score_candidates(weights)
    batched = many.score_candidates(weights)
    np.testing.assert_allclose(batched, separate, rtol=1e-5)
    assert len(set(np.round(separate, 6))) == 5  # the candidates really differ
    # The PEFT model's own LoRA is back on after a batched forward.
    assert one.loss(weights[0]) == pytest.approx(separate[0], rel=1e-6)


def test_k_candidates_with_compeft_experts_and_a_causal_lm(tmp_path):
    base = support.build_tiny_gpt2(tmp_path / "gpt2")
    dirs = [support.train_expert(base, tmp_path / w, support.constant_task(w), steps=20,
                                 causal=True) for w in ("red", "green")]
    experts = [compress(d, PAPER_COMPEFT, density=0.5) for d in dirs]
    result = compose(experts, EXAMPLES, budget=1, progress=False)
    one, many = scorers(result, EXAMPLES, "paper", per_forward=4)
    weights = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, -0.4]])
    np.testing.assert_allclose(many.score_candidates(weights), one.score_candidates(weights),
                               rtol=1e-5)


def test_scoring_each_expert_alone(experts):
    """Expert selection's use: one forward scores every expert on its own."""
    examples = support.constant_task("blue")
    result = compose(experts, examples, budget=1, progress=False)
    _, many = scorers(result, examples, "paper", per_forward=len(experts))
    losses = many.score_candidates(np.eye(len(experts)))
    assert np.argmin(losses) == WORDS.index("blue")
    assert many.timings["forward"] > 0 and many.timings["mix"] > 0


def test_k1_search_is_the_plain_ask_tell_loop(experts):
    """candidates_per_step=1 evaluates the same points with the same losses as one
    ask/evaluate/tell per step on the PEFT model (the path before K existed)."""
    import nevergrad as ng
    examples = support.constant_task("red")
    result = compose(experts, examples, budget=8, seed=3, start="zero", progress=False)
    batches = encoder_batches(result.model,  # as compose prepares them
                              tokenize_examples(examples, result.tokenizer, True, 32,
                                                len(examples), "cpu"))
    param = ng.p.Array(init=np.zeros(len(experts)), lower=-1.5, upper=1.5)
    param.random_state = np.random.RandomState(3)
    opt = optimizer_class("Shiwa")(parametrization=param, budget=8, num_workers=1)
    losses = []
    for _ in range(8):
        candidate = opt.ask()
        result.stack.mix(candidate.value, out=result.flat)
        losses.append(few_shot_loss(result.model, batches, len(examples))
                      + 0.05 * float(np.mean(np.abs(candidate.value))))
        opt.tell(candidate, losses[-1])
    assert result.losses == pytest.approx(losses, rel=1e-9)


def test_compose_with_k_candidates(experts):
    result = compose(experts, support.constant_task("green"), budget=10, seed=1,
                     candidates_per_step=4, progress=False)
    assert len(result.losses) == 10 and result.timings["forwards"] == 3
    assert result.best_loss < result.zero_loss
    assert max(result.weights, key=lambda n: abs(result.weights[n])) == "green"


def test_bad_candidates_per_step(experts):
    with pytest.raises(ValueError, match="candidates_per_step must be a positive integer"):
        compose(experts, EXAMPLES, budget=1, candidates_per_step=0, progress=False)
    with pytest.raises(ValueError, match="loss_fn scores one model at a time"):
        compose(experts, EXAMPLES, budget=1, candidates_per_step=2,
                loss_fn=lambda model, batch: 0.0, progress=False)


def test_auto_measures_what_the_hardware_runs(tiny_t5, monkeypatch):
    """auto measures bf16 only where the CPU lists native bf16 and int8 where torch has int8
    kernels; the forced precisions resolve whatever the CPU, and their errors name the fix."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration
    model = get_peft_model(T5ForConditionalGeneration.from_pretrained(tiny_t5),
                           LoraConfig(r=2, target_modules=["q", "v"]))
    cpu = torch.device("cpu")
    monkeypatch.setattr(precisions, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not native_bf16("cpu")
    assert lower_precisions(cpu, model) == ["int8"]
    for flags in ({"avx2", "avx512_bf16"}, {"amx_bf16"}):
        monkeypatch.setattr(precisions, "cpu_flags", lambda: frozenset(flags))
        assert native_bf16("cpu") and lower_precisions(cpu, model) == ["bfloat16", "int8"]
        # a model given in bf16 has nothing to gain from bf16 copies
        assert lower_precisions(cpu, model.to(torch.bfloat16)) == ["int8"]
        model.float()
    monkeypatch.setattr(precisions, "int8_engine", lambda: None)  # a torch without int8 kernels
    assert lower_precisions(cpu, model) == ["bfloat16"]
    with pytest.raises(ValueError, match="int8 CPU kernels, which this torch build lacks"):
        resolve_precision("int8", "cpu")
    assert resolve_precision("auto", "cpu") == Precision(torch.float32, auto=True)
    assert resolve_precision("bf16", "cpu") == Precision(torch.float32, low="bfloat16")
    assert resolve_precision(torch.bfloat16, "cpu") == resolve_precision("bf16", "cpu")
    assert resolve_precision("fp32", "cpu") == Precision(torch.float32, convert=True)
    assert resolve_precision(None, "cpu") == Precision(None)
    with pytest.raises(ValueError, match="a cuda device cannot run"):
        resolve_precision("int8", "cuda")
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        resolve_precision("int3", "cpu")


def test_bf16_mixes_in_fp32_and_saves_fp32(experts, tmp_path):
    result = compose(experts, support.constant_task("blue"), budget=6, dtype="bf16",
                     candidates_per_step=3, progress=False)
    assert result.precision == "bfloat16"
    assert result.flat.dtype == torch.float32  # the model stays fp32: bf16 is copies of its layers
    copies = LinearCopies(result.model, "bfloat16")
    assert copies.swaps and all(isinstance(c, CastLinear) and c.weight.dtype == torch.bfloat16
                                for *_, c in copies.swaps)
    assert np.isfinite(result.losses).all()
    tensors = result.lora_tensors()
    assert all(t.dtype == torch.float32 for t in tensors.values())
    w = np.array([result.weights[n] for n in result.experts])
    expected = result.stack.layout.unflatten(result.stack.mix(w))
    for key, value in tensors.items():
        torch.testing.assert_close(value, expected[key])


def test_compose_command_threads_dtype_and_k(experts, tmp_path, monkeypatch, capsys):
    import json
    import os

    from lorahub_compeft.cli import main
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored after the test
    examples = tmp_path / "task.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in support.constant_task("red")))
    try:
        assert main(["compose", "--experts", *experts, "--examples", str(examples), "--out",
                     str(tmp_path / "out"), "--budget", "4", "--threads", "2", "--dtype", "fp32",
                     "--candidates-per-step", "2", "--quiet"]) == 0
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(1)
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert "best loss" in capsys.readouterr().out
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            main(["compose", "--experts", *experts, "--examples", str(examples), "--out",
                  str(tmp_path / "other"), "--threads", bad])
        assert "--threads: expected a positive integer" in capsys.readouterr().err


def test_threads_follow_the_idle_cores_without_threads(monkeypatch):
    import os

    from lorahub_compeft.cli import options as cli
    from lorahub_compeft.io import threads
    from lorahub_compeft.io.threads import idle_cores  # the rule compose() applies too
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "cpu_ticks", lambda: None)  # the load average's path
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
        assert idle_cores() is None  # quiet: torch's choice stays
        monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
        assert idle_cores() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
        assert idle_cores() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0))
        cli.apply_threads(type("Args", (), {"threads": None})())
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(1)


def test_local_workers_share_the_cores_without_threads(monkeypatch):
    import os

    from lorahub_compeft.cli import options as cli
    from lorahub_compeft.io import threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})

    def threads_for(busy, **args):
        monkeypatch.setattr(threads, "busy_elsewhere", lambda: busy)
        torch.set_num_threads(4)
        cli.apply_threads(type("Args", (), {"threads": None, "workers": 1, "backend": "local",
                                            **args})())
        assert os.environ["OMP_NUM_THREADS"] == str(torch.get_num_threads())  # what workers read
        return torch.get_num_threads()
    try:
        assert threads_for(0.0, workers=2) == 2  # quiet: 4 cores, 2 each
        assert threads_for(0.0, workers=3) == 1
        assert threads_for(0.0, workers=8) == 1  # at least one
        assert threads_for(1.0, workers=2) == 1  # 3 idle cores, 1 each
        assert threads_for(0.0, workers=2, threads=3) == 3  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(4)
        cli.apply_threads(type("Args", (), {"threads": None, "workers": 2, "backend": "ray"})())
        assert torch.get_num_threads() == 4  # Ray sets its actors' threads (num_cpus=1 each)
    finally:
        torch.set_num_threads(1)


def test_int8_scores_through_int8_copies_and_returns_the_fp32_model(experts):
    """dtype="int8": the search's losses come from int8 copies of the base's linear layers
    (close to fp32's, not equal), LoRA factors, the output embeddings and T5's `wo` stay fp32,
    and the returned model holds only the fp32 layers."""
    examples = support.constant_task("green")
    int8 = compose(experts, examples, budget=10, seed=1, dtype="int8", progress=False)
    fp32 = compose(experts, examples, budget=10, seed=1, dtype="fp32", progress=False)
    assert (int8.precision, fp32.precision) == ("int8", "float32")
    assert int8.zero_loss == pytest.approx(fp32.zero_loss, rel=0.05)
    assert int8.zero_loss != fp32.zero_loss
    assert max(int8.weights, key=lambda n: abs(int8.weights[n])) == "green"
    assert not any(isinstance(m, Int8Linear) for m in int8.model.modules())
    quantized = LinearCopies(int8.model, "int8")
    with quantized.active():
        assert sum(isinstance(m, Int8Linear) for m in int8.model.modules()) == len(quantized.swaps)
    names = {f"{id(parent)}.{attr}" for parent, attr, _, _ in quantized.swaps}
    named = {f"{id(parent)}.{attr}": f"{pname}.{attr}" for pname, parent in int8.model.named_modules()
             for attr, _ in parent.named_children()}
    swapped = sorted(named[n] for n in names)
    assert any(n.endswith(".q.base_layer") for n in swapped)  # LoRA-wrapped layers: their base
    assert any(n.endswith(".wi") for n in swapped)
    assert not any("lora_" in n or n.endswith(".wo") or "lm_head" in n for n in swapped)
    # The int8 loss of the learnt weights, measured again, is the search's best loss.
    w = np.array([int8.weights[n] for n in int8.experts])
    one, _ = scorers(int8, examples, "paper", per_forward=1)
    one_int8 = Scorer(one.model, one.stack, one.flat, one.batches, one.n_examples, "paper",
                      copies=quantized)
    assert one_int8.loss(w) + 0.05 * np.mean(np.abs(w)) == pytest.approx(int8.best_loss, rel=1e-6)
    assert one.loss(w) != pytest.approx(one_int8.loss(w), rel=1e-7)  # fp32 again outside


def test_int8_k_candidates_match_k_forwards(experts):
    """Close, not equal: an int8 layer quantizes its whole input with one scale, and K
    candidates in one forward share it."""
    result = compose(experts, EXAMPLES, budget=1, dtype="int8", progress=False)
    one, many = scorers(result, EXAMPLES, "paper", per_forward=3)
    quantized = LinearCopies(result.model, "int8")
    one = Scorer(one.model, one.stack, one.flat, one.batches, one.n_examples, "paper",
                 copies=quantized)
    many = Scorer(many.model, many.stack, many.flat, many.batches, many.n_examples, "paper",
                  per_forward=3, copies=quantized)
    weights = np.random.default_rng(1).uniform(-1.5, 1.5, size=(4, len(experts)))
    batched = many.score_candidates(weights)
    np.testing.assert_allclose(batched, one.score_candidates(weights), rtol=0.05)
    assert len(set(np.round(batched, 4))) == 4  # each candidate's LoRA term was added


@pytest.mark.parametrize("objective,batch_size", [("paper", None), ("lorahub", 2)])
def test_packed_encoder_inputs_give_the_padded_losses(experts, objective, batch_size):
    """T5's examples packed into one row (each attending to itself) score as the padded rows
    do, one candidate or K per forward, and the packed row holds no padding."""
    result = compose(experts, EXAMPLES, budget=1, progress=False)
    assert packs_encoder(result.model)
    padded = tokenize_examples(EXAMPLES, result.tokenizer, True, 32, batch_size or len(EXAMPLES),
                               "cpu")
    packed = [pack_encoder_inputs(b) for b in padded]
    assert [p["packed_ids"].shape[1] for p in packed] == [int(b["attention_mask"].sum()) for b in padded]
    assert sum(p["packed_ids"].shape[1] for p in packed) < sum(b["input_ids"].numel() for b in padded)
    weights = np.random.default_rng(2).uniform(-1.5, 1.5, size=(4, len(experts)))
    losses = {}
    for name, batches in (("padded", padded), ("packed", packed)):
        for k in (1, 4):
            scorer = Scorer(result.model, result.stack, result.flat, batches, len(EXAMPLES),
                            objective, per_forward=k)
            losses[name, k] = scorer.score_candidates(weights)
    for key, value in losses.items():
        np.testing.assert_allclose(value, losses["padded", 1], rtol=1e-5, err_msg=str(key))


def test_selection_scores_k_experts_per_forward(experts, monkeypatch):
    """select="loss" with candidates_per_step=K scores the candidates K per forward through the
    search's Scorer: the same scores and choice as one forward each."""
    import importlib
    session_module = importlib.import_module("lorahub_compeft.compose.session")
    examples = support.constant_task("blue")
    one = compose(experts, examples, n_experts=1, select="loss", budget=4, progress=False)
    batched = []

    class Spy(Scorer):
        def score_candidates(self, weights):
            batched.append((self.per_forward, len(weights)))
            return super().score_candidates(weights)
    monkeypatch.setattr(session_module, "Scorer", Spy)
    many = compose(experts, examples, n_experts=1, select="loss", budget=4,
                   candidates_per_step=2, progress=False)
    assert one.experts == many.experts == ["blue"]
    assert set(many.selection.scores) == set(WORDS)
    assert batched[0] == (2, 3)  # the three experts alone, two per forward
    for name, value in one.selection.scores.items():
        assert many.selection.scores[name] == pytest.approx(value, rel=1e-5)


def test_restarts_share_forwards(experts):
    """restarts=R with candidates_per_step=R: the R searches (each still sequential) put one
    candidate each into every forward. Their starts score as in separate forwards; later
    steps may part ways, as float noise of 1e-7 can turn COBYLA another way."""
    examples = support.constant_task("red")
    apart = compose(experts, examples, budget=8, restarts=3, seed=2, progress=False)
    shared = compose(experts, examples, budget=8, restarts=3, seed=2, candidates_per_step=3,
                     progress=False)
    assert apart.timings["forwards"] == 24 and shared.timings["forwards"] == 8
    assert len(shared.losses) == len(apart.losses) == 24  # 3 searches x 8
    np.testing.assert_allclose(shared.losses[::8], apart.losses[::8], rtol=1e-5)  # the starts
    assert len(set(np.round(shared.losses[::8], 6))) == 3  # three different starts
    assert shared.best_loss == min(shared.restart_losses) <= shared.losses[0]


def test_examples_are_packed_only_where_it_saves_work():
    """Packing skips the padding in the linear layers but makes attention span the whole
    packed row: worth it at flan-t5-large's width with uneven examples, not with even ones,
    and not for a model as narrow as the zoo's."""
    from transformers import T5Config
    large = T5Config(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, feed_forward_proj="gated-gelu")
    narrow = T5Config(d_model=128, d_kv=32, num_heads=4, d_ff=512)

    def batch(lengths, width):
        return {"attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in lengths])}
    uneven = batch([13, 9, 13, 21, 20], 21)  # the benchmark's 5 examples
    assert packing_pays(large, uneven)
    assert not packing_pays(large, batch([300] * 5, 300))
    assert not packing_pays(narrow, batch([60, 58, 65, 62, 64], 65))
