"""`bbh --experts` takes compressed expert files as they are: composed as they are, and the
compressed methods use them without compressing again."""
import json

from conftest import BBH
from lorahub_compeft import compress
from lorahub_compeft.cli import main
from lorahub_compeft.io.files import sha256_file


def test_bbh_takes_expert_files(tiny_t5, experts, tmp_path):
    files = [str(compress(d, density=0.3).save(tmp_path / f"e{i}.safetensors"))
             for i, d in enumerate(experts)]
    out = tmp_path / "run"
    argv = ["bbh", "--model", str(tiny_t5), "--experts", *files, "--tasks", "navigate",
            "--seeds", "1", "-n", "2", "--budget", "2", "--bbh-dir", str(BBH), "--max-eval", "2",
            "--methods", "lorahub,compeft", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["compeft", "lorahub"]
    digests = {sha256_file(f) for f in files}
    for row in rows:
        assert row["experts"] and {e["sha256"] for e in row["experts"]} <= digests
    assert not (out / "compressed").exists() or not any((out / "compressed").rglob("*.safetensors"))
