"""The LoraHub composer on real tiny models and really trained LoRA experts."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import support
from lorahub_compeft import ExpertLibrary
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft.compose.composer import compose
from lorahub_compeft.compose.stacks import mix_weights
from lorahub_compeft.io.models import generate
from lorahub_compeft.store.expert import CompressedExpert

WORDS = ("red", "green", "blue", "pink")
PROMPTS = ["say the word : alpha ?", "say the word : kappa ?"]


@pytest.fixture(scope="module")
def experts(tiny_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("compose-experts")
    return {w: support.train_expert(tiny_t5, root / w, support.constant_task(w), steps=40, seed=i)
            for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def green(experts):
    return compose([str(experts[w]) for w in WORDS], support.constant_task("green"), budget=40,
                   seed=1, n_experts=4, progress=False)


def test_composition_finds_the_matching_expert(green):
    assert green.best_loss < green.zero_loss
    assert max(green.weights, key=lambda n: abs(green.weights[n])) == "green"
    assert len(green.losses) == 40 and green.timings["steps"] == 40
    assert green.nonfinite_steps == 0
    assert green.generate(PROMPTS) == ["green", "green"]


def test_same_seed_same_weights(experts, green):
    again = compose([str(experts[w]) for w in WORDS], support.constant_task("green"), budget=40,
                    seed=1, n_experts=4, progress=False)
    assert again.weights == green.weights and again.losses == green.losses


def test_mixing_is_the_weighted_sum_per_module(experts, green):
    from lorahub_compeft.io.adapters import load_adapter
    w = np.array([0.5, -1.0, 0.25, 1.5])
    mixed = green.stack.layout.unflatten(green.stack.mix(w))
    out = torch.full((green.stack.numel,), 7.0)
    torch.testing.assert_close(green.stack.mix(w, out=out), green.stack.mix(w))
    tensors = [load_adapter(experts[n]).tensors for n in green.experts]
    assert set(mixed) == set(tensors[0])  # every q/v module's A and B, nothing else
    assert len(mixed) == 24  # 4 encoder + 8 decoder (self and cross attention) modules
    for key, value in mixed.items():
        expected = sum(wi * t[key] for wi, t in zip(w, tensors))
        torch.testing.assert_close(value, expected)
    torch.testing.assert_close(mix_weights(torch.eye(3), [1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]))


def test_saved_adapter_and_merged_model_reproduce_the_composition(tiny_t5, green, tmp_path):
    out = green.save_adapter(tmp_path / "composed")
    with pytest.raises(ValueError, match="already exists"):
        green.save_adapter(out)
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out).eval()
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    labels = tok(["green", "green"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = green.model(**batch, labels=labels).logits
        theirs = reloaded(**batch, labels=labels).logits
    torch.testing.assert_close(theirs, ours)
    merged = green.merged_model()
    assert not isinstance(merged, PeftModel)
    assert generate(merged, tok, PROMPTS) == green.generate(PROMPTS)


def test_compressed_experts_compose_like_their_decoded_dense_weights(experts, tmp_path):
    library = ExpertLibrary(tmp_path / "lib")
    for w in WORDS:
        library.add(experts[w], PAPER_COMPEFT, name=w, density=0.5)
    examples = support.constant_task("blue")
    compressed = compose(library, examples, n_experts=4, budget=8, seed=3, progress=False)
    dense_dirs = [library.get(n).export(tmp_path / "dense" / n) for n in library.names()]
    dense = compose([str(d) for d in dense_dirs], examples, n_experts=4, budget=8, seed=3,
                    progress=False)
    assert list(compressed.weights) == list(dense.weights) == sorted(WORDS)
    # sparse scatter vs dense product: the same sums, rounded in another order
    assert compressed.weights == pytest.approx(dense.weights, rel=1e-5, abs=1e-7)
    assert compressed.losses == pytest.approx(dense.losses, rel=1e-5)
    by_object = compose([library.get(n) for n in library.names()], examples, budget=8, seed=3,
                        n_experts=4, progress=False)
    assert by_object.weights == compressed.weights
    named = compose(library, examples, names=["blue", "red"], budget=3, progress=False)
    assert list(named.weights) == ["blue", "red"]


def test_only_the_sampled_experts_are_decoded(experts, tmp_path, monkeypatch):
    library = ExpertLibrary(tmp_path / "lib")
    expert = library.add(experts["red"], PAPER_COMPEFT, name="e0", density=0.3)
    source = library.get("e0")
    for i in range(1, 30):  # the same expert under 30 names; compressed once
        source.meta["name"] = f"e{i}"
        library.add(source)
    decoded = []
    original = CompressedExpert.ternary

    def counting(self):
        decoded.append(self.name)
        return original(self)

    monkeypatch.setattr(CompressedExpert, "ternary", counting)
    result = compose(library, support.constant_task("red"), n_experts=5, budget=2, seed=7,
                     select="random", progress=False)
    assert sorted(decoded) == sorted(result.experts) == library.sample(5, 7)
    assert len(set(decoded)) == 5 and expert
    assert result.timings["decode"] > 0
    # the stack holds the only decoded copy: the library's cached experts were released
    assert not any(library.get(n).is_decoded for n in result.experts)


def test_compeft_experts_stay_sparse_and_mix_like_dense(experts, tmp_path):
    from lorahub_compeft.compose.stacks import TernaryStack
    library = ExpertLibrary(tmp_path / "lib")
    for w in WORDS:
        library.add(experts[w], PAPER_COMPEFT, name=w, density=0.2, per_tensor=(w == "red"))
    result = compose(library, support.constant_task("red"), n_experts=4, budget=2, progress=False)
    stack = result.stack
    assert isinstance(stack, TernaryStack) and not hasattr(stack, "matrix")
    assert stack.positions.dtype == torch.int32 and stack.signs.dtype == torch.int8
    dense_rows = torch.stack([torch.cat([library.get(n).state_dict()[k].reshape(-1)
                                         for k in stack.layout.keys]) for n in result.experts])
    w = np.array([0.7, -1.2, 0.3, 2.0])
    torch.testing.assert_close(stack.mix(w), mix_weights(dense_rows, w))
    for dtype in (torch.float32, torch.bfloat16):  # in place, as each step does
        out = torch.full((stack.numel,), 7.0, dtype=dtype)
        assert stack.mix(w, out=out) is out
        torch.testing.assert_close(out, mix_weights(dense_rows, w).to(dtype))
    held = stack.positions.nbytes + stack.signs.nbytes
    assert held < dense_rows.nbytes / 3  # 5 bytes per kept value at k=0.2 vs 4 per parameter


def test_a_longer_list_is_sampled_reproducibly(experts):
    dirs = [str(experts[w]) for w in WORDS]
    a = compose(dirs, support.constant_task("red"), n_experts=2, budget=2, seed=5,
                select="random", progress=False)
    b = compose(dirs, support.constant_task("red"), n_experts=2, budget=2, seed=5,
                select="random", progress=False)
    assert a.experts == b.experts and len(a.experts) == 2


@pytest.mark.parametrize("examples, options, message", [
    ([], {}, "no examples"),
    ([{"input": "say the word"}], {}, "'target'"),
    ([{"input": 3, "target": "red"}], {}, "'input'"),
    (support.constant_task("red"), {"budget": 0}, "budget"),
    (support.constant_task("red"), {"optimizer": "NoSuchOptimizer"}, "Shiwa"),
    (support.constant_task("red"), {"objective": "mine"}, "objective"),
    (support.constant_task("red"), {"n_experts": 5}, "cannot sample 5"),
])
def test_bad_inputs_are_refused_before_any_model_work(experts, tmp_path, examples, options, message):
    library = ExpertLibrary(tmp_path / "lib")
    for w in WORDS:
        library.add(experts[w], PAPER_COMPEFT, name=w)
    with pytest.raises(ValueError, match=message):
        compose(library, examples, **{"n_experts": 2, "progress": False, **options})


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return str(dst)


def test_mismatched_experts_are_named(tiny_t5, experts, tmp_path):
    small = support.train_expert(tiny_t5, tmp_path / "rank-two", support.constant_task("red"),
                                 steps=2, r=2)
    others = _edited(experts["blue"], tmp_path / "qk-expert", target_modules=["k", "q"])
    elsewhere = _edited(experts["pink"], tmp_path / "other-base", base_model_name_or_path="t5-small")
    with pytest.raises(ValueError) as err:
        compose([str(experts["red"]), str(small), others, elsewhere], support.constant_task("red"),
                n_experts=4, progress=False)
    text = str(err.value)
    assert "rank-two: r is 2" in text
    assert "qk-expert: target_modules" in text
    assert "other-base: base_model_name_or_path" in text
    assert "red" in text  # the reference expert
    ia3 = _edited(experts["blue"], tmp_path / "ia3-like", peft_type="IA3")
    with pytest.raises(ValueError, match="ia3-like: peft_type"):
        compose([str(experts["red"]), ia3], support.constant_task("red"), progress=False)


def test_lorahub_objective_scales_the_loss_and_uses_ngopt(experts, green):
    result = compose([str(experts[w]) for w in WORDS], support.constant_task("green"), budget=4,
                     objective="lorahub", progress=False)
    assert result.optimizer == "NGOpt"
    assert result.zero_loss == pytest.approx(green.zero_loss / 8, rel=1e-5)


def test_custom_loss_nonfinite_steps_and_truncation(experts):
    dirs = [str(experts[w]) for w in WORDS]
    calls = []

    def nan_loss(model, batch):
        calls.append(len(batch["input_ids"]))
        return float("nan")

    with pytest.warns(UserWarning, match="non-finite"):
        result = compose(dirs, support.constant_task("red"), budget=3, loss_fn=nan_loss,
                         batch_size=3, progress=False)
    assert result.nonfinite_steps == 3 and calls[:3] == [3, 3, 2]
    assert all(w == 0 for w in result.weights.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compose(dirs, support.constant_task("red"), budget=1, max_length=3, progress=False)
    assert sum("truncated" in str(w.message) for w in caught) == 1
    custom = compose(dirs, support.constant_task("red"), budget=2, regularizer=lambda w: 7.0,
                     progress=False)
    assert custom.losses[0] > 7.0


def test_a_model_object_and_bf16(tiny_t5, experts):
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    result = compose([str(experts[w]) for w in WORDS], support.constant_task("red"), model=base,
                     tokenizer=AutoTokenizer.from_pretrained(tiny_t5), budget=2, dtype="bf16",
                     progress=False)
    assert not hasattr(base, "peft_config")  # the caller's model is left alone
    assert np.isfinite(result.losses).all()


def test_causal_lm_composition(tmp_path):
    base = support.build_tiny_gpt2(tmp_path / "gpt2")
    dirs = [str(support.train_expert(base, tmp_path / w, support.constant_task(w), steps=30,
                                     causal=True)) for w in ("red", "green")]
    result = compose(dirs, support.constant_task("green"), budget=10, progress=False)
    assert np.isfinite(result.losses).all() and np.isfinite(result.zero_loss)
    assert result.best_loss <= min(result.losses)
    answers = result.generate(PROMPTS, max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_the_search_does_not_pass_on_cobylas_tolerance_warnings():
    from lorahub_compeft.compose.search import search
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [outcome] = search(lambda W: [float(np.sum((w - 0.3) ** 2)) for w in W], 20, 40,
                           "Shiwa", 1.5, [1], progress=False)
    assert outcome.best_loss < 20 * 0.3 ** 2  # better than the start, w = 0
    assert not [w for w in caught if "COBYLA" in str(w.message)]
