"""The library never touches files outside its root, never lets two names share a file,
survives damaged entries, concurrent writers and killed writers, and reading writes nothing."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorahub_compeft import ExpertLibrary, LibraryError, compress
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft.cli import main
from lorahub_compeft.store.library import file_name_for


def _files(root):
    return {p.name: p.read_bytes() for p in root.iterdir() if p.name != ".lock"}


def test_index_paths_outside_the_root_are_refused(lora_dir, tmp_path):
    root, outside = tmp_path / "lib", tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.safetensors"
    victim.write_text("not yours")
    lib = ExpertLibrary(root)
    lib.add(lora_dir, PAPER_COMPEFT, name="a")
    index = json.loads((root / "index.json").read_text())
    for name, file in (("rel", "../outside/victim.safetensors"), ("abs", str(victim))):
        index["experts"][name] = dict(index["experts"]["a"], file=file, name=name)
    (root / "index.json").write_text(json.dumps(index))
    lib = ExpertLibrary(root)
    assert lib.names() == ["a"]  # the forged entries are skipped
    for name in ("rel", "abs"):
        with pytest.raises(LibraryError, match="no expert named"):
            lib.remove(name)
    assert victim.read_text() == "not yours"


def test_two_names_never_share_a_file(lora_dir, ia3_dir, tmp_path):
    assert file_name_for("team/expert") != file_name_for("team--expert")
    assert file_name_for("a%2Fb") != file_name_for("a/b")
    lib = ExpertLibrary(tmp_path / "lib")
    lib.add(lora_dir, PAPER_COMPEFT, name="team/expert")
    lib.add(ia3_dir, PAPER_COMPEFT, name="team--expert")
    assert lib.get("team/expert").summary()["peft_type"] == "LORA"
    assert lib.get("team--expert").summary()["peft_type"] == "IA3"
    for bad in ("", "x" * 201, "a\0b"):
        with pytest.raises(LibraryError, match="cannot be used as an expert name"):
            file_name_for(bad)


def test_a_file_owned_by_another_name_is_refused(lora_dir, tmp_path):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, PAPER_COMPEFT, name="legacy")
    index = json.loads((root / "index.json").read_text())  # an old index: file named otherwise
    index["experts"]["legacy"]["file"] = file_name_for("new")
    (root / "legacy.safetensors").rename(root / file_name_for("new"))
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(LibraryError, match="which holds 'legacy'"):
        ExpertLibrary(root).add(lora_dir, name="new")


def test_damaged_entries_and_files_are_skipped_by_name(lora_dir, tmp_path, caplog, capsys):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, PAPER_COMPEFT, name="good")
    lib.add(lora_dir, PAPER_COMPEFT, name="bad", density=0.3)
    index = json.loads((root / "index.json").read_text())
    index["experts"]["bad"] = {"file": 7}
    (root / "index.json").write_text(json.dumps(index))
    assert main(["library", "list", str(root)]) == 0
    assert "good" in capsys.readouterr().out and "'bad'" in caplog.text
    # an index nested too deeply: rebuilt from the files by a writer, scanned by a reader
    (root / "index.json").write_text("[" * 100000 + "]" * 100000)
    assert ExpertLibrary(root, read_only=True).names() == ["bad", "good"]
    # an expert file whose header is damaged: the others still list
    data = bytearray((root / "bad.safetensors").read_bytes())
    data[40:60] = b"#" * 20
    (root / "bad.safetensors").write_bytes(bytes(data))
    assert ExpertLibrary(root).names() == ["good"]


def test_two_processes_adding_at_once_lose_nothing(lora_dir, tmp_path):
    root = tmp_path / "lib"
    script = textwrap.dedent(f"""
        import sys
        from lorahub_compeft import ExpertLibrary, load_adapter
        adapter = load_adapter({str(lora_dir)!r})
        for i in range(8):
            ExpertLibrary({str(root)!r}).add(adapter, name=f"{{sys.argv[1]}}{{i}}")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, tag]) for tag in "ab"]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    names = ExpertLibrary(root, read_only=True).names()
    assert names == sorted(f"{t}{i}" for t in "ab" for i in range(8))


