import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from conftest import BBH, METHOD_NAMES, SEEDS, TASKS, bbh_argv
from lorahub_compeft.eval import runner
from lorahub_compeft.cli import main
from lorahub_compeft.eval.methods import METHODS, CompeftParams, Compeft, make_method, register
from lorahub_compeft.eval.pool import ExpertPool
from lorahub_compeft.eval.report import markdown, report
from lorahub_compeft.eval.cells import plan, setting_key
from lorahub_compeft.eval.runner import run
from lorahub_compeft.io.files import read_jsonl
from lorahub_compeft.eval.benchmarks import BBHBenchmark

pytestmark = pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")


def cells_for(tiny_t5, experts, out, density=0.3, methods=METHOD_NAMES, tasks=TASKS):
    options = {"n_experts": 2, "budget": 3, "density": density}
    made = [make_method(m, **{k: v for k, v in options.items() if k in
                              METHODS[m].Params.__dataclass_fields__}) for m in methods]
    return plan(BBHBenchmark(str(BBH), 5, max_eval=4), tasks, SEEDS, made, str(tiny_t5),
                ExpertPool.from_sources(experts, out / "compressed"))


def by_key(out):
    rows = {r["key"]: r for r in read_jsonl(out / "results.jsonl")}
    preds = {p["key"]: p["predictions"] for p in read_jsonl(out / "predictions.jsonl")}
    return rows, preds


def same_results(out, reference):
    rows, preds = by_key(out)
    ref_rows, ref_preds = by_key(reference)
    assert set(rows) == set(ref_rows) and len(rows) == 16
    for key, r in rows.items():
        assert r["em"] == ref_rows[key]["em"] and preds[key] == ref_preds[key]
        assert r.get("weights") == pytest.approx(ref_rows[key].get("weights"), abs=1e-6) \
            if r.get("weights") else True


def test_rows_hold_their_setting_and_report(uninterrupted, experts):
    rows, preds = by_key(uninterrupted)
    assert len(rows) == 16 and set(preds) == set(rows)
    for key, r in rows.items():
        s = r["setting"]
        assert setting_key(s) == key and (r["task"], r["seed"], r["method"]) == (s["task"], s["seed"], s["method"])
        assert s["data"]["source"] == "bbh" and s["data"]["max_eval"] == 4 and len(s["data"]["sha256"]) == 64
        assert os.path.isabs(s["model"]) and 0 <= r["em"] <= 100 and r["n_eval"] == 4
        if r["method"] in ("lorahub", "compeft"):
            assert s["params"]["n_experts"] == 2 and s["params"]["budget"] == 3
            assert s["experts"]["count"] == 3 and len(r["experts"]) == 2
            assert all(len(e["sha256"]) == 64 for e in r["experts"])
        else:
            assert s["experts"] is None
    compeft = [r for r in rows.values() if r["method"] == "compeft"]
    assert all(r["setting"]["params"]["density"] == 0.3 for r in compeft)
    for r in compeft:  # same seed: the same experts as lorahub, in smaller files
        dense = next(d for d in rows.values() if d["method"] == "lorahub"
                     and (d["task"], d["seed"]) == (r["task"], r["seed"]))
        assert r["experts"] == dense["experts"] and r["bytes_read"] < dense["bytes_read"]
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["runs"][0]["argv"][:2] == ["lorahub-compeft", "bbh"]
    text = report(uninterrupted)
    header = [h.strip() for h in text.splitlines()[2].split("|")[1:-1]]
    assert header == ["Task", "Zero-shot", "ICL", "LoraHub (avg)", "ComPEFT (avg)",
                      "LoraHub (loss-picked)", "ComPEFT (loss-picked)", "LoraHub (oracle best)",
                      "ComPEFT (oracle best)"]
    assert "density=0.3" in text and "**Average**" in text


