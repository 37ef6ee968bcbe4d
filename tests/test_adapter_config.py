"""adapter_config.json is read once, size-capped, and its types checked there."""
import json
import shutil

import pytest

from lorahub_compeft import AdapterError, compress, load_adapter


@pytest.mark.parametrize("changes,message", [
    ({"r": "8"}, "'r' must be a positive integer"),
    ({"lora_alpha": "16"}, "'lora_alpha' must be a finite number"),
    ({"lora_alpha": float("nan")}, "'lora_alpha' must be a finite number"),
    ({"target_modules": 7}, "'target_modules' must be a list"),
    ({"peft_type": None}, "'peft_type' must be a name"),
    ({"base_model_name_or_path": ["x"]}, "'base_model_name_or_path' must be a string"),
])
def test_odd_config_types_are_refused_at_read(lora_dir, tmp_path, changes, message):
    bad = tmp_path / "bad"
    shutil.copytree(lora_dir, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config.update(changes)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=message):
        compress(bad)


def test_huge_deep_or_endless_configs_are_refused(lora_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(lora_dir, bad)
    (bad / "adapter_config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(AdapterError, match="nested too deeply"):
        load_adapter(bad)
    (bad / "adapter_config.json").unlink()
    (bad / "adapter_config.json").symlink_to("/dev/zero")  # never read: a device, not a file
    with pytest.raises(AdapterError, match="not a regular file"):
        load_adapter(bad)


def test_a_local_folder_named_like_a_hub_id_says_it_wins(lora_dir, tmp_path, monkeypatch, caplog):
    (tmp_path / "owner").mkdir()
    shutil.copytree(lora_dir, tmp_path / "owner" / "name")
    monkeypatch.chdir(tmp_path)
    adapter = load_adapter("owner/name")
    assert adapter.source == {"path": str(tmp_path / "owner" / "name")}
    assert "using the local folder" in caplog.text and "not the Hub id" in caplog.text
