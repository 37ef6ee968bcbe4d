"""scripts/protocols.py: how a validation row is keyed and compared with the package default's,
on rows made up here."""
import math
import statistics

import pytest

from lorahub_compeft.config import CompeftOptions, ComposeConfig
from protocols import l1_of, main, paired_differences, replayed_rows

DEFAULT = {"n": 3, "mix": "factors", "budget": "auto", "start": "best"}


def row(task, seed, em, method="select-dense", **changes):
    density = CompeftOptions().density if method.endswith("compeft") else None
    return {"method": method, "task": task, "seed": seed, "em": em, "density": density,
            **DEFAULT, **changes}


def test_a_row_is_paired_with_the_default_of_its_method_cell_by_cell():
    rows = [row("a", 101, 50.0), row("b", 101, 60.0), row("a", 102, 70.0), row("b", 102, 80.0),
            row("a", 101, 54.0, mix="product"), row("b", 101, 62.0, mix="product"),
            row("a", 102, 70.0, mix="product"), row("b", 102, 76.0, mix="product"),
            row("a", 103, 99.0, mix="product"),  # no default row for this cell: not paired
            row("a", 101, 40.0, method="select-compeft"),
            row("a", 101, 45.0, method="select-compeft", l1=0.2)]
    label = lambda r: (r["method"], r["mix"], l1_of(r))
    paired = paired_differences(rows, label)
    assert set(paired) == {("select-dense", "product", ComposeConfig().l1),
                           ("select-compeft", "factors", 0.2)}
    against, diff, se, cells = paired[("select-dense", "product", ComposeConfig().l1)]
    assert against == ("select-dense", "factors", ComposeConfig().l1) and cells == 4
    assert diff == pytest.approx((4 + 2 + 0 - 4) / 4)
    # the standard error is over the per-seed means (+3 and -2), not over the cells
    assert se == pytest.approx(statistics.stdev([3.0, -2.0]) / math.sqrt(2))
    against, diff, se, cells = paired[("select-compeft", "factors", 0.2)]
    assert (diff, cells) == (5.0, 1) and math.isnan(se)


def test_l1_is_part_of_a_rows_setting_and_old_rows_ran_the_default():
    assert l1_of({"method": "select-dense"}) == ComposeConfig().l1
    ran = row("a", 101, 50.0, budget="30:8")  # at the default l1, 30:8 ran itself
    old = row("a", 101, 51.0, derived={"30:8": {"em": 55.0, "loss": 0.1, "steps": 20}})
    new = row("a", 101, 60.0, l1=0.2, derived={"30:8": {"em": 65.0, "loss": 0.1, "steps": 20}})
    replayed = replayed_rows([ran, old, new])  # so only l1 = 0.2's 30:8 is replayed
    assert [(l1_of(r), r["em"], r["budget"]) for r in replayed] == [(0.2, 65.0, "30:8")]


def test_a_bad_l1_is_refused_before_any_cell(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--split", "validation", "--seeds", "101", "--l1", "0.1,-1",
              "--rows", str(tmp_path / "rows.jsonl")])
    assert "--l1" in capsys.readouterr().err
    assert not (tmp_path / "rows.jsonl").exists()
