"""mix="product": the experts' updates added exactly, ΔW = Σ wᵢ·sᵢ·BᵢAᵢ, as a LoRA of rank N·r;
its exact and compact (rank-k, by SVD) adapters; the methods' and commands' `mix`."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import support
from conftest import BBH
from lorahub_compeft.cli import main
from lorahub_compeft.compose.composer import compose
from lorahub_compeft.compose.export import COMPOSITION_NAME
from lorahub_compeft.compose.precision import LinearCopies
from lorahub_compeft.compose.scoring import Scorer
from lorahub_compeft.compose.stacks import ProductStack
from lorahub_compeft.config import ComposeConfig
from lorahub_compeft.eval.methods import make_method
from lorahub_compeft.io.adapters import load_adapter
from lorahub_compeft.io.files import read_jsonl
from lorahub_compeft.store.expert import compress

WORDS = ("red", "green", "blue", "pink")
PROMPTS = ["say the word : alpha ?", "say the word : kappa beta ?", "echo"]
TARGETS = ["green", "green", "blue red"]
TASK = support.constant_task("green", 5)


@pytest.fixture(scope="module")
def experts(tiny_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("product-experts")
    return {w: support.train_expert(tiny_t5, root / w, support.constant_task(w), steps=30, seed=i)
            for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def product(experts):
    """Three experts composed in product space (from w = 0: a mix of all three, not the best
    one alone)."""
    return compose([str(experts[w]) for w in WORDS[:3]], TASK, budget=12, mix="product",
                   start="zero", progress=False)


def logits(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    labels = tokenizer(TARGETS, return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        return model(**batch, labels=labels).logits


def with_weights(result, w):
    """The result with weights w, applied to its model (the fixture's own weights kept)."""
    result = dataclasses.replace(result, weights=dict(zip(result.experts, map(float, w))))
    result.apply_best()
    return result


def by_hand(base_dir, adapters: list[dict], w) -> torch.nn.Module:
    """The base with W + Σ wᵢ·sᵢ·BᵢAᵢ written into each adapted weight."""
    model = AutoModelForSeq2SeqLM.from_pretrained(base_dir).eval()
    modules = dict(model.named_modules())
    for key in adapters[0]["tensors"]:
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = sum(wi * a["scaling"] * a["tensors"][key.replace("lora_A", "lora_B")].float()
                    @ a["tensors"][key].float() for wi, a in zip(w, adapters))
        with torch.no_grad():
            modules[name].weight += delta
    return model


def adapter_of(path) -> dict:
    adapter = load_adapter(path)
    c = adapter.config
    return {"tensors": adapter.tensors, "scaling": c["lora_alpha"] / c["r"]}


def test_one_expert_at_w1_is_that_expert(tiny_t5, experts):
    result = compose([str(experts["blue"])], TASK, budget=2, mix="product", progress=False)
    assert isinstance(result.stack, ProductStack) and result.config["r"] == 4
    with_weights(result, [1.0])
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    expert = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5),
                                       experts["blue"]).eval()
    torch.testing.assert_close(logits(result.model, tok), logits(expert, tok))


def test_n_experts_are_the_weighted_sum_of_their_updates(tiny_t5, experts, product):
    w = [0.7, -1.2, 0.4]
    product = with_weights(product, w)
    assert product.config["r"] == 12 and product.config["lora_alpha"] == 24  # s = 24/12 = 8/4
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    hand = by_hand(tiny_t5, [adapter_of(experts[n]) for n in product.experts], w)
    ours = logits(product.model, tok)
    torch.testing.assert_close(ours, logits(hand, tok), rtol=1e-4, atol=1e-4)
    # merged_model is the same update merged into the weights
    merged = dict(product.merged_model().named_parameters())
    for name, p in hand.named_parameters():
        torch.testing.assert_close(merged[name], p, rtol=1e-5, atol=1e-6)
    # and it is not LoraHub's mix of factors, whose update has the cross terms B_i A_j
    factors = compose([str(experts[n]) for n in product.experts], TASK, budget=2, progress=False)
    with_weights(factors, w)
    assert (logits(factors.model, tok) - ours).abs().max() > 1e-2


