import json

import pytest

import lorahub_compeft.io.files as files
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft import ExpertLibrary, LibraryError, compress


def test_add_list_get_remove(lora_dir, ia3_dir, tmp_path):
    lib = ExpertLibrary(tmp_path / "lib")
    lib.add_many([lora_dir, ia3_dir], PAPER_COMPEFT, progress=False, density=0.2)
    assert lib.names() == sorted([lora_dir.name, ia3_dir.name])
    entry = lib.entry(lora_dir.name)
    assert entry["peft_type"] == "LORA" and entry["r"] == 4 and entry["density"] == 0.2
    assert entry["sizes"]["payload_bytes"] < entry["sizes"]["fp16_bytes"]
    # a fresh library object reads the same index
    again = ExpertLibrary(tmp_path / "lib")
    assert again.entries() == lib.entries()
    with pytest.raises(LibraryError, match="already"):
        lib.add(lora_dir, PAPER_COMPEFT)
    lib.remove(ia3_dir.name)
    assert lib.names() == [lora_dir.name]
    assert not (tmp_path / "lib" / f"{ia3_dir.name}.safetensors").exists()
    with pytest.raises(LibraryError, match="no expert named"):
        lib.get(ia3_dir.name)


def test_get_is_lazy_and_cached(lora_dir, tmp_path):
    lib = ExpertLibrary(tmp_path / "lib", cache_size=2)
    for i in range(3):
        lib.add(lora_dir, PAPER_COMPEFT, name=f"e{i}")
    expert = lib.get("e0")
    assert not expert.is_decoded  # header only
    expert.state_dict()
    assert expert.is_decoded
    assert lib.get("e0") is expert  # cached
    lib.get("e1"), lib.get("e2")  # bounded: e0 falls out of the cache
    assert lib.get("e0") is not expert


def test_sample_is_seeded_and_checked(lora_dir, tmp_path):
    lib = ExpertLibrary(tmp_path / "lib")
    for i in range(6):
        lib.add(lora_dir, PAPER_COMPEFT, name=f"owner/e{i}")
    assert lib.sample(3, seed=1) == lib.sample(3, seed=1)
    assert len(set(lib.sample(6, seed=2))) == 6
    with pytest.raises(LibraryError, match="cannot sample 7"):
        lib.sample(7, seed=1)
    assert (tmp_path / "lib" / "owner%2Fe0.safetensors").exists()


def test_crash_during_add_leaves_the_library_as_it_was(lora_dir, tmp_path, monkeypatch):
    lib = ExpertLibrary(tmp_path / "lib")
    lib.add(lora_dir, PAPER_COMPEFT, name="kept")
    before = {p.name: p.read_bytes() for p in (tmp_path / "lib").iterdir()}

    real_replace = files.os.replace

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        lib.add(lora_dir, PAPER_COMPEFT, name="new")
    monkeypatch.setattr(files.os, "replace", real_replace)
    after = {p.name: p.read_bytes() for p in (tmp_path / "lib").iterdir()}
    assert after == before  # no partial file, no temp file, index unchanged
    assert ExpertLibrary(tmp_path / "lib").names() == ["kept"]


def test_index_is_rebuilt_when_missing_or_damaged(lora_dir, tmp_path):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, PAPER_COMPEFT, name="a")
    lib.add(lora_dir, PAPER_COMPEFT, name="b", density=0.3)
    (root / "index.json").unlink()
    assert ExpertLibrary(root).names() == ["a", "b"]
    (root / "index.json").write_text("{broken")
    rebuilt = ExpertLibrary(root)
    assert rebuilt.entry("b")["density"] == 0.3
    assert json.loads((root / "index.json").read_text())["experts"]["a"]["file"] == "a.safetensors"


def test_incompatible_experts_are_still_stored(lora_dir, ia3_dir, tmp_path):
    lib = ExpertLibrary(tmp_path / "lib")
    lib.add(compress(lora_dir, PAPER_COMPEFT), name="lora")
    lib.add(compress(ia3_dir, PAPER_COMPEFT), name="ia3")
    assert {e["peft_type"] for e in lib.entries()} == {"LORA", "IA3"}
