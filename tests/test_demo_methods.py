"""`demo --methods` and `demo --mix` on the shipped zoo: any of the runner's methods side by
side, each mix recorded in the rows; a method that does not exist is one line, exit 2."""
import json

import pytest

from lorahub_compeft.cli import main
from lorahub_compeft.eval.methods import METHODS

QUICK = ["demo", "--tasks", "heldout_pair_total", "--seeds", "1", "--budget", "2", "--eval", "8",
         "--threads", "1"]


def test_demo_runs_the_methods_named(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(QUICK + ["--methods", "zeroshot,single,uniform", "-n", "2", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())
    for method in ("zeroshot", "single", "uniform"):
        assert 0 <= row[method] <= 100
    assert len(row["single_weights"]) == 1 and list(row["single_weights"].values()) == [1.0]
    assert len(row["uniform_weights"]) == 2  # -n went to the method that takes it
    assert set(row["uniform_weights"].values()) == {0.5}
    assert "dense" not in row and "compeft" not in row  # not the default three
    table = capsys.readouterr().out
    assert "| task | zeroshot | single | uniform | s/seed |" in table
    assert "| heldout_pair_total |" in table


def test_demo_records_the_mix_and_start_each_method_ran_with(tmp_path):
    product, default = tmp_path / "product.json", tmp_path / "default.json"
    assert main(QUICK + ["-n", "2", "--mix", "product", "--json", str(product)]) == 0
    assert main(QUICK + ["-n", "2", "--json", str(default)]) == 0
    [p], [d] = json.loads(product.read_text()), json.loads(default.read_text())
    assert (p["dense_mix"], p["compeft_mix"]) == ("product", "product")
    assert (d["dense_mix"], d["compeft_mix"]) == ("factors", "factors")  # LoraHub's protocol
    assert (d["dense_start"], d["compeft_start"]) == ("zero", "zero")  # LoraHub's start
    best = tmp_path / "best.json"
    assert main(QUICK + ["-n", "2", "--start", "best", "--json", str(best)]) == 0
    [b] = json.loads(best.read_text())
    assert (b["dense_start"], b["compeft_start"]) == ("best", "best")


@pytest.mark.parametrize("methods, problem", [("zeroshot,nonesuch", "no method 'nonesuch'"),
                                              ("select,select", "a method named twice")])
def test_demo_refuses_unknown_methods_in_one_line(methods, problem, tmp_path, capsys):
    assert main(["demo", "--methods", methods, "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err
    assert all(name in err for name in METHODS)  # the valid names, listed
    assert not (tmp_path / "x.json").exists()


def test_demo_methods_and_select_are_one_choice(capsys):
    assert main(["demo", "--methods", "select", "--select", "loss"]) == 2
    assert "--select" in capsys.readouterr().err