def test_a_writer_adopts_stray_files_and_clears_temp_files(lora_dir, ia3_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, PAPER_COMPEFT, name="listed")
    # what a kill -9 leaves: an expert file written but not indexed, and a temporary file
    compress(lora_dir, PAPER_COMPEFT, density=0.3, name="stray").save(root / file_name_for("stray"))
    (root / ".index.json.abc.tmp").write_text("{")
    before = _files(root)
    assert main(["library", "list", str(root)]) == 0
    captured = capsys.readouterr()
    assert "1 expert file(s) not in the index" in captured.err
    assert _files(root) == before  # listing wrote nothing
    assert main(["library", "add", str(root), str(ia3_dir)]) == 0
    assert ExpertLibrary(root).names() == sorted(["listed", "stray", ia3_dir.name])
    assert not list(root.glob(".*.tmp"))


def test_rerunning_an_interrupted_add_finishes_the_job(lora_dir, ia3_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    assert main(["library", "add", str(root), str(lora_dir)]) == 0  # killed after the first
    stored = (root / file_name_for(lora_dir.name)).read_bytes()
    assert main(["library", "add", str(root), str(lora_dir), str(ia3_dir)]) == 0
    assert ExpertLibrary(root).names() == sorted([lora_dir.name, ia3_dir.name])
    assert (root / file_name_for(lora_dir.name)).read_bytes() == stored  # not redone
    # other settings for a stored name still need --force
    assert main(["library", "add", str(root), str(lora_dir), "--density", "0.3"]) == 2
    assert "--force" in capsys.readouterr().err


def test_remove_checks_every_name_first(lora_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, PAPER_COMPEFT, name="a")
    assert main(["library", "remove", str(root), "a", "missing"]) == 2
    assert "missing" in capsys.readouterr().err
    assert ExpertLibrary(root).names() == ["a"] and (root / "a.safetensors").exists()
    assert main(["library", "remove", str(root), "a"]) == 0
    assert ExpertLibrary(root).names() == []


def test_reading_writes_nothing_and_only_a_library_is_a_library(lora_dir, tmp_path, capsys):
    before = _files(lora_dir)
    assert main(["library", "list", str(lora_dir)]) == 2  # a PEFT dir is not a library
    assert "not an expert library" in capsys.readouterr().err
    assert _files(lora_dir) == before and not (lora_dir / ".lock").exists()
    root = tmp_path / "lib"
    ExpertLibrary(root).add(lora_dir, name="a")
    (root / "index.json").unlink()
    before = _files(root)
    assert main(["library", "list", str(root)]) == 0  # expert files only: still a library
    assert "a" in capsys.readouterr().out
    assert _files(root) == before  # no index.json written by a read
    with pytest.raises(LibraryError, match="not an expert library"):
        ExpertLibrary(lora_dir)


def test_library_add_checks_the_base_model(lora_dir, tmp_path, tiny_t5):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, PAPER_COMPEFT, name="a")
    # the same base recorded another way (relative path) is the same base
    relative = compress(lora_dir, PAPER_COMPEFT, name="b")
    relative.meta["adapter_config"]["base_model_name_or_path"] = str(tiny_t5) + "/./"
    lib.add(relative)
    other = compress(lora_dir, PAPER_COMPEFT, name="c")
    other.meta["adapter_config"]["base_model_name_or_path"] = "google/flan-t5-large"
    with pytest.raises(LibraryError, match="one base model per library"):
        lib.add(other)
    assert lib.names() == ["a", "b"]


def test_sizes_are_whole_file_ratios(lora_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    assert main(["library", "add", str(root), str(lora_dir)]) == 0
    capsys.readouterr()
    main(["library", "list", str(root)])
    row = capsys.readouterr().out.splitlines()[1]
    entry = ExpertLibrary(root).entry(lora_dir.name)
    file_bytes = (root / entry["file"]).stat().st_size
    assert entry["file_bytes"] == file_bytes
    assert f"{entry['sizes']['fp16_bytes'] / file_bytes:.1f}x" in row
    assert file_bytes > entry["sizes"]["payload_bytes"]


def test_a_library_path_that_is_a_file_or_appears_meanwhile(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LibraryError, match="is a file, not a library folder"):
        ExpertLibrary(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # Another process creates the folder between our check and our mkdir: we use it.
    root = tmp_path / "lib"
    real_is_dir = Path.is_dir
    def racing_is_dir(path):
        found = real_is_dir(path)
        if path == root and not found:
            root.mkdir()
        return found
    monkeypatch.setattr(Path, "is_dir", racing_is_dir)
    assert ExpertLibrary(root).names() == []
