"""--force replaces only what the command writes; outputs get the user's umask."""
import importlib
import os

import pytest

import lorahub_compeft.io.files as files
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft import compress, load_expert
from lorahub_compeft.cli import main
from lorahub_compeft.io.files import OutputExistsError, atomic_dir, read_json


@pytest.fixture
def expert_file(lora_dir, tmp_path):
    return compress(lora_dir, PAPER_COMPEFT, density=0.2).save(tmp_path / "e.safetensors")


def test_export_force_never_deletes_unrelated_files(expert_file, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.csv").write_text("1,2")
    assert main(["export", str(expert_file), "-o", str(out), "--force"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "out"]


def test_export_force_replaces_its_own_adapter_dir(expert_file, tmp_path):
    out = tmp_path / "adapter"
    assert main(["export", str(expert_file), "-o", str(out)]) == 0
    assert main(["export", str(expert_file), "-o", str(out)]) == 2  # no --force
    assert main(["export", str(expert_file), "-o", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "e.safetensors"]


def test_force_never_replaces_the_current_directory(expert_file, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "adapter_config.json").write_text("{}")  # even if it holds only "our" names
    monkeypatch.chdir(work)
    assert main(["export", str(expert_file), "-o", ".", "--force"]) == 2
    assert "current directory" in capsys.readouterr().err
    assert (work / "adapter_config.json").read_text() == "{}"


def test_a_file_in_the_way_is_an_error_and_kept(expert_file, tmp_path, capsys):
    mine = tmp_path / "mine.txt"
    mine.write_text("keep me")
    assert main(["export", str(expert_file), "-o", str(mine), "--force"]) == 2
    assert "in the way" in capsys.readouterr().err
    assert mine.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "mine.txt"]


def test_failed_block_leaves_target_untouched(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, force=True, owned=("a",)) as staging:
            (staging / "a").write_text("new")
            raise RuntimeError("boom")
    assert (target / "a").read_text() == "old" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(OutputExistsError):
        with atomic_dir(target, force=False, owned=("a",)):
            pass


def test_exported_files_follow_the_umask(expert_file, tmp_path):
    old = os.umask(0o027)
    try:
        load_expert(expert_file).export(tmp_path / "a")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert modes == {"adapter_config.json": 0o640, "adapter_model.safetensors": 0o640}
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o750


def test_import_does_not_touch_the_umask(monkeypatch):
    # setting the umask, even to restore it, races with other threads creating files
    calls = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0o022)
    importlib.reload(files)
    assert calls == []


def test_json_reads_are_size_capped(tmp_path):
    link = tmp_path / "adapter_config.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):  # a device is never read
        read_json(link, limit=1 << 20)
    (tmp_path / "big.json").write_text("[" + "0," * (1 << 20) + "0]")
    with pytest.raises(ValueError, match="larger than"):
        read_json(tmp_path / "big.json", limit=1 << 20)
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(tmp_path / "deep.json")