def test_selection_is_the_same_in_both_mixes(experts):
    paths = [str(experts[w]) for w in WORDS]
    for k in (1, 3):
        runs = [compose(paths, TASK, n_experts=2, budget=8, mix=mix, candidates_per_step=k,
                        progress=False) for mix in ("factors", "product")]
        assert runs[0].selection.scores == runs[1].selection.scores
        assert len(runs[0].selection.scores) == 4  # every candidate scored exactly
        assert runs[0].experts == runs[1].experts and runs[1].config["r"] == 8


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_k_per_forward_gives_the_losses_of_one_per_forward(product, experts, dtype):
    """Equal in fp32; close in int8, where an int8 layer quantizes its whole input with one
    scale and K candidates in one forward share it."""
    result = product if dtype == "fp32" else compose(
        [str(experts[w]) for w in WORDS[:3]], TASK, budget=4, mix="product", dtype=dtype,
        progress=False)
    assert result.precision == ("float32" if dtype == "fp32" else "int8")
    int8 = LinearCopies(result.model, "int8") if dtype == "int8" else None
    batches = support_batches(result)
    one = Scorer(result.model, result.stack, result.flat, batches, len(TASK), "paper", copies=int8)
    many = Scorer(result.model, result.stack, result.flat, batches, len(TASK), "paper",
                  per_forward=3, copies=int8)
    weights = np.random.default_rng(0).uniform(-1.5, 1.5, size=(5, 3))
    separate = one.score_candidates(weights)
    np.testing.assert_allclose(many.score_candidates(weights), separate,
                               rtol=1e-5 if int8 is None else 0.05)
    assert len(set(np.round(separate, 4))) == 5
    # the search's best loss is the loss of its weights, measured again in its precision
    w = np.array([result.weights[n] for n in result.experts])
    assert one.loss(w) + 0.05 * np.abs(w).mean() == pytest.approx(result.best_loss, rel=1e-6)
    # the search itself: K candidates per forward, restarts in lockstep
    k3 = compose([str(experts[w]) for w in WORDS[:3]], TASK, budget=4, restarts=3,
                 candidates_per_step=3, mix="product", dtype=dtype, progress=False)
    assert k3.timings["forwards"] == 4 and math.isfinite(k3.best_loss)


def test_an_expert_at_w0_is_left_out_of_the_forward_with_the_same_loss(product):
    batches = support_batches(product)
    skipping = Scorer(product.model, product.stack, product.flat, batches, len(TASK), "paper")
    every = Scorer(product.model, product.stack, product.flat, batches, len(TASK), "paper")
    every.blocks = None  # every expert's block in every forward
    lora_a = next(m for n, m in product.model.named_modules() if n.endswith("lora_A.default"))
    points = ([0.8, 0.0, -0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.2, 0.1])
    ranks = []
    for w in points:
        expected, seen = every.loss(w), set()
        hook = lora_a.register_forward_hook(lambda m, args, out: seen.add(m.weight.shape[0]))
        try:
            assert skipping.loss(w) == pytest.approx(expected, rel=1e-6)
        finally:
            hook.remove()
        ranks.append(seen)
    assert ranks == [{8}, {4}, set(), {12}]  # rank 4 per expert; at w = 0 no LoRA runs at all
    # and the model's LoRA parameters are the flat buffer's views again, as the search left them
    flat = product.flat
    for _, p, _ in skipping.blocks.params:
        assert flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()


def support_batches(result):
    from lorahub_compeft.compose.objective import tokenize_examples
    return tokenize_examples(TASK, result.tokenizer, True, 32, len(TASK), result.flat.device)


def test_the_exact_adapter_reloads_with_the_searchs_logits(tiny_t5, product, tmp_path):
    product.apply_best()
    out = product.save_adapter(tmp_path / "exact")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (12, 24, False)
    saved = json.loads((out / COMPOSITION_NAME).read_text())
    assert saved["mix"] == "product" and "export" not in saved
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out).eval()
    torch.testing.assert_close(logits(reloaded, tok), logits(product.model, tok))
    # the few-shot loss of the reloaded adapter is the search's best, less the regularizer
    from lorahub_compeft.compose.objective import few_shot_loss
    w = np.array(list(product.weights.values()))
    batches = support_batches(product)
    assert few_shot_loss(reloaded, batches, len(TASK)) + 0.05 * np.abs(w).mean() == \
        pytest.approx(product.best_loss, rel=1e-5)
    assert product.generate(PROMPTS[:1]) == ["green"]


