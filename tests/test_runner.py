import pytest

import support  # noqa: F401  (tests/ is on sys.path via conftest)
from conftest import SHARED_DATA
from lorahub_compeft import runner
from lorahub_compeft.report import markdown, report
from lorahub_compeft.runner import RunConfig, read_jsonl, run, sample_experts

BBH = SHARED_DATA / "bbh" / "tasks"
pytestmark = pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")


@pytest.fixture(scope="module")
def experts(tiny_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("bbh-experts")
    return [str(support.train_expert(tiny_t5, root / w, support.constant_task(w), steps=15))
            for w in ("red", "green", "blue")]


def _config(tiny_t5, experts, out):
    return RunConfig(model=str(tiny_t5), out=out, tasks=["boolean_expressions", "navigate"],
                     methods=["zeroshot", "icl", "lorahub", "compeft"], seeds=[1, 2],
                     experts=experts, n_experts=2, density=0.3, budget=3, bbh_dir=str(BBH),
                     max_eval=4)


def test_end_to_end_resume_and_report(tiny_t5, experts, tmp_path, monkeypatch):
    cfg = _config(tiny_t5, experts, tmp_path / "out")
    rows = run(cfg, progress=False)
    assert len(rows) == 2 * 2 * 4
    for r in rows:
        assert 0 <= r["em"] <= 100 and r["n_eval"] == 4 and r["seconds"] > 0
    composed = [r for r in rows if r["method"] in ("lorahub", "compeft")]
    assert all(len(r["weights"]) == 2 and r["bytes_read"] > 0 for r in composed)
    # same seed: same expert sample for both composition methods, and smaller files for compeft
    for task in cfg.tasks:
        for seed in cfg.seeds:
            dense, small = (next(r for r in rows if (r["task"], r["seed"], r["method"]) == (task, seed, m))
                            for m in ("lorahub", "compeft"))
            assert dense["experts"] == small["experts"] == sample_experts(experts, 2, seed)
            assert small["bytes_read"] < dense["bytes_read"]
    preds = read_jsonl(cfg.out / "predictions.jsonl")
    assert len(preds) == 16 and all(len(p["predictions"]) == 4 for p in preds)

    # Interrupt: drop two finished cells and leave a half-written line behind.
    results = cfg.out / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:-2]) + lines[-2][:25])
    calls = []
    real = runner.run_cell
    monkeypatch.setattr(runner, "run_cell", lambda *a: calls.append(a[1:]) or real(*a))
    rows = run(cfg, progress=False)
    assert len(calls) == 2  # only the lost cells were recomputed
    assert len(rows) == 16 and len(read_jsonl(results)) == 16
    assert all(line.endswith("}") for line in results.read_text().splitlines())
    calls.clear()
    run(cfg, progress=False)
    assert calls == []

    text = report(cfg.out)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = table[0].split("|")[1:-1]
    assert [h.strip() for h in header] == ["Task", "Zero-shot", "ICL", "LoraHub (avg)", "ComPEFT (avg)",
                                           "LoraHub (loss-picked)", "ComPEFT (loss-picked)",
                                           "LoraHub (oracle best)", "ComPEFT (oracle best)"]
    assert sum(1 for line in table if line.startswith("| boolean_expressions") or
               line.startswith("| navigate")) == 2 * 2  # EM table + bytes table
    assert any("**Average**" in line for line in table)
    assert (cfg.out / "report.md").exists()


def test_report_math_on_hand_written_rows():
    rows = [{"task": "t", "seed": s, "method": m, "em": em}
            for s, m, em in [(1, "lorahub", 10.0), (2, "lorahub", 30.0), (1, "zeroshot", 5.0),
                             (2, "zeroshot", 5.0)]]
    text = markdown(rows)
    assert "| t | 5.0 | 20.0 | 30.0 |" in text


def test_bad_configuration_is_refused(tiny_t5, experts, tmp_path):
    cfg = _config(tiny_t5, experts, tmp_path / "o")
    cfg.methods = ["zeroshot", "magic"]
    with pytest.raises(ValueError, match="unknown method"):
        run(cfg, progress=False)
    cfg = _config(tiny_t5, experts, tmp_path / "o")
    cfg.n_experts = 5
    with pytest.raises(ValueError, match="3 experts given"):
        run(cfg, progress=False)
    cfg = _config(tiny_t5, experts, tmp_path / "o")
    cfg.tasks = ["no_such_task"]
    with pytest.raises(ValueError, match="no_such_task"):
        run(cfg, progress=False)


def test_worker_processes_give_the_same_results(tiny_t5, experts, tmp_path):
    cfg = _config(tiny_t5, experts, tmp_path / "serial")
    cfg.methods, cfg.tasks = ["zeroshot", "compeft"], ["navigate"]
    serial = run(cfg, progress=False)
    cfg.out = tmp_path / "parallel"
    parallel = run(cfg, workers=2, progress=False)
    key = lambda r: (r["task"], r["seed"], r["method"])
    assert sorted(map(key, serial)) == sorted(map(key, parallel))
    by_key = {key(r): r for r in serial}
    for r in parallel:
        assert r["em"] == by_key[key(r)]["em"]
        assert r.get("weights") == by_key[key(r)].get("weights")
    assert len(read_jsonl(cfg.out / "predictions.jsonl")) == len(parallel)


def test_report_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from lorahub_compeft.report import plot
    rows = [{"task": "t", "seed": 1, "method": m, "em": em} for m, em in [("zeroshot", 0.0), ("icl", 40.0)]]
    path = plot(rows, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_both_protocols_side_by_side(tiny_t5, experts, tmp_path):
    """The paper's random draw and selection by loss in one run, labelled in the report."""
    cfg = RunConfig(model=str(tiny_t5), out=tmp_path / "out", tasks=["navigate"],
                    methods=["lorahub", "select", "select-compeft"], seeds=[1, 2],
                    experts=experts, n_experts=2, select_n=1, budget=4, bbh_dir=str(BBH),
                    max_eval=3)
    rows = run(cfg, progress=False)
    by = {(r["method"], r["seed"]): r for r in rows}
    for seed in cfg.seeds:
        assert by["lorahub", seed]["experts"] == sample_experts(experts, 2, seed)
        for method in ("select", "select-compeft"):
            row = by[method, seed]
            assert len(row["experts"]) == 1 and len(row["selection_scores"]) == 3
            best = min(row["selection_scores"], key=row["selection_scores"].get)
            assert row["experts"][0].endswith(best)
    text = markdown(read_jsonl(cfg.out / "results.jsonl"))
    for label in ("LoraHub (avg)", "Select (avg)", "Select ComPEFT (avg)",
                  "Select (loss-picked)", "LoraHub (oracle best)"):
        assert label in text