def test_another_setting_computes_new_cells_and_report_shows_both(uninterrupted, tiny_t5, experts,
                                                                   tmp_path, monkeypatch):
    out = tmp_path / "out"
    for name in ("results.jsonl", "predictions.jsonl"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text((uninterrupted / name).read_text())
    ran = []
    real = runner.Worker.run
    monkeypatch.setattr(runner.Worker, "run", lambda self, cell: ran.append(cell) or real(self, cell))
    assert main(bbh_argv(tiny_t5, experts, out, "--density", "0.5", "--alpha", "2")) == 0
    assert sorted({(c.method.name, c.method.params.density, c.method.params.alpha) for c in ran}) == \
        [("compeft", 0.5, 2.0)] and len(ran) == 4  # only the cells of the new setting
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 20
    text = report(out)
    assert "ComPEFT [2] (avg)" in text
    assert "density=0.3" in text and "density=0.5" in text and "alpha=2.0" in text
    ran.clear()
    assert main(bbh_argv(tiny_t5, experts, out, "--density", "0.5", "--alpha", "2")) == 0
    assert ran == []  # nothing left to do
    assert len(json.loads((out / "config.json").read_text())["runs"]) == 2


def test_torn_line_in_the_middle_skips_only_that_line(uninterrupted, tiny_t5, experts, tmp_path,
                                                      monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    lines = (uninterrupted / "results.jsonl").read_text().splitlines(keepends=True)
    torn = json.loads(lines[5])["key"]
    lines[5] = lines[5][:40] + "\n"
    (out / "results.jsonl").write_text("".join(lines))
    (out / "predictions.jsonl").write_text((uninterrupted / "predictions.jsonl").read_text())
    assert len(read_jsonl(out / "results.jsonl")) == 15  # every whole line, before and after
    ran = []
    real = runner.Worker.run
    monkeypatch.setattr(runner.Worker, "run", lambda self, cell: ran.append(cell) or real(self, cell))
    run(cells_for(tiny_t5, experts, out), out, progress=False)
    assert [setting_key(c.setting()) for c in ran] == [torn]
    same_results(out, uninterrupted)
    assert all(json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())


def test_kill_between_the_two_appends_leaves_no_duplicate(uninterrupted, tiny_t5, experts, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "out"
    real_append = runner._append

    def dies_after_predictions(path, row):
        real_append(path, row)
        if path.name == "predictions.jsonl":
            raise KeyboardInterrupt  # as if killed before the results line
    monkeypatch.setattr(runner, "_append", dies_after_predictions)
    with pytest.raises(KeyboardInterrupt):
        run(cells_for(tiny_t5, experts, out), out, progress=False)
    assert len(read_jsonl(out / "predictions.jsonl")) == 1 and not read_jsonl(out / "results.jsonl")
    monkeypatch.setattr(runner, "_append", real_append)
    run(cells_for(tiny_t5, experts, out), out, progress=False)
    keys = [p["key"] for p in read_jsonl(out / "predictions.jsonl")]
    assert len(keys) == len(set(keys)) == 16
    same_results(out, uninterrupted)


def test_kill_9_during_a_real_run_resumes_to_the_uninterrupted_results(uninterrupted, tiny_t5,
                                                                       experts, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lorahub_compeft.cli", *bbh_argv(tiny_t5, experts, out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(read_jsonl(out / "results.jsonl")) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_jsonl(out / "results.jsonl"))
    assert 3 <= killed_at < 16, "the run finished before it could be killed"
    assert main(bbh_argv(tiny_t5, experts, out)) == 0
    same_results(out, uninterrupted)
    keys = [p["key"] for p in read_jsonl(out / "predictions.jsonl")]
    assert len(keys) == len(set(keys))


def test_one_model_per_worker_and_composition_does_not_reload_it(tiny_t5, experts, tmp_path,
                                                                 monkeypatch):
    import lorahub_compeft.io.models as evaluate
    loads = []
    real = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    rows = run(cells_for(tiny_t5, experts, tmp_path, tasks=["navigate"]), progress=False)
    assert len(rows) == 8 and len(loads) == 1


def test_worker_processes_give_the_same_results(uninterrupted, tiny_t5, experts, tmp_path):
    out = tmp_path / "parallel"
    run(cells_for(tiny_t5, experts, out), out, workers=2, progress=False)
    same_results(out, uninterrupted)
    assert len({r["worker"] for r in read_jsonl(out / "results.jsonl")}) <= 2


@dataclass(frozen=True)
class SelectParams(CompeftParams):
    select: str = "random"
    restarts: int = 1


def test_a_new_method_is_a_small_class_and_its_parameters_key_its_results(tiny_t5, experts, tmp_path):
    @register
    class CompeftSelect(Compeft):  # the shape of a selection protocol
        name, Params = "compeft-select-test", SelectParams

    try:
        params = SelectParams(n_experts=2, budget=3, density=0.3, alpha="auto", restarts=3)
        assert SelectParams.from_json(json.loads(json.dumps(params.to_json()))) == params
        with pytest.raises(ValueError, match="unknown parameter"):
            make_method("compeft-select-test", sparsity=0.3)
        one, other = (make_method("compeft-select-test", select=s, n_experts=2) for s in ("random", "loss"))
        keys = {setting_key(c.setting()) for m in (one, other) for c in
                plan(BBHBenchmark(str(BBH), 5, 4), ["navigate"], [1], [m], str(tiny_t5),
                     ExpertPool.from_sources(experts))}
        assert len(keys) == 2
        with pytest.raises(ValueError, match="taken"):
            register(type("Clash", (Compeft,), {"name": "compeft"}))
    finally:
        METHODS.pop("compeft-select-test", None)


def test_bad_configuration_is_refused_before_any_cell(tiny_t5, experts, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        make_method("magic")
    with pytest.raises(ValueError, match="3 were given"):
        plan(BBHBenchmark(str(BBH)), ["navigate"], [1], [make_method("lorahub", n_experts=5)],
             str(tiny_t5), ExpertPool.from_sources(experts))
    with pytest.raises(ValueError, match="no_such_task"):
        plan(BBHBenchmark(str(BBH)), ["no_such_task"], [1], [make_method("zeroshot")], str(tiny_t5))
    with pytest.raises(ValueError, match="not a Hub id"):
        ExpertPool.from_sources(["./no/such/dir"])
    assert main(["bbh", "--model", str(tiny_t5), "--experts", "./nope", "--tasks", "navigate",
                 "--bbh-dir", str(BBH), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_report_math_on_hand_written_rows():
    rows = [{"task": "t", "seed": s, "method": m, "em": em}
            for s, m, em in [(1, "lorahub", 10.0), (2, "lorahub", 30.0), (1, "zeroshot", 5.0),
                             (2, "zeroshot", 5.0)]]
    assert "| t | 5.0 | 20.0 | 30.0 |" in markdown(rows)


def test_report_picks_a_seed_by_few_shot_loss_beside_the_oracle():
    rows = [{"task": "t", "seed": s, "method": "lorahub", "em": em, "best_loss": loss}
            for s, em, loss in [(1, 10.0, 0.5), (2, 30.0, 0.9), (3, 20.0, 0.7)]]
    text = markdown(rows)
    assert "LoraHub (avg) | LoraHub (loss-picked) | LoraHub (oracle best)" in text
    assert "| t | 20.0 | 10.0 | 30.0 |" in text  # seed 1 has the lowest loss, seed 2 the best EM


def test_report_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from lorahub_compeft.eval.report import plot
    rows = [{"task": "t", "seed": 1, "method": m, "em": em} for m, em in [("zeroshot", 0.0), ("icl", 40.0)]]
    path = plot(rows, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selection_protocols_run_beside_the_papers(tiny_t5, experts, tmp_path):
    """select / select-compeft (the package's protocol) and lorahub (the paper's) in one run:
    each keyed by its own setting; selection composes the N of the pool with the lowest loss."""
    options = {"n_experts": 2, "budget": 3}
    methods = [make_method("lorahub", **options), make_method("select", **options),
               make_method("select-compeft", **options)]
    assert make_method("select").params.n_experts == 3
    assert make_method("select-compeft").params.alpha == "auto"
    cells = plan(BBHBenchmark(str(BBH), 5, max_eval=4), ["navigate"], [1], methods, str(tiny_t5),
                 ExpertPool.from_sources(experts, tmp_path / "compressed"))
    rows = {r["method"]: r for r in run(cells, tmp_path / "out", progress=False)}
    assert set(rows) == {"lorahub", "select", "select-compeft"}
    assert len({r["key"] for r in rows.values()}) == 3
    for method in ("select", "select-compeft"):
        r = rows[method]
        assert r["setting"]["params"]["restarts"] == 1 and len(r["experts"]) == 2
        assert {e["name"] for e in r["experts"]} <= set(experts)
        assert r["files_read"] == 3  # every expert of the pool was a candidate
    assert rows["select-compeft"]["setting"]["params"]["per_tensor"] is True


@pytest.mark.parametrize("option", [{"workers": 2.5}, {"workers": 0}, {"batch_size": 0},
                                    {"batch_size": 10 ** 12}, {"batch_size": "8"}])
def test_run_refuses_counts_out_of_range_before_writing(tiny_t5, experts, tmp_path, option):
    out = tmp_path / "run"
    cells = cells_for(tiny_t5, experts, tmp_path, methods=["zeroshot"])
    with pytest.raises(ValueError, match=next(iter(option))):
        run(cells, out, progress=False, **option)
    assert not out.exists()
