"""scripts/baseline_grid.py --split demo: the methods table's settings and its arithmetic
(seed average, per-task seed std, loss-picked and oracle seed), on rows made up here."""
import statistics

import pytest

from baseline_grid import common_cells, demo_methods, main, methods_table
from lorahub_compeft.config import CompeftOptions


def row(method, task, seed, em, loss=None, mix=None, seconds=1.0, start=None):
    params = {"mix": mix} if mix else {}
    params.update({"start": start} if start else {})
    r = {"method": method, "task": task, "seed": seed, "em": em, "seconds": seconds,
         "setting": {"params": params, "data": {"source": "zoo"}}}
    return dict(r, best_loss=loss) if loss is not None else r


def test_each_mix_is_a_setting_and_compeft_runs_at_the_default_compression():
    methods = demo_methods(["zeroshot", "lorahub", "compeft", "single"], ["factors", "product"])
    assert [(m.name, getattr(m.params, "mix", None)) for m in methods] == [
        ("zeroshot", None), ("lorahub", "factors"), ("lorahub", "product"),
        ("compeft", "factors"), ("compeft", "product"), ("single", None)]
    default = CompeftOptions()
    for m in methods[3:5]:  # not the paper's k = 0.1 (compeft's own default)
        assert (m.params.density, m.params.alpha, m.params.per_tensor) == \
            (default.density, default.alpha, default.per_tensor)
    # each start a setting too, for the methods that take one
    started = demo_methods(["select", "uniform"], ["factors"], ["best", "zero"])
    assert [(m.name, getattr(m.params, "start", None)) for m in started] == [
        ("select", "best"), ("select", "zero"), ("uniform", None)]


def test_the_table_averages_seeds_then_tasks_and_picks_seeds_by_loss():
    rows = [row("lorahub", "a", 1, 50.0, loss=0.3), row("lorahub", "a", 2, 70.0, loss=0.1),
            row("lorahub", "b", 1, 20.0, loss=0.2), row("lorahub", "b", 2, 10.0, loss=0.4),
            row("lorahub", "a", 1, 90.0, loss=0.5, mix="product"),
            row("lorahub", "b", 1, 30.0, loss=0.5, mix="product"),
            row("lorahub", "a", 1, 80.0, loss=0.5, start="best"),
            row("zeroshot", "a", 1, 5.0), row("zeroshot", "a", 2, 7.0)]
    lines = {line.split(" | ")[0]: line.split(" | ") for line in methods_table(rows).splitlines()[2:]}
    factors = lines["| lorahub (factors, start zero)"]  # rows without a start began at 0
    assert float(factors[1]) == pytest.approx((60 + 15) / 2, abs=0.05)  # seed average
    std = (statistics.stdev([50, 70]) + statistics.stdev([20, 10])) / 2
    assert float(factors[2]) == pytest.approx(std, abs=0.05)
    assert float(factors[3]) == pytest.approx((70 + 20) / 2, abs=0.05)  # lowest loss per task
    assert float(factors[4]) == pytest.approx((70 + 20) / 2, abs=0.05)  # oracle: best per task
    assert factors[6].startswith("2 × 2 (4 cells)")
    assert float(lines["| lorahub (product, start zero)"][1]) == 60.0
    assert float(lines["| lorahub (factors, start best)"][1]) == 80.0
    assert lines["| zeroshot"][3] == "–"  # no few-shot loss to pick by
    # only the (task, seed) pairs every setting holds: a, seed 1
    common = common_cells(rows)
    assert {(r["task"], r["seed"]) for r in common} == {("a", 1)}


def test_demo_seeds_are_refused_for_validation(tmp_path):
    with pytest.raises(SystemExit):
        main(["--seeds", "1-2", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):  # the real BBH rows are reported, never validated on
        main(["--seeds", "101", "--sources", "bbh", "--out", str(tmp_path / "x")])
