"""The library's second round: it deletes only its own temporary files, refuses an index that
points two names at one file and a lock that is a link, decides what is stored by the file's
own header, skips damaged entries by name, creates its folder on the first write only, takes
expert files as they are, says "already stored", and lists wide names in line."""
import json

import pytest

from lorahub_compeft import ExpertLibrary, LibraryError, compress, load_expert
from lorahub_compeft.cli import main
from lorahub_compeft.store.library import file_name_for


def _index(root):
    return json.loads((root / "index.json").read_text())


def _write_index(root, index):
    (root / "index.json").write_text(json.dumps(index))


def test_writers_clear_only_the_temporary_files_the_library_makes(lora_dir, ia3_dir, tmp_path):
    root = tmp_path / "lib"
    ExpertLibrary(root).add(lora_dir, name="a")
    (root / ".notes.old").mkdir()
    (root / ".notes.old" / "notes.txt").write_text("mine")
    (root / "x.tmp").write_text("mine too")
    (root / ".notes.tmp").write_text("and this")
    (root / "sub").mkdir()
    (root / "sub" / ".index.json.abcd1234.tmp").write_text("not at the top level")
    (root / ".index.json.abcd1234.tmp").write_text("{")  # what a killed writer leaves
    (root / ".a.safetensors.x_y9.tmp").write_bytes(b"half")
    ExpertLibrary(root).add(ia3_dir, name="b")
    assert (root / ".notes.old" / "notes.txt").read_text() == "mine"
    assert (root / "x.tmp").read_text() == "mine too" and (root / ".notes.tmp").exists()
    assert (root / "sub" / ".index.json.abcd1234.tmp").exists()
    assert not (root / ".index.json.abcd1234.tmp").exists()
    assert not (root / ".a.safetensors.x_y9.tmp").exists()


