"""Damaged or forged expert files end in an ExpertFileError naming the field, never another
exception, and a library holding one keeps working for every other expert: format-1 files (the
shipped zoo's) with a stream's dtype edited or a codec field added, format-2 files whose payload
a forger rewrote (digests recomputed), a forged adapter_config.r or a regex target_modules."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import support
from fault_cases import forged_bytes
from lorahub_compeft import ExpertFileError, ExpertLibrary, compress, load_expert
from lorahub_compeft.cli import main
from lorahub_compeft.config import EreOptions
from lorahub_compeft.io.adapters import AdapterError, load_adapter
from lorahub_compeft.store.format import read_header

ZOO = Path(__file__).resolve().parents[1] / "lorahub_compeft" / "zoo" / "artifacts"
V1 = ZOO / "experts" / "bool_value.safetensors"


def _decode(path):
    expert = load_expert(path)
    expert.summary()
    return expert.state_dict()


def _v1_copy(tmp_path, mutate, name="v1.safetensors"):
    path = tmp_path / name
    shutil.copy(V1, path)
    support.rewrite_safetensors_header(path, mutate)
    return path


def forge(src, dst, payload_edit=None, meta_edit=None):
    """Rewrite a v2 file's payload and header as a forger would: every digest recomputed."""
    Path(dst).write_bytes(forged_bytes(src, payload_edit, meta_edit))
    return dst