def updates(tensors: dict, scaling: float) -> dict:
    return {k: scaling * tensors[k.replace("lora_A", "lora_B")].double() @ tensors[k].double()
            for k in tensors if ".lora_A." in k}


def test_the_rank_k_export_is_the_truncated_svd_with_the_error_it_reports(tiny_t5, product,
                                                                           tmp_path):
    product.apply_best()
    out = product.save_adapter(tmp_path / "rank4", rank=4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    compact = updates(load_file(out / "adapter_model.safetensors"), 8 / 4)
    exact = updates(product.lora_tensors(), 24 / 12)
    dropped = sum(float(((exact[k] - compact[k]) ** 2).sum()) for k in exact)
    error = math.sqrt(dropped / sum(float((d ** 2).sum()) for d in exact.values()))
    recorded = json.loads((out / COMPOSITION_NAME).read_text())["export"]
    assert recorded == {"rank": 4, "relative_error": pytest.approx(error, rel=1e-6)}
    assert product.compact_adapter(4).relative_error == pytest.approx(error, rel=1e-6)
    assert 0.01 < error < 1  # three experts' updates do not fit in rank 4
    # the best rank-4 approximation: what the singular values of each ΔW leave out
    svd = sum(float((torch.linalg.svdvals(d)[4:] ** 2).sum()) for d in exact.values())
    assert dropped == pytest.approx(svd, rel=1e-6)
    # at the composed rank the export is exact
    assert product.compact_adapter(12).relative_error < 1e-6
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out)
    assert logits(reloaded.eval(), tok).shape == logits(product.model, tok).shape
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        product.compact_adapter(0)


@pytest.mark.parametrize("codec", ["compeft", "ere"])
def test_compressed_experts_in_product_mode_are_their_decoded_updates(tiny_t5, experts, codec,
                                                                      tmp_path):
    options = {"density": 0.5, "alpha": "auto", "per_tensor": True} if codec == "compeft" \
        else {"codec": "ere", "budget_bits": 2.0}
    compressed = [compress(experts[w], name=w, **options) for w in WORDS[:3]]
    result = compose(compressed, TASK, budget=6, mix="product", progress=False)
    w = [1.1, -0.3, 0.6]
    with_weights(result, w)
    decoded = []
    for c in compressed:
        c.export(tmp_path / c.name)
        decoded.append(adapter_of(tmp_path / c.name))
    order = [WORDS.index(n) for n in result.experts]
    hand = by_hand(tiny_t5, [decoded[i] for i in order], w)
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    torch.testing.assert_close(logits(result.model, tok), logits(hand, tok), rtol=1e-4, atol=1e-4)


def test_compose_mix_product_rank_through_the_command_line(tiny_t5, experts, tmp_path, capsys):
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in TASK))
    out = tmp_path / "cli"
    assert main(["compose", "--experts", *[str(experts[w]) for w in WORDS], "--examples",
                 str(examples), "--mix", "product", "--rank", "4", "--budget", "6", "--quiet",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / COMPOSITION_NAME).read_text())
    assert saved["mix"] == "product" and saved["export"]["rank"] == 4
    assert f"relative Frobenius error {saved['export']['relative_error']:.4g}" in printed
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out)
    assert reloaded.peft_config["default"].r == 4
    assert torch.isfinite(logits(reloaded.eval(), tok)).all()


def test_the_mix_is_a_checked_setting_of_every_composing_method():
    with pytest.raises(ValueError, match="unknown mix 'sum'"):
        ComposeConfig(mix="sum")
    lorahub, select = make_method("lorahub"), make_method("select")
    assert lorahub.params.compose_config().mix == "factors"  # the paper's protocol
    assert select.params.compose_config().mix == ComposeConfig().mix  # the package's default
    # results keyed before `mix` existed keep their keys: factors is left out of the key
    assert "mix" not in lorahub.params.to_json()
    tuned = make_method("lorahub", mix="product").params
    assert tuned.to_json()["mix"] == "product" and tuned.compose_config().mix == "product"
    assert make_method("select", mix="factors").params.compose_config().mix == "factors"
    assert make_method("select-compeft", mix="product").params.compose_config().mix == "product"


