"""Offline from a Hugging Face cache: with HF_HUB_OFFLINE=1, Hub ids for the base, the experts
(one in LoraHub's own format: a pickled adapter_model.bin, a PEFT-0.3-era config) and BBH
resolve from a cache in the real layout through the real loaders (from_pretrained,
snapshot_download(local_files_only=True), load_dataset), and what is missing is named in one
line. The cache is written by huggingface_hub's own helpers (scripts/rehearse_reproduction.py)
and read here through huggingface_hub's own readers first."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BBH
from rehearse_reproduction import LORAHUB_CONFIG, cache_bbh_task, cache_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")
BASE, TASK = "test-org/tiny-t5", "navigate"
EXPERTS = ["test-org/expert-red", "test-org/expert-green", "test-org/expert-blue"]
LORAHUB_STYLE = "test-org/expert-lorahub-format"


def lorahub_format(dense: Path, out: Path) -> Path:
    """A PEFT dir rewritten as the public LoraHub modules are: torch.save of the state dict,
    an adapter_config.json of PEFT 0.3's era."""
    out.mkdir()
    torch.save(load_file(dense / "adapter_model.safetensors"), out / "adapter_model.bin")
    config = json.loads((dense / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(
        dict(LORAHUB_CONFIG, r=config["r"], lora_alpha=config["lora_alpha"],
             base_model_name_or_path=BASE)))
    return out


def fill(root: Path, tiny_t5, experts, with_all=True) -> Path:
    """HF_HOME at `root`: the base, the experts (all but the last without with_all) and,
    with_all, the BBH task."""
    hub = root / "hub"
    cache_folder(BASE, Path(tiny_t5), hub)
    dense = [Path(e) for e in experts]
    sources = dict(zip(EXPERTS, dense))
    sources[LORAHUB_STYLE] = lorahub_format(dense[0], root / "lorahub-format")
    for repo_id, folder in list(sources.items())[: None if with_all else -1]:
        cache_folder(repo_id, folder, hub)
    if with_all:
        rows = json.loads((BBH / f"{TASK}.json").read_text())["examples"]
        (root / "work").mkdir()
        cache_bbh_task(TASK, rows, root / "datasets", root / "work")
        shutil.rmtree(root / "work")
    shutil.rmtree(root / "lorahub-format")
    return root


@pytest.fixture(scope="module")
def cache(tiny_t5, experts, tmp_path_factory):
    return fill(tmp_path_factory.mktemp("hf-home"), tiny_t5, experts)


def reproduce(root: Path, out: Path, cwd: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "LORAHUB_COMPEFT_BBH_DIR"):
        env.pop(name, None)
    argv = [sys.executable, "-m", "lorahub_compeft.cli", "reproduce", "--cache", str(root),
            "--model", BASE, "--experts", *EXPERTS, LORAHUB_STYLE, "--tasks", TASK,
            "--seeds", "1", "-n", "2", "--budget", "2", "--max-eval", "2", "--threads", "1",
            "--out", str(out)]
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_huggingface_hubs_own_readers_find_the_cache(cache):
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache
    hub = cache / "hub"
    assert (hub / "models--test-org--tiny-t5" / "refs" / "main").is_file()
    config = try_to_load_from_cache(BASE, "config.json", cache_dir=hub)
    assert isinstance(config, str) and json.loads(Path(config).read_text())["model_type"] == "t5"
    snapshot = Path(snapshot_download(LORAHUB_STYLE, cache_dir=hub, local_files_only=True))
    assert (snapshot / "adapter_model.bin").is_symlink()
    assert (snapshot / "adapter_model.bin").resolve().parent.name == "blobs"
    repos = {r.repo_id: r for r in scan_cache_dir(hub).repos}
    assert set(repos) == {BASE, *EXPERTS, LORAHUB_STYLE}
    assert all("main" in {ref for rev in r.revisions for ref in rev.refs} for r in repos.values())


def test_reproduce_runs_offline_from_the_cache(cache, tmp_path):
    out = tmp_path / "run"
    done = reproduce(cache, out, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["compeft", "icl", "lorahub", "zeroshot"]
    assert {r["setting"]["data"]["hub"] for r in rows} == {"lukaemon/bbh"}  # via load_dataset
    composed = [e for r in rows if r["method"] == "lorahub" for e in r["experts"]]
    commits = {p.name for p in (cache / "hub").glob("models--test-org--expert-*/snapshots/*")}
    assert composed and all(e["revision"] in commits for e in composed)  # read from the cache
    assert "| navigate |" in done.stdout  # the report, printed at the end


def test_what_is_missing_is_named_in_one_line(tiny_t5, experts, tmp_path):
    root = fill(tmp_path / "hf-home", tiny_t5, experts, with_all=False)
    done = reproduce(root, tmp_path / "run", tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "1 of 4 experts (test-org/expert-lorahub-format)" in errors[0]
    assert f"lukaemon/bbh tasks {TASK}" in errors[0] and "lorahub-compeft download" in errors[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written
