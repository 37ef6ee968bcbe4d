"""A library built with `library add` from the zoo's dense experts (whose configs name the base
relative to the folder holding the package) finds its base from any folder, and an adapter
whose relative base is found only from its own folder is recorded with an absolute one."""
import json
import shutil
from pathlib import Path

from lorahub_compeft import ExpertLibrary, compress
from lorahub_compeft.cli import main
from lorahub_compeft.compose.experts import base_model_of, expert_handles

ZOO = Path(__file__).resolve().parents[1] / "lorahub_compeft" / "zoo" / "artifacts"


def test_a_library_of_the_zoo_dense_experts_finds_its_base_from_anywhere(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    assert main(["library", "add", str(root), str(ZOO / "dense" / "bool_value"),
                 str(ZOO / "dense" / "pair_sum")]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for handle in expert_handles(ExpertLibrary(root, read_only=True)):
        assert Path(base_model_of(handle)).resolve() == (ZOO / "base").resolve()
    # the shipped dense experts themselves, from here too
    handle = expert_handles([str(ZOO / "dense" / "bool_value")])[0]
    assert Path(base_model_of(handle)).resolve() == (ZOO / "base").resolve()


def test_a_relative_base_found_from_the_adapter_folder_is_recorded_absolute(lora_dir, tiny_t5,
                                                                            tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(tiny_t5, project / "base")
    adapter = project / "adapters" / "one"
    shutil.copytree(lora_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="base")))
    monkeypatch.chdir(tmp_path)  # "base" does not exist from here, only from the adapter upwards
    expert = compress(adapter)
    assert expert.base_model == str((project / "base").resolve())
