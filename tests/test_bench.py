"""Benchmark scripts run in --quick mode and print well-formed tables (no timing is asserted)."""
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_codec_quick(tmp_path, lora_dir):
    out = tmp_path / "codec.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_codec.py"), "--quick", str(lora_dir),
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert len(results) == 2  # the flan-t5-large-shaped adapter (small in --quick) and lora_dir
    for rows in results.values():
        assert {r["encoding"] for r in rows} == {"golomb", "bitmask"}
        for r in rows:
            assert r["decode_s"] > 0 and r["file_bytes"] > r["payload_bytes"] and 0 <= r["rel_error"] <= 1.5
    # For a real-sized adapter the smaller file wins; a 3k-parameter one is all header and latency.
    shaped = next(iter(results.values()))
    assert all(r["fetch20_s"] < r["fetch20_dense_fp32_s"] and r["ratio_fp16"] > 1 for r in shaped)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2 * 3  # per adapter: a header and one row per encoding


def test_bench_compose_quick(tmp_path):
    """All our methods always run (dense, ComPEFT with default settings, fp32, bf16, K=4, 8);
    the lorahub reference runs only where it is importable (the test installs nothing), and is
    otherwise reported as skipped with the reason."""
    out = tmp_path / "compose.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_compose.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows, sizes = report["rows"], report["library_sizes"]
    ours = {"ours-dense", "ours-compeft", "ours-compeft-fp32", "ours-compeft-bf16",
            "ours-compeft-k4", "ours-compeft-k8"}
    assert set(rows) == {"reference", "ours-select"} | ours and sizes == [20, 50, 200]
    select = rows.pop("ours-select")  # choosing 3 of the 196 first experts of the 200 library
    assert select["candidates"] == 196 and select["n"] == 3 and select["exact"] < 196
    assert select["select_s"] > select["estimate_s"] > 0 and select["ratio"] > 1
    measured = [m for m in rows if "skipped" not in rows[m]]
    assert ours <= set(measured)
    if "skipped" in rows["reference"]:
        assert "lorahub" in rows["reference"]["skipped"] and report["ratios"] == {}
    else:
        assert set(report["ratios"]) == ours
    assert rows["ours-compeft-bf16"]["dtype"] == "bfloat16"
    assert rows["ours-compeft-fp32"]["dtype"] == "float32"
    # 5 evaluations: K=4 takes 2 forwards (4 + 1), K=8 one.
    assert [rows[m]["forwards"] for m in ("ours-compeft", "ours-compeft-k4", "ours-compeft-k8")] \
        == [5, 2, 1]
    for method in measured:
        r = rows[method]
        assert r["steps"] == 5
        for key in ("mix_s", "forward_s", "steps_s", "wall_s", "peak_rss_mb", "expert_bytes"):
            assert r[key] > 0, (method, key)
        assert math.isfinite(r["best_loss"])
    for method in ("ours-dense", "ours-compeft"):  # the library measurements
        r = rows[method]
        assert set(r["library"]) == {str(s) for s in sizes}
        assert all(v["held_bytes"] > 0 and v["disk_bytes"] > 0 for v in r["library"].values())
    # ComPEFT experts are smaller where they are stored (a library of compressed files against
    # the same number of PEFT dirs) and where they are composed (sparse stack vs dense rows).
    dense, compeft = rows["ours-dense"]["library"], rows["ours-compeft"]["library"]
    assert all(compeft[s]["disk_bytes"] < dense[s]["disk_bytes"] for s in dense)
    assert rows["ours-compeft"]["expert_bytes"] < rows["ours-dense"]["expert_bytes"] / 4
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    # A header and one row per method; the library table has the reference and the two
    # methods measured on libraries; the selection table a header and one row.
    assert len(table) == (1 + 7) + (1 + 3) + (1 + 1)


def test_bench_compose_mixes_products_when_asked(tmp_path):
    """--mix product: our methods compose in product space (the reference has no such mode and
    is not asked for), and the report says which mix ran."""
    out = tmp_path / "compose.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_compose.py"), "--quick",
                           "--mix", "product", "--n-experts", "3", "--library-sizes", "3",
                           "--methods", "ours-dense,ours-compeft", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["config"]["mix"] == "product" and set(report["rows"]) == {"ours-dense", "ours-compeft"}
    for row in report["rows"].values():
        assert row["mix"] == "product" and row["steps"] == 5 and row["mix_s"] > 0
    assert "ours mixing product" in proc.stdout
