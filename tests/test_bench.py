"""Benchmark scripts run in --quick mode and print well-formed tables (no timing is asserted)."""
import json
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
