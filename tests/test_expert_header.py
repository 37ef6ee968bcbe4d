"""The expert file's header: v2's digest covers what decoding reads, every malformed field is an
ExpertFileError naming it, allocations are bounded, values finite, the header is compact, and
v1 files (the shipped zoo's) still load."""
import base64
import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

import support
from lorahub_compeft import ExpertFileError, compress, load_expert
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft.io.adapters import Adapter
from lorahub_compeft.store.format import canonical_json
from lorahub_compeft.zoo.artifacts import ARTIFACTS

ZOO_EXPERT = Path(ARTIFACTS) / "experts" / "bool_value.safetensors"


def _body(path) -> dict:
    data = path.read_bytes()
    meta = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
    return json.loads(zlib.decompress(base64.b85decode(meta["header"])))


@pytest.fixture
def saved(lora_dir, tmp_path):
    return compress(lora_dir, PAPER_COMPEFT, density=0.2).save(tmp_path / "e.safetensors")


def _swap_names(meta):
    t = meta["tensors"]
    t[0]["name"], t[1]["name"] = t[1]["name"], t[0]["name"]


@pytest.mark.parametrize("mutate", [
    _swap_names,
    lambda m: m["tensors"].reverse(),                              # entry order
    lambda m: m["tensors"][0].update(init=0.5),
    lambda m: m["tensors"][0].update(dtype="float16"),
    lambda m: m.update(sigma=m["sigma"] * 2),
    lambda m: m["adapter_config"].update(lora_alpha=1),
], ids=["names", "order", "init", "dtype", "sigma", "config"])
def test_any_header_edit_fails_the_header_digest(saved, mutate):
    support.edit_v2_header(saved, mutate, sign=False)
    with pytest.raises(ExpertFileError, match="header checksum"):
        load_expert(saved)


def test_payload_digest_covers_dtype_and_shape(saved):
    # the same bytes under another shape: scales [1] float32 -> [1] int32 passes the bytes
    # check of a v1 digest, not v2's
    def retype(h):
        h["scales"]["dtype"] = "I32"
    support.rewrite_safetensors_header(saved, retype)
    with pytest.raises(ExpertFileError, match="checksum"):
        load_expert(saved).state_dict()


BAD_FIELDS = {
    "adapter_config": [[], "x", {"peft_type": None}, {"peft_type": "LORA", "r": "8"},
                       {"peft_type": "LORA", "target_modules": 7},
                       {"peft_type": "LORA", "lora_alpha": "16"}],
    "tensors": [None, {}, [], [None], [{"name": 3}], [{"name": "a", "shape": "x", "dtype": "float32", "init": 0}]],
    "carried": [None, {}, [7]],
    "coding": [None, [], {"count": "3"}, {"count": 1, "m": None}],
    "density": [None, "0.1", 0, 2],
    "alpha": [None, -1, [1]],
    "sigma": [None, "s"],
    "numel": [None, -5, 1.5, True],
    "sizes": [None, [], {"payload_bytes": "1"}],
    "source": [None, 7],
    "encoding": [None, 5, "zip"],
    "selection": [None, "random"],
    "name": [5, {}],
    "payload_sha256": [None, 7],
}


@pytest.mark.parametrize("field,value", [(k, v) for k, vs in BAD_FIELDS.items() for v in vs],
                         ids=lambda v: repr(v)[:20])
def test_malformed_field_is_an_expert_file_error_naming_it(saved, field, value):
    support.edit_v2_header(saved, lambda m: m.update({field: value}))
    with pytest.raises(ExpertFileError) as err:
        expert = load_expert(saved)
        expert.summary()
        expert.state_dict()
    assert field in str(err.value) or "tensor" in str(err.value) or "kept count" in str(err.value)


def test_missing_field_and_bad_outer_fields(saved, tmp_path):
    copy = tmp_path / "c.safetensors"
    shutil.copy(saved, copy)
    support.edit_v2_header(copy, lambda m: m.pop("tensors"))
    with pytest.raises(ExpertFileError, match="lacks tensors"):
        load_expert(copy)
    for version, message in (("1.0", "format_version is '1.0'"), ("3", "newer lorahub-compeft")):
        shutil.copy(saved, copy)
        support.rewrite_safetensors_header(copy, lambda h: h["__metadata__"].update(format_version=version))
        with pytest.raises(ExpertFileError, match=message):
            load_expert(copy)
    shutil.copy(saved, copy)
    support.rewrite_safetensors_header(copy, lambda h: h["__metadata__"].update(header="%%%"))
    with pytest.raises(ExpertFileError, match="cannot be decoded"):
        load_expert(copy)


