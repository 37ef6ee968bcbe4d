"""The forward path: dtype choice, K candidates per forward against K separate forwards."""
import numpy as np
import pytest
import torch

import support
from lorahub_compeft import forward
from lorahub_compeft.compose import compose
from lorahub_compeft.expert import compress
from lorahub_compeft.forward import Scorer, native_bf16, resolve_dtype
from lorahub_compeft.objective import few_shot_loss, tokenize_examples
from lorahub_compeft.search import optimizer_class

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
    experts = [compress(d, density=0.5) for d in dirs]
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
    result = compose(experts, examples, budget=8, seed=3, progress=False)
    batches = tokenize_examples(examples, result.tokenizer, True, 32, len(examples), "cpu")
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


def test_auto_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(forward, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not native_bf16("cpu") and resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(forward, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(forward, "_cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("fp32", "cpu") == torch.float32 and resolve_dtype(None, "cpu") is None
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", "cpu")


def test_bf16_mixes_in_fp32_and_saves_fp32(experts, tmp_path):
    result = compose(experts, support.constant_task("blue"), budget=6, dtype="bf16",
                     candidates_per_step=3, progress=False)
    assert result.flat.dtype == torch.bfloat16  # the LoRA in the base's dtype
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

    from lorahub_compeft import cli
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
        assert cli._idle_cores() is None  # quiet: torch's choice stays
        monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
        assert cli._idle_cores() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
        assert cli._idle_cores() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0))
        cli._apply_threads(type("Args", (), {"threads": None})())
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(1)
