"""budget "auto": evaluations as a function of N and a patience stop for the package's
protocols; the paper's keep 40 steps; the forwards are counted in the result."""
import json

import numpy as np
import pytest

import support
from lorahub_compeft.compose.composer import compose
from lorahub_compeft.compose.export import COMPOSITION_NAME
from lorahub_compeft.compose.search import search
from lorahub_compeft.config import (DEFAULT_N, PAPER_COMPOSE, ComposeConfig, auto_budget,
                                    auto_patience)
from lorahub_compeft.eval.methods import make_method


def test_auto_resolves_to_a_budget_of_n_with_the_patience_stop():
    config = ComposeConfig().resolved()
    assert ComposeConfig().budget == "auto"
    assert (config.budget, config.patience) == (auto_budget(DEFAULT_N["loss"]), 6)
    assert auto_patience(3) == 6 < auto_patience(8)  # a search of more weights waits longer
    assert config.budget < 40  # fewer than LoraHub's 40 at the package's N
    assert auto_budget(3) < auto_budget(8) <= auto_budget(20) == 40
    assert ComposeConfig(n_experts=8).resolved().budget == auto_budget(8)
    assert ComposeConfig(n_experts=8).resolved().patience == auto_patience(8)
    # a number runs that many steps, unless a patience is given with it
    assert ComposeConfig(budget=40).resolved().patience is None
    assert ComposeConfig(budget=40, patience=5).resolved().patience == 5
    assert ComposeConfig(patience=7).resolved().patience == 7


def test_the_paper_keeps_40_steps_and_the_package_protocols_take_auto():
    assert (PAPER_COMPOSE.resolved().budget, PAPER_COMPOSE.resolved().patience) == (40, None)
    for name in ("lorahub", "compeft"):
        assert make_method(name).params.compose_config().budget == 40
    for name in ("select", "select-compeft"):
        assert make_method(name).params.compose_config().budget == "auto"


def constant(ws):
    return [1.0] * len(ws)


def test_patience_stops_a_search_that_no_longer_improves():
    n = 3
    whole = search(constant, n, 40, "Shiwa", 1.5, [1], progress=False)[0]
    assert len(whole.losses) == 40
    stopped = search(constant, n, 40, "Shiwa", 1.5, [1], progress=False, patience=5)[0]
    assert len(stopped.losses) == 6  # the first step, then 5 without improvement
    # never before COBYLA's initial simplex (n + 1 points) is evaluated
    early = search(constant, n, 40, "Shiwa", 1.5, [1], progress=False, patience=1)[0]
    assert len(early.losses) == n + 1


def test_patience_keeps_a_search_going_while_it_improves():
    target = np.array([0.9, -0.6, 0.3])

    def bowl(ws):
        return [float(((w - target) ** 2).sum()) for w in ws]

    stopped = search(bowl, 3, 40, "Shiwa", 1.5, [1], progress=False, patience=5)[0]
    whole = search(bowl, 3, 40, "Shiwa", 1.5, [1], progress=False)[0]
    assert 6 < len(stopped.losses) <= 40
    assert stopped.losses == whole.losses[:len(stopped.losses)]  # the same search, cut short
    assert stopped.best_loss < 0.05 * bowl([np.zeros(3)])[0]


def test_restarts_stop_one_by_one():
    calls = []

    def count(ws):
        calls.append(len(ws))
        return constant(ws)

    outcomes = search(count, 2, 30, "Shiwa", 1.5, [1, 2], progress=False, patience=4)
    assert [len(o.losses) for o in outcomes] == [5, 5] and sum(calls) == 10


def test_the_default_counts_its_forwards_in_the_result_and_composition_json(experts, tmp_path):
    result = compose(experts, support.constant_task("red"), progress=False)
    t = result.timings
    assert t["steps"] == len(result.losses) <= auto_budget(len(experts))
    # 3 given: none to choose, but each scored alone once to start at the best (start "best")
    assert t["forwards"] == t["steps"] and t["select_forwards"] == len(experts)
    saved = json.loads((result.save_adapter(tmp_path / "out") / COMPOSITION_NAME).read_text())
    assert saved["forwards"] == {"steps": t["steps"], "forwards": t["forwards"],
                                 "select_forwards": len(experts)}
    assert saved["start"] == "best"
    assert compose(experts, support.constant_task("red"), start="zero",
                   progress=False).timings["select_forwards"] == 0
    chosen = compose(experts, support.constant_task("red"), n_experts=2, budget=4,
                     progress=False)
    assert chosen.timings["select_forwards"] == 3 and chosen.timings["forwards"] == 4


def test_the_command_line_reads_budget_auto_and_refuses_a_bad_one(experts, tmp_path, capsys):
    from lorahub_compeft.cli import main
    examples = tmp_path / "task.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in support.constant_task("red")))
    argv = ["compose", "--experts", *experts, "--examples", str(examples), "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--budget", "auto", "--patience", "3"]) == 0
    saved = json.loads((tmp_path / "a" / COMPOSITION_NAME).read_text())
    assert saved["forwards"]["steps"] <= auto_budget(len(experts))
    for bad in ("0", "fast"):
        with pytest.raises(SystemExit) as exit_:
            main(argv + ["--out", str(tmp_path / "b"), "--budget", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--budget: expected a positive integer" in err and "or 'auto'" in err
