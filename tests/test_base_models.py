"""Experts' base model compared by identity (resolved path, Hub id + revision, config shapes),
--model overriding a mismatch with a warning, and experts that cannot be mixed refused by name."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

import support
from lorahub_compeft.io.base_models import base_identity, check_model_reference, same_base
from lorahub_compeft.compose.composer import compose


def _copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_identity_by_path_hub_id_and_shapes(tiny_t5, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_t5.parent)
    assert same_base(base_identity(str(tiny_t5)), base_identity(tiny_t5.name)) is True
    copy = tmp_path / "copy"
    shutil.copytree(tiny_t5, copy)  # another folder, same architecture and shapes
    assert same_base(base_identity(str(tiny_t5)), base_identity(str(copy))) is True
    config = json.loads((copy / "config.json").read_text())
    config["d_model"] = 64
    (copy / "config.json").write_text(json.dumps(config))
    assert same_base(base_identity(str(tiny_t5)), base_identity(str(copy))) is False
    assert same_base(base_identity("google/flan-t5-large"), base_identity("google/flan-t5-large"))
    assert same_base(base_identity("org/a"), base_identity("org/b")) is None  # unknown
    with pytest.raises(ValueError, match="does not exist"):
        check_model_reference(str(tmp_path / "no" / "model"))


def test_same_base_recorded_differently_composes_and_model_overrides_a_mismatch(
        tiny_t5, lora_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tiny_t5.parent)
    relative = _copy(lora_dir, tmp_path / "relative", base_model_name_or_path=tiny_t5.name)
    task = support.constant_task("red", 2)
    result = compose([str(lora_dir), str(relative)], task, budget=2, progress=False)
    assert set(result.weights) == {lora_dir.name, "relative"}
    other = _copy(lora_dir, tmp_path / "other", base_model_name_or_path="someone/else")
    with pytest.raises(ValueError, match="other: base_model_name_or_path"):
        compose([str(lora_dir), str(other)], task, budget=2, progress=False)
    result = compose([str(lora_dir), str(other)], task, model=str(tiny_t5), budget=2, progress=False)
    assert "other: base_model_name_or_path is 'someone/else'" in caplog.text
    assert len(result.weights) == 2


def test_a_missing_recorded_base_says_to_pass_model(lora_dir, tmp_path):
    gone = _copy(lora_dir, tmp_path / "gone", base_model_name_or_path=str(tmp_path / "no" / "base"))
    with pytest.raises(ValueError, match="pass the base with --model"):
        compose([str(gone)], support.constant_task("red", 2), budget=2, progress=False)


def test_a_non_finite_dense_expert_is_refused_by_name(tiny_t5, lora_dir, tmp_path):
    bad = _copy(lora_dir, tmp_path / "nan-expert")
    tensors = load_file(bad / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="nan-expert: holds NaN"):
        compose([str(lora_dir), str(bad)], support.constant_task("red", 2), model=str(tiny_t5),
                budget=2, progress=False)