def test_an_index_pointing_two_names_at_one_file_is_refused_and_nothing_deleted(
        lora_dir, ia3_dir, tmp_path, caplog, capsys):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, name="a")
    lib.add(ia3_dir, name="b")
    index = _index(root)
    index["experts"]["b"]["file"] = index["experts"]["a"]["file"]
    _write_index(root, index)
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file() and p.name != ".lock"}
    for argv in (["library", "remove", str(root), "b"], ["library", "add", str(root), str(lora_dir)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "'a' and 'b'" in err and "a.safetensors" in err and "library rebuild" in err
    with pytest.raises(LibraryError, match="'a' and 'b' with the same file a.safetensors"):
        ExpertLibrary(root).remove("b")
    assert {p.name: p.read_bytes() for p in root.iterdir()
            if p.is_file() and p.name != ".lock"} == before
    assert main(["library", "list", str(root)]) == 0  # a reader skips both, by name
    assert "'a' and 'b'" in caplog.text
    assert main(["library", "rebuild", str(root)]) == 0  # indexed by the files' own headers
    assert ExpertLibrary(root).names() == ["a", "b"]


def test_a_lock_that_is_a_link_is_refused(lora_dir, tmp_path):
    root, outside = tmp_path / "lib", tmp_path / "outside"
    ExpertLibrary(root).add(lora_dir, name="a")
    (root / ".lock").unlink()
    (root / ".lock").symlink_to(outside)
    with pytest.raises(LibraryError, match="is a link"):
        ExpertLibrary(root).add(lora_dir, name="b")
    assert not outside.exists() and ExpertLibrary(root, read_only=True).names() == ["a"]


def test_what_is_stored_is_decided_by_the_file_header(lora_dir, tmp_path, capsys, caplog):
    root = tmp_path / "lib"
    name = lora_dir.name
    assert main(["library", "add", str(root), str(lora_dir), "--density", "0.2"]) == 0
    stale = _index(root)
    # `add --force --density 0.3` killed between the file's rename and the index's
    compress(lora_dir, density=0.3).save(root / file_name_for(name), force=True)
    _write_index(root, stale)
    capsys.readouterr()
    assert main(["library", "add", str(root), str(lora_dir), "--density", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "(k=0.3 " in err and "otherwise than its file's header" in caplog.text
    assert _index(root)["experts"][name]["density"] == 0.3  # the index now says what the file holds
    assert main(["library", "add", str(root), str(lora_dir), "--density", "0.3"]) == 0
    assert f"already stored {name}" in capsys.readouterr().out
    assert load_expert(root / file_name_for(name)).density == 0.3
    # the killed `--force` rerun: the file holds what it asks for, so nothing is redone
    _write_index(root, stale)
    before = (root / file_name_for(name)).read_bytes()
    assert main(["library", "add", str(root), str(lora_dir), "--density", "0.3", "--force"]) == 0
    assert f"already stored {name}" in capsys.readouterr().out
    assert (root / file_name_for(name)).read_bytes() == before
    assert _index(root)["experts"][name]["density"] == 0.3


def test_a_rerun_says_already_stored(lora_dir, ia3_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    assert main(["library", "add", str(root), str(lora_dir)]) == 0
    assert f"stored {lora_dir.name}" in capsys.readouterr().out
    assert main(["library", "add", str(root), str(lora_dir), str(ia3_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"already stored {lora_dir.name} (")
    assert out[1].startswith(f"stored {ia3_dir.name} (")


@pytest.mark.parametrize("damage", [
    lambda e: e.pop("name"), lambda e: e.pop("r"), lambda e: e.pop("peft_type"),
    lambda e: e.update(file_bytes=0), lambda e: e.update(file_bytes="12 KB"),
    lambda e: e.update(codec=None), lambda e: e.update(r="8"), lambda e: e.update(name="other"),
])
def test_one_damaged_entry_is_skipped_by_name_and_the_rest_listed(lora_dir, ia3_dir, tmp_path,
                                                                 capsys, caplog, damage):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, name="good")
    lib.add(ia3_dir, name="bad")
    index = _index(root)
    damage(index["experts"]["bad"])
    _write_index(root, index)
    assert main(["library", "list", str(root)]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "1 experts" in out and "'bad'" in caplog.text


@pytest.mark.parametrize("field", ["mean_rank", "encoding", "budget_bits"])
def test_a_damaged_ere_entry_is_skipped_by_name(lora_dir, tmp_path, capsys, caplog, field):
    from lorahub_compeft.config import EreOptions
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, name="good")
    lib.add(lora_dir, EreOptions(), name="bad")
    index = _index(root)
    index["experts"]["bad"].pop(field)
    _write_index(root, index)
    assert main(["library", "list", str(root)]) == 0
    assert "good" in capsys.readouterr().out and "'bad'" in caplog.text


def test_a_non_string_base_model_entry_does_not_stop_every_add(lora_dir, ia3_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    ExpertLibrary(root).add(lora_dir, name="a")
    index = _index(root)
    index["experts"]["a"]["base_model"] = {"path": 5}
    _write_index(root, index)
    assert main(["library", "add", str(root), str(ia3_dir)]) == 0
    assert ia3_dir.name in ExpertLibrary(root).names()


def test_a_library_folder_is_made_on_the_first_write_only(lora_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lib = ExpertLibrary("./nolib")
    assert lib.names() == [] and len(lib) == 0 and lib.temp_files() == []
    assert not (tmp_path / "nolib").exists()
    lib.add(lora_dir, name="a")
    assert (tmp_path / "nolib" / "index.json").is_file()


def test_expert_files_are_stored_as_they_are(lora_dir, tmp_path, capsys):
    path = compress(lora_dir, density=0.3).save(tmp_path / "e.safetensors")
    root = tmp_path / "lib"
    assert main(["library", "add", str(root), str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"stored {lora_dir.name} (")
    stored = load_expert(root / file_name_for(lora_dir.name))
    assert stored.same_as(load_expert(path)) and stored.density == 0.3
    assert main(["library", "add", str(root), str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"already stored {lora_dir.name} (")
    assert main(["library", "add", str(root), str(path), "--density", "0.5"]) == 2
    assert "stored as it is" in capsys.readouterr().err
    # a shipped format-1 file: stored as format 2, and a rerun knows it is there
    from test_trust_expert_files import V1
    assert main(["library", "add", str(root / "v1"), str(V1)]) == 0
    assert main(["library", "add", str(root / "v1"), str(V1)]) == 0
    assert "already stored bool_value" in capsys.readouterr().out


def test_list_columns_stay_aligned_with_wide_names(lora_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    for name in ("专家/翻译", "plain", "e\u0301cole"):  # wide, narrow, a combining accent
        lib.add(lora_dir, name=name)
    capsys.readouterr()
    assert main(["library", "list", str(root)]) == 0
    from lorahub_compeft.cli.library import _width
    lines = capsys.readouterr().out.splitlines()[:4]
    assert _width("专家/翻译") == 9 and _width("e\u0301cole") == 5
    starts = {_width(line[:line.index(" LORA")]) for line in lines[1:]}
    assert len(starts) == 1 and _width(lines[0][:lines[0].index(" type")]) in starts
    assert len({_width(line) for line in lines}) == 1  # every column ends in line too


def test_an_entry_whose_file_holds_another_expert_is_refused(lora_dir, ia3_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, name="a")
    lib.add(ia3_dir, name="b")
    index = _index(root)
    index["experts"]["a"]["file"] = index["experts"].pop("b")["file"]
    _write_index(root, index)
    before = {p.name: p.read_bytes() for p in root.glob("*.safetensors")}
    assert main(["library", "add", str(root), str(lora_dir), "--name", "a"]) == 2
    assert "holds 'b'" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in root.glob("*.safetensors")} == before
