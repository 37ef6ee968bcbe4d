"""The fault campaign's quick mode: a few dozen mutated files and one kill -9 of `library add`
end in a refusal, the original weights, or a forger's (finite) weights, and the rerun
finishes the job; hand-edited run folders are read (what cannot be used skipped) or refused,
no line but a torn one lost; the targeted forgeries (format-1 dtype and codec edits, payload
and ERE forgeries, a forged r, regex target_modules) are refused, and hand-edited library
indexes are listed, added to and rebuilt or refused in one line, nothing deleted. The full campaign's figures are in README ("Guarantees")."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_campaign.py"


def test_quick_campaign_finds_no_failure(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--files", "30", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    outcomes = figures["fuzz"]["outcomes"]
    assert sum(outcomes.values()) == 30 and outcomes.get("refused", 0) > 0
    assert set(outcomes) <= {"refused", "identical", "different"}
    kill = figures["kill"]
    assert kill["trials"] == 1 and kill["rerun_finished"] == 1 and kill["listed_damaged"] == 0
    runs = figures["run_files"]["outcomes"]
    assert sum(runs.values()) == 20 and runs.get("read", 0) > 0 and runs.get("refused", 0) > 0
    assert set(runs) <= {"read", "refused"}
    cases = figures["cases"]
    families = {k.split("(")[1].rstrip(")") for k in cases["by_family"]}
    assert families == {"v1-dtype", "v1-codec", "payload", "ere", "config", "regex"}
    assert set(cases["outcomes"]) <= {"refused", "identical", "different"} and not cases["silent"]
    index = figures["index"]["outcomes"]
    assert sum(index.values()) == 4 and set(index) <= {"read", "refused"}
