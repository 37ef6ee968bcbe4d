import base64
import hashlib
import json
import struct
import zlib

import pytest
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import support
from lorahub_compeft import (AdapterError, CompressionError, ExpertFileError, compress,
                             load_adapter, load_expert)
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft.codecs import coding
from lorahub_compeft.store.format import FORMAT_VERSION, canonical_json


def _kept_values(state):
    return torch.cat([t.reshape(-1).float() for k, t in sorted(state.items())])


@pytest.mark.parametrize("encoding", ["golomb", "bitmask"])
def test_file_round_trip_is_bit_exact(lora_dir, tmp_path, encoding):
    expert = compress(lora_dir, PAPER_COMPEFT, density=0.2, alpha=1.5, encoding=encoding)
    before = expert.state_dict()
    path = expert.save(tmp_path / "e.safetensors")
    loaded = load_expert(path)
    assert not loaded.is_decoded
    after = loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k])
    scale = torch.tensor(1.5 * loaded.meta["sigma"], dtype=torch.float32)
    nz = _kept_values(after)
    nz = nz[nz != 0]
    assert torch.equal(nz.abs(), scale.expand_as(nz))


def test_encodings_decode_to_the_same_tensors(lora_dir):
    a = compress(lora_dir, PAPER_COMPEFT, density=0.1, encoding="golomb").state_dict()
    b = compress(lora_dir, PAPER_COMPEFT, density=0.1, encoding="bitmask").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters_round_trip_exactly(lora_dir, tmp_path, dtype):
    adapter = load_adapter(lora_dir)
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text(json.dumps(adapter.config))
    save_file({k: v.to(dtype) for k, v in adapter.tensors.items()}, half / "adapter_model.safetensors")
    expert = compress(half, PAPER_COMPEFT, density=0.3)
    loaded = load_expert(expert.save(tmp_path / "h.safetensors")).state_dict()
    for k, t in expert.state_dict().items():
        assert loaded[k].dtype == dtype and torch.equal(loaded[k], t)


def test_golomb_payload_is_near_the_entropy_bound(lora_dir):
    for density in (0.05, 0.1, 0.2, 0.3):
        expert = compress(lora_dir, PAPER_COMPEFT, density=density)
        numel = expert.meta["numel"]
        streams = {k: v for k, v in expert._payload.items() if k.startswith("stream.")}
        bits = coding.payload_bits(streams)
        bound = coding.ternary_entropy_bits(density, numel)
        # Real top-k positions cluster (A is denser than B), so a file can dip below the i.i.d.
        # bound; it must never be far above it. Small adapter: padding bytes weigh more.
        assert bits <= bound * 1.05 + 64
        assert expert.sizes["payload_bytes"] < expert.sizes["fp16_bytes"] / 4


def test_exported_adapter_loads_in_peft_and_matches_decoded_weights(tiny_t5, lora_dir, tmp_path):
    expert = compress(lora_dir, PAPER_COMPEFT, density=0.3, alpha=1.0)
    out = expert.export(tmp_path / "exported")
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    batch = tok(["say the word : beta ?", "say the word : pi ?"], return_tensors="pt", padding=True)
    labels = tok(["red", "red"], return_tensors="pt")["input_ids"]
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out).eval()
    direct = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), lora_dir).eval()
    set_peft_model_state_dict(direct, expert.state_dict())  # decoded weights held directly
    original = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), lora_dir).eval()
    with torch.no_grad():
        a = reloaded(**batch, labels=labels).logits
        b = direct(**batch, labels=labels).logits
        c = original(**batch, labels=labels).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # compression really changed the weights


def test_ia3_task_vector_is_measured_from_one(ia3_dir, tmp_path):
    original = load_adapter(ia3_dir).tensors
    expert = compress(ia3_dir, PAPER_COMPEFT, density=0.5)
    state = load_expert(expert.save(tmp_path / "ia3.safetensors")).state_dict()
    for k, t in state.items():
        changed = t != 1.0
        # entries left out of the top-k fall back to the init, 1, not to 0
        assert torch.all(t[~changed] == 1.0)
        assert torch.equal(torch.sign(t[changed] - 1), torch.sign(original[k][changed] - 1))
        assert changed.any()


def test_modules_to_save_are_carried_losslessly_and_counted(lora_head_dir, tmp_path):
    original = load_adapter(lora_head_dir).tensors
    heads = [k for k in original if "lora_" not in k]
    assert heads, "the fixture should save an lm_head"
    expert = compress(lora_head_dir, PAPER_COMPEFT, density=0.1)
    state = load_expert(expert.save(tmp_path / "head.safetensors")).state_dict()
    head_bytes = sum(original[k].numel() * original[k].element_size() for k in heads)
    for k in heads:
        assert torch.equal(state[k], original[k])
    assert expert.sizes["carried_bytes"] == head_bytes
    assert expert.sizes["payload_bytes"] > head_bytes


