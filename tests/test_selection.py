"""Choosing experts by few-shot loss, restarts, and w = 0 as a candidate, on really trained
tiny LoRA experts."""
import json

import numpy as np
import pytest

import support
from lorahub_compeft import ExpertLibrary
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft.io.adapters import Adapter, load_adapter
from lorahub_compeft.compose.composer import compose
from lorahub_compeft.compose.export import COMPOSITION_NAME

WORDS = ("red", "green", "blue", "pink", "gray")


@pytest.fixture(scope="module")
def experts(tiny_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("select-experts")
    return {w: str(support.train_expert(tiny_t5, root / w, support.constant_task(w), steps=40,
                                        seed=i)) for i, w in enumerate(WORDS)}


def test_loss_selection_picks_the_skill_deterministically_and_records_scores(experts):
    dirs = [experts[w] for w in WORDS]
    task = support.constant_task("blue")
    a = compose(dirs, task, n_experts=2, budget=8, progress=False)  # select="loss" by default
    b = compose(dirs, task, n_experts=2, budget=8, progress=False)
    assert a.selection.method == "loss" and "blue" in a.experts and len(a.experts) == 2
    assert a.experts == b.experts and a.weights == b.weights
    assert set(a.selection.scores) == set(WORDS)  # L = 5 <= 3/4 budget: every one scored exactly
    assert min(a.selection.scores, key=a.selection.scores.get) == "blue"
    chosen = sorted(a.selection.scores, key=a.selection.scores.get)[:2]
    assert sorted(a.experts) == sorted(chosen)
    # the random protocol stays LoraHub's draw, whatever the losses
    r = compose(dirs, task, n_experts=2, budget=1, seed=5, select="random", start="zero",
                progress=False)
    assert r.selection.method == "random" and r.selection.scores == {}
    # start "best" scores the drawn experts alone (to start at the best), and draws the same
    s = compose(dirs, task, n_experts=2, budget=1, seed=5, select="random", progress=False)
    assert s.experts == r.experts and sorted(s.selection.scores) == sorted(r.experts)


def test_ties_are_broken_by_name(experts, tmp_path):
    library = ExpertLibrary(tmp_path / "lib")
    for name, word in (("b_red", "red"), ("a_red", "red"), ("c_pink", "pink")):
        library.add(experts[word], PAPER_COMPEFT, name=name, density=0.5)
    result = compose(library, support.constant_task("red"), n_experts=1, budget=4,
                     progress=False)
    assert result.selection.scores["a_red"] == result.selection.scores["b_red"]
    assert result.experts == ["a_red"]


# The relative rounding of a loss scored through each precision's copies: none that matters in
# fp32; bf16's 8-bit significand, 2^-8 apart at 1; int8's 7-bit inputs (reduce_range), 2^-7.
ROUNDING = {"fp32": 0.0, "bf16": 2.0 ** -8, "int8": 2.0 ** -7}


@pytest.mark.parametrize("dtype", list(ROUNDING))
def test_first_order_estimate_ranks_large_candidate_sets(experts, dtype):
    """With more candidates than 3/4 of the budget, all get the estimate and only the best of
    it are scored; for a small expert the estimate matches the exact loss to first order. The
    estimate is fp32's (the model's own layers); the exact scores are in the search's
    precision, forced here to each, and agree to within its rounding of the loss."""
    config = load_adapter(experts["red"]).config

    def scaled(word, t):
        tensors = {k: v * t for k, v in load_adapter(experts[word]).tensors.items()}
        return Adapter(tensors, config, {"path": f"{word}-{t}"})

    candidates = [scaled(w, 0.02) for w in WORDS]
    task = support.constant_task("green")
    result = compose(candidates, task, n_experts=1, budget=4, l1=0.0, dtype=dtype,
                     progress=False)
    sel = result.selection
    assert len(sel.estimates) == 5 and len(sel.scores) == 3  # 3/4 of budget 4
    ranked = sorted(sel.estimates, key=sel.estimates.get)
    assert set(sel.scores) == set(ranked[:3])
    base = result.zero_loss
    estimate_base = base if dtype == "fp32" else compose(  # the estimate's own loss at w = 0
        candidates[:1], task, budget=1, dtype="fp32", progress=False).zero_loss
    for name, exact in sel.scores.items():  # a 2% step: linear to within a few percent
        assert sel.estimates[name] - estimate_base == pytest.approx(
            exact - base, rel=0.1, abs=1e-4 + ROUNDING[dtype] * abs(base))
    assert any(abs(exact - base) > 1e-3 for exact in sel.scores.values())


def test_restarts_differ_and_the_lowest_loss_is_kept(experts):
    dirs = [experts[w] for w in WORDS]
    task = support.constant_task("pink")
    one = compose(dirs, task, select="random", n_experts=5, budget=6, progress=False)
    three = compose(dirs, task, select="random", n_experts=5, budget=6, restarts=3,
                    progress=False)
    assert len(three.restart_losses) == 3 and len(three.losses) == 18
    assert three.restart_losses[0] == one.best_loss  # the first restart is LoraHub's search
    assert len(set(three.restart_losses)) == 3       # the others really search elsewhere
    assert three.best_loss == min(three.restart_losses + [three.zero_loss])
    assert three.best_loss <= one.best_loss


def test_zero_composition_wins_when_every_step_is_worse(experts):
    """Every point but w = 0 pays a penalty: the result is the zero composition."""
    penalty = lambda w: 0.0 if not np.any(w) else 10.0
    result = compose([experts["red"], experts["green"]], support.constant_task("blue"),
                     budget=5, optimizer="RandomSearch", regularizer=penalty, progress=False)
    assert min(result.losses) > result.zero_loss
    assert result.best_loss == result.zero_loss
    assert set(result.weights.values()) == {0.0}


def test_saved_adapter_carries_the_selection(experts, tmp_path):
    result = compose([experts[w] for w in WORDS], support.constant_task("gray"), n_experts=2,
                     budget=3, progress=False)
    out = result.save_adapter(tmp_path / "adapter")
    saved = json.loads((out / COMPOSITION_NAME).read_text())
    assert saved["experts"] == result.experts
    assert saved["weights"] == result.weights
    assert saved["selection"]["scores"] == result.selection.scores
    assert saved["selection"]["method"] == "loss"


@pytest.mark.parametrize("options, message", [
    ({"select": "best"}, "unknown select"),
    ({"restarts": 0}, "restarts"),
    ({"n_experts": 0}, "n_experts"),
])
def test_bad_selection_options_are_refused(experts, options, message):
    with pytest.raises(ValueError, match=message):
        compose([experts["red"]], support.constant_task("red"), progress=False, **options)


def test_start_best_begins_the_search_at_the_chosen_expert_with_the_lowest_loss(experts):
    dirs = [experts[w] for w in WORDS]
    task = support.constant_task("green")
    # l1 = 0: an expert's score alone is then exactly the search's loss at that point. Budget
    # 8: with fewer steps Shiwa picks a one-shot optimizer, which ignores the start.
    best = compose(dirs, task, n_experts=2, budget=8, start="best", l1=0.0, progress=False)
    assert "green" in best.experts
    assert best.losses[0] == pytest.approx(best.selection.scores["green"], rel=1e-5)
    assert best.best_loss <= best.selection.scores["green"] + 1e-6  # never worse than alone
    zero = compose(dirs, task, n_experts=2, budget=8, l1=0.0, start="zero", progress=False)
    assert zero.losses[0] == pytest.approx(zero.zero_loss, rel=1e-5)
    assert best.losses[0] < zero.losses[0]
    # select random scores the chosen experts alone first (one forward each), and counts them
    drawn = compose(dirs, task, n_experts=3, budget=8, seed=2, select="random", start="best",
                    l1=0.0, progress=False)
    assert sorted(drawn.selection.scores) == sorted(drawn.experts)
    assert drawn.timings["select_forwards"] == 3
    first = min(drawn.experts, key=lambda n: (drawn.selection.scores[n], n))
    assert drawn.losses[0] == pytest.approx(drawn.selection.scores[first], rel=1e-5)


def test_an_unknown_start_is_refused_by_name():
    from lorahub_compeft.config import ComposeConfig
    with pytest.raises(ValueError, match="unknown start 'middle'; use one of best, zero"):
        ComposeConfig(start="middle")