def test_deep_json_and_a_zip_bomb_are_refused(saved, tmp_path):
    deep = canonical_json({"a": 1})[:-1] + b',"b":' + b"[" * 100000 + b"]" * 100000 + b"}"
    bomb = b" " * (64 << 20)
    for body, message in ((deep, "nested too deeply|damaged"), (bomb, "inflates past")):
        copy = tmp_path / "c.safetensors"
        shutil.copy(saved, copy)
        support.rewrite_safetensors_header(copy, lambda h: h["__metadata__"].update(
            header=base64.b85encode(zlib.compress(body)).decode(),
            header_sha256=hashlib.sha256(body).hexdigest()))
        with pytest.raises(ExpertFileError, match=message):
            load_expert(copy)


def test_a_huge_forged_last_tensor_is_refused_before_allocating(saved):
    def huge(meta):  # numel and density adjusted so the kept count still matches
        meta["tensors"][-1]["shape"] = [10 ** 6, 10 ** 4]
        meta["numel"] = sum(torch.Size(t["shape"]).numel() for t in meta["tensors"])
        meta["density"] = meta["coding"]["count"] / meta["numel"]
    support.edit_v2_header(saved, huge)
    with pytest.raises(ExpertFileError, match="more than a file of this size can hold"):
        load_expert(saved)


def test_non_finite_scale_in_a_file_is_refused(lora_dir, tmp_path):
    expert = compress(lora_dir, PAPER_COMPEFT, density=0.2)
    expert._payload["scales"] = torch.tensor([float("inf")])
    expert._weights.scales = expert._payload["scales"]
    path = expert.save(tmp_path / "inf.safetensors")  # digest matches: only the check stops it
    with pytest.raises(ExpertFileError, match="NaN or infinite"):
        load_expert(path).state_dict()


def test_v1_zoo_file_still_loads_and_malformed_v1_headers_are_errors(tmp_path):
    expert = load_expert(ZOO_EXPERT)
    assert expert.meta["format_version"] == 1
    state = expert.state_dict()
    assert state and all(torch.isfinite(t).all() for t in state.values())
    # saved again, it becomes a v2 file with the same weights
    again = load_expert(expert.save(tmp_path / "v2.safetensors"))
    assert again.meta["format_version"] == 2
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    bad = {"adapter_config": "[]", "tensors": "7", "numel": '"x"', "source": "[1",
           "density": "NaN", "sizes": "null", "coding": "[" * 100000 + "]" * 100000}
    for field, value in bad.items():
        copy = tmp_path / "v1.safetensors"
        shutil.copy(ZOO_EXPERT, copy)
        support.rewrite_safetensors_header(copy, lambda h: h["__metadata__"].update({field: value}))
        with pytest.raises(ExpertFileError, match=field if field != "coding" else "nested|coding"):
            load_expert(copy).summary()


def _flan_t5_large_shaped() -> Adapter:
    """r=16 on q and v of 24+24 layers, d_model 1024: 48 encoder and 96 decoder modules."""
    generator = torch.Generator().manual_seed(0)
    modules = [f"encoder.block.{i}.layer.0.SelfAttention.{m}" for i in range(24) for m in "qv"]
    modules += [f"decoder.block.{i}.layer.{j}.{a}.{m}" for i in range(24)
                for j, a in ((0, "SelfAttention"), (1, "EncDecAttention")) for m in "qv"]
    tensors = {}
    for m in modules:
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(16, 1024, generator=generator)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(1024, 16, generator=generator)
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q", "v"],
              "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": "google/flan-t5-large"}
    return Adapter(tensors, config, {"hub_id": "lorahub/flan_t5_large-x", "revision": "main"})


def test_header_is_compact(tmp_path):
    """Issue 13 §4: header (file less payload) <= 25% of a zoo expert, <= 3% of a
    flan-t5-large-shaped one."""
    zoo = load_expert(ZOO_EXPERT)
    path = zoo.save(tmp_path / "zoo.safetensors")
    header = path.stat().st_size - zoo.sizes["payload_bytes"]
    assert header <= 0.25 * path.stat().st_size
    large = compress(_flan_t5_large_shaped(), PAPER_COMPEFT, density=0.1)
    path = large.save(tmp_path / "large.safetensors")
    assert len(large.meta["tensors"]) == 288
    assert path.stat().st_size - large.sizes["payload_bytes"] <= 0.03 * path.stat().st_size


@pytest.mark.parametrize("field,value", [("dtype", ["float32"]), ("dtype", {"a": 1}),
                                         ("init", 10 ** 15)])
def test_entry_fields_of_odd_types_or_overflowing_values_are_refused(saved, field, value):
    """Found by the fault campaign: an unhashable dtype escaped as TypeError, and an init
    beyond float16's range decoded to infinity."""
    def edit(meta):
        meta["tensors"][0][field] = value
        if field == "init":
            meta["tensors"][0]["dtype"] = "float16"
    support.edit_v2_header(saved, edit)
    with pytest.raises(ExpertFileError, match="dtype|overflow"):
        load_expert(saved).state_dict()