def test_legacy_bin_adapters_are_read_without_pickle(lora_dir, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    torch.save(load_file(lora_dir / "adapter_model.safetensors"), legacy / "adapter_model.bin")
    a = compress(legacy, PAPER_COMPEFT, density=0.1).state_dict()
    b = compress(lora_dir, PAPER_COMPEFT, density=0.1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, legacy / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.bin"):
        load_adapter(legacy)


def test_bad_adapters_name_the_path(tmp_path, lora_dir):
    with pytest.raises(AdapterError, match="no such directory"):
        load_adapter(tmp_path / "nope" / "deeper")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match=str(empty)):
        load_adapter(empty)
    (empty / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(empty)
    (empty / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="neither"):
        load_adapter(empty)
    (empty / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        load_adapter(empty)
    save_file({}, empty / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="no tensors"):
        load_adapter(empty)


def test_bad_compression_input(lora_dir, tmp_path):
    with pytest.raises(CompressionError, match="density"):
        compress(lora_dir, PAPER_COMPEFT, density=0)
    with pytest.raises(CompressionError, match="alpha"):
        compress(lora_dir, PAPER_COMPEFT, alpha=-1)
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    first = next(iter(tensors))
    tensors[first][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(CompressionError, match="NaN"):
        compress(bad, PAPER_COMPEFT)
    path = compress(lora_dir, PAPER_COMPEFT).save(tmp_path / "x.safetensors")
    with pytest.raises(FileExistsError, match="force"):
        compress(lora_dir, PAPER_COMPEFT).save(path)


# --- damaged files --------------------------------------------------------------------------
def _forge(path, mutate):
    """Edit a v2 file's decoded header and sign it again, as a forger would: what is left to
    stop it is validation, not the digest."""
    def edit(h):
        meta = h["__metadata__"]
        body = json.loads(zlib.decompress(base64.b85decode(meta["header"])))
        mutate(body)
        raw = canonical_json(body)
        meta.update(header=base64.b85encode(zlib.compress(raw)).decode(),
                    header_sha256=hashlib.sha256(raw).hexdigest())
    support.rewrite_safetensors_header(path, edit)


@pytest.fixture
def saved(lora_dir, tmp_path):
    return compress(lora_dir, PAPER_COMPEFT, density=0.1).save(tmp_path / "e.safetensors")


def test_newer_version_is_refused(saved):
    support.rewrite_safetensors_header(saved, lambda h: h["__metadata__"].update(format_version=str(FORMAT_VERSION + 1)))
    with pytest.raises(ExpertFileError, match="newer"):
        load_expert(saved)


def test_wrong_magic_is_refused(saved, tmp_path):
    support.rewrite_safetensors_header(saved, lambda h: h["__metadata__"].update(format="something-else"))
    with pytest.raises(ExpertFileError, match="not a lorahub-compeft expert"):
        load_expert(saved)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, plain)
    with pytest.raises(ExpertFileError, match="not a lorahub-compeft expert"):
        load_expert(plain)


def test_truncation_is_refused(saved):
    saved.write_bytes(saved.read_bytes()[:-10])
    with pytest.raises(ExpertFileError, match="truncated"):
        load_expert(saved)
    saved.write_bytes(b"\x00\x01")
    with pytest.raises(ExpertFileError):
        load_expert(saved)


def test_flipped_payload_byte_fails_the_checksum(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF
    saved.write_bytes(bytes(data))
    expert = load_expert(saved)  # the header is intact
    with pytest.raises(ExpertFileError, match="checksum"):
        expert.state_dict()


def test_forged_sizes_are_refused_before_allocating(saved):
    _forge(saved, lambda meta: meta.update(numel=meta["numel"] + 1))
    with pytest.raises(ExpertFileError, match="add up"):
        load_expert(saved)
    _forge(saved, lambda meta: meta.update(numel=10 ** 12))
    with pytest.raises(ExpertFileError, match="more than a file of this size can hold"):
        load_expert(saved)

    def huge(meta):
        meta["tensors"][0]["shape"] = [10 ** 3, 10 ** 3]
        meta["numel"] = sum(t["shape"][0] * t["shape"][1] for t in meta["tensors"])
    _forge(saved, huge)
    with pytest.raises(ExpertFileError, match="does not match density"):
        load_expert(saved)


def test_indices_out_of_range_are_refused(lora_dir, tmp_path):
    expert = compress(lora_dir, PAPER_COMPEFT, density=0.1)
    path = expert.save(tmp_path / "e.safetensors")

    def shrink(meta):  # claim the last tensor is smaller than the stream says
        numel = meta["numel"]
        last = meta["tensors"][-1]
        cut = last["shape"][0] * last["shape"][1] - 1
        last["shape"] = [1, 1]
        meta["numel"] = numel - cut
        meta["density"] = meta["coding"]["count"] / (numel - cut)
    _forge(path, shrink)
    with pytest.raises(ExpertFileError, match="out of range"):
        load_expert(path).state_dict()


def test_export_with_force_replaces_the_old_dir_and_leaves_no_backup(lora_dir, tmp_path):
    out = tmp_path / "adapter"
    compress(lora_dir, PAPER_COMPEFT, density=0.1).export(out)
    compress(lora_dir, PAPER_COMPEFT, density=0.3).export(out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    reloaded = load_adapter(out).tensors
    kept = sum(int((t != 0).sum()) for t in reloaded.values())
    assert kept == round(0.3 * sum(t.numel() for t in reloaded.values()))


def test_saved_header_is_sorted_so_files_are_reproducible(lora_dir, tmp_path):
    path = compress(lora_dir, PAPER_COMPEFT, density=0.3).save(tmp_path / "e.safetensors")
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    parsed = json.loads(data[8:8 + length])
    assert list(parsed) == sorted(parsed)
    assert list(parsed["__metadata__"]) == sorted(parsed["__metadata__"])
    assert load_expert(path).state_dict().keys() == compress(lora_dir, PAPER_COMPEFT, density=0.3).state_dict().keys()