def test_a_v1_stream_of_another_dtype_is_refused_by_name(tmp_path):
    assert read_header(V1)["format_version"] == 1  # no dtype in its digest: it still matches

    def bf16(header):  # the same (even count of) bytes, read as bfloat16 values
        assert header["stream.high"]["shape"][0] % 2 == 0
        header["stream.high"].update(dtype="BF16", shape=[header["stream.high"]["shape"][0] // 2])
    path = _v1_copy(tmp_path, bf16)
    with safe_open(str(path), "pt") as handle:
        assert handle.get_slice("stream.high").get_dtype() == "BF16"
    with pytest.raises(ExpertFileError, match="stream.high is bfloat16, not uint8"):
        _decode(path)


@pytest.mark.parametrize("codec", ['"ere"', '"compeft"'])
def test_a_v1_file_with_a_codec_field_is_refused(tmp_path, codec):
    path = _v1_copy(tmp_path, lambda h: h["__metadata__"].update(codec=codec))
    with pytest.raises(ExpertFileError, match="header field codec"):
        load_expert(path)


def test_a_v2_file_without_its_scales_is_refused(lora_dir, tmp_path):
    good = compress(lora_dir).save(tmp_path / "c.safetensors")
    path = forge(good, tmp_path / "f.safetensors", lambda p: p.pop("scales"))
    with pytest.raises(ExpertFileError, match="scales"):
        _decode(path)


def test_a_bf16_golomb_stream_is_refused(lora_dir, tmp_path):
    good = compress(lora_dir, encoding="golomb").save(tmp_path / "c.safetensors")
    key = "stream.unary"

    def bf16(payload):
        t = payload[key]
        payload[key] = t[:len(t) // 2 * 2].view(torch.bfloat16)
    path = forge(good, tmp_path / "f.safetensors", bf16)
    with pytest.raises(ExpertFileError, match=f"{key} is bfloat16, not uint8"):
        _decode(path)


@pytest.mark.parametrize("key", ["ere.u", "ere.v", "ere.scales"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int32, torch.float8_e4m3fn])
def test_ere_payload_of_another_dtype_is_refused(lora_dir, tmp_path, key, dtype):
    good = compress(lora_dir, EreOptions()).save(tmp_path / "e.safetensors")
    if key == "ere.scales" and dtype == torch.float32:
        dtype = torch.float64
    path = forge(good, tmp_path / "f.safetensors", lambda p: p.update({key: p[key].to(dtype)}))
    with pytest.raises(ExpertFileError, match=f"payload {key} is"):
        _decode(path)


@pytest.mark.parametrize("init", [3.4e38, 70000.0])
def test_a_forged_ere_init_that_overflows_its_dtype_is_refused(lora_dir, tmp_path, init):
    good = compress(lora_dir, EreOptions()).save(tmp_path / "e.safetensors")

    def edit(meta):
        for entry in meta["tensors"]:
            entry["dtype"] = "float16"
        meta["tensors"][0]["init"] = init
    path = forge(good, tmp_path / "f.safetensors", meta_edit=edit)
    with pytest.raises(ExpertFileError, match="overflow float16"):
        _decode(path)


def test_a_forged_rank_is_checked_against_the_tensors(lora_dir, tmp_path):
    good = compress(lora_dir).save(tmp_path / "c.safetensors")
    path = forge(good, tmp_path / "f.safetensors",
                 meta_edit=lambda m: m["adapter_config"].update(r=2_000_000))
    with pytest.raises(ExpertFileError, match="names rank 2000000, but no tensor has a rank above 4"):
        load_expert(path)  # the header alone: nothing is allocated
    # a rank_pattern may name smaller ranks, never larger ones than the tensors have
    path = forge(good, tmp_path / "g.safetensors", meta_edit=lambda m: m["adapter_config"].update(
        rank_pattern={"q": 2_000_000}))
    with pytest.raises(ExpertFileError, match="rank_pattern"):
        load_expert(path)
    # the same forgery in a PEFT folder is refused when the folder is read
    forged = tmp_path / "forged-dir"
    shutil.copytree(lora_dir, forged)
    config = json.loads((forged / "adapter_config.json").read_text())
    (forged / "adapter_config.json").write_text(json.dumps(dict(config, r=2_000_000)))
    with pytest.raises(AdapterError, match="names rank 2000000"):
        load_adapter(forged)


def test_a_regex_target_modules_in_an_expert_file_is_refused(lora_dir, tmp_path):
    good = compress(lora_dir).save(tmp_path / "c.safetensors")
    path = forge(good, tmp_path / "f.safetensors", meta_edit=lambda m: m["adapter_config"].update(
        target_modules="(" * 30 + "a*" * 30 + ")" * 30 + "$"))
    with pytest.raises(ExpertFileError, match="target_modules' must be a list of module names"):
        load_expert(path)


def test_an_adapter_with_a_regex_target_modules_is_stored_with_the_modules_it_matched(lora_dir, tmp_path):
    regex = tmp_path / "regex-dir"
    shutil.copytree(lora_dir, regex)
    config = json.loads((regex / "adapter_config.json").read_text())
    (regex / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=r".*\.(q|v)")))
    expert = load_expert(compress(regex).save(tmp_path / "r.safetensors"))
    targets = expert.config["target_modules"]
    assert isinstance(targets, list) and targets and all(t.endswith((".q", ".v")) for t in targets)
    names = {e["name"] for e in expert.meta["tensors"]}
    assert {n.split(".lora_")[0].removeprefix("base_model.model.") for n in names} == set(targets)


def test_a_library_with_a_forged_file_keeps_working(lora_dir, ia3_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    lib = ExpertLibrary(root)
    lib.add(lora_dir, name="good")
    # a v1 file with a codec field, copied in (not indexed), and a forged v2 file replacing one
    _v1_copy(root, lambda h: h["__metadata__"].update(codec='"ere"'), name="v1bad.safetensors")
    assert main(["library", "list", str(root)]) == 0
    assert "good" in capsys.readouterr().out
    assert main(["library", "add", str(root), str(ia3_dir)]) == 0
    assert main(["library", "rebuild", str(root)]) == 0
    assert ExpertLibrary(root).names() == sorted(["good", ia3_dir.name])


def test_inspect_of_an_ere_file_without_energy_kept_is_one_clear_line(lora_dir, tmp_path, capsys):
    good = compress(lora_dir, EreOptions()).save(tmp_path / "e.safetensors")
    path = forge(good, tmp_path / "f.safetensors", meta_edit=lambda m: m["ere"].pop("energy_kept"))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "energy_kept" in err[0]