def test_per_module_ranks_are_refused_in_product_mode_before_any_model_work(experts, tmp_path):
    odd = tmp_path / "odd"
    adapter = load_adapter(experts["red"])
    from lorahub_compeft.io.adapters import save_adapter
    save_adapter(odd, adapter.tensors, dict(adapter.config, rank_pattern={"q": 4}))
    with pytest.raises(ValueError, match="rank_pattern or alpha_pattern; use mix='factors'"):
        compose([str(odd)], TASK, mix="product", progress=False)


def test_bf16_product_mix_scores_through_bf16_copies_and_saves_fp32(experts, product):
    """bf16 scores through bf16 copies of the base's linear layers; the model, its LoRA and
    the saved adapter stay fp32 (issue 20: the user gets fp32 whatever the search ran)."""
    paths = [str(experts[w]) for w in WORDS[:3]]
    for k in (1, 3):
        result = compose(paths, TASK, budget=4, dtype="bf16", restarts=k, candidates_per_step=k,
                         mix="product", progress=False)
        assert result.precision == "bfloat16" and np.isfinite(result.losses).all()
        assert result.flat.dtype == torch.float32
        assert result.zero_loss == pytest.approx(product.zero_loss, rel=0.02)
        tensors = result.lora_tensors()
        assert all(t.dtype == torch.float32 for t in tensors.values())
        # the model's LoRA is the fp32 mix itself
        flat = result.stack.layout.unflatten(result.flat)
        for key, value in tensors.items():
            torch.testing.assert_close(flat[key], value, rtol=0, atol=0)


@pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")
def test_bbh_mix_keys_its_results_and_factors_keeps_the_old_keys(tiny_t5, experts, tmp_path):
    out = tmp_path / "run"
    argv = ["bbh", "--model", str(tiny_t5), "--experts", *[str(experts[w]) for w in WORDS[:3]],
            "--tasks", "navigate", "--seeds", "1", "-n", "2", "--budget", "3", "--bbh-dir",
            str(BBH), "--max-eval", "4", "--methods", "lorahub,select", "--out", str(out)]
    assert main(argv) == 0
    # each method's default mix, named: the same settings, nothing new to compute
    assert main(argv + ["--methods", "lorahub", "--mix", "factors"]) == 0
    assert main(argv + ["--methods", "select", "--mix", ComposeConfig().mix]) == 0
    assert len(read_jsonl(out / "results.jsonl")) == 2
    assert main(argv + ["--mix", "product"]) == 0 and main(argv + ["--mix", "factors"]) == 0
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    mixes = sorted((r["method"], r["setting"]["params"].get("mix", "factors")) for r in rows)
    assert mixes == [("lorahub", "factors"), ("lorahub", "product"), ("select", "factors"),
                     ("select", "product")]


def test_the_product_session_reuses_the_base_and_its_int8_copies(tiny_t5, experts):
    """Re-injecting LoRA at rank N·r keeps the base's own weights (no second copy) and the int8
    copies made for them."""
    from lorahub_compeft.compose.precision import Precision, resolve_precision
    from lorahub_compeft.compose.session import ScoringSession, load_base, product_config
    from lorahub_compeft.compose.experts import expert_handles
    handles = expert_handles([str(experts[w]) for w in WORDS[:2]])
    base, tok = load_base(None, None, handles[0], Precision(None))
    config = ComposeConfig(dtype="int8").resolved()
    session = ScoringSession.open(base, tok, handles[0].config, TASK, config,
                                  resolve_precision("int8", "cpu"), torch.device("cpu"))
    weights = {n: p.data_ptr() for n, p in session.model.get_base_model().named_parameters()
               if "lora_" not in n}
    product = session.for_product(product_config(handles[0].config, 2))
    assert {n: p.data_ptr() for n, p in product.model.get_base_model().named_parameters()
            if "lora_" not in n} == weights
    assert [s[3] for s in product.copies.swaps] == [s[3] for s in session.copies.swaps]
    assert product.layout.shapes[0] == (8, 32) and product.flat.numel() == 2 * session.flat.numel()
