"""A codec registered from outside the package: the store, the library and the command line
take it as they take ComPEFT and ERE, with nothing in store/ or cli/ written for it."""
import math
from dataclasses import dataclass

import pytest
import torch

from lorahub_compeft import ExpertFileError, ExpertLibrary, compress, load_adapter, load_expert
from lorahub_compeft.cli import main
from lorahub_compeft.codecs import base
from lorahub_compeft.codecs.base import Codec, CodecError, register
from lorahub_compeft.config import option


@dataclass(frozen=True)
class ToyOptions:
    """Toy: each coded tensor quantized uniformly, with its own offset and step."""
    bits: int = option(8, "bits per value, 1 to 8")


class Toy(Codec):
    """Payload toy.<tensor>: one uint8 code per value. Header field toy: bits, low, step."""
    name, Options, header_fields = "toy", ToyOptions, ("toy",)

    def compress(self, tau, config, options):
        if not 1 <= options.bits <= 8:
            raise ValueError(f"bits must be 1 to 8, got {options.bits}")
        payload, low, step = {}, [], []
        for name, t in tau.items():
            flat = t.float().reshape(-1)
            low.append(float(flat.min()))
            step.append((float(flat.max()) - low[-1]) / (2 ** options.bits - 1) or 1.0)
            payload[f"toy.{name}"] = torch.round((flat - low[-1]) / step[-1]).to(torch.uint8)
        info = {"bits": options.bits, "low": low, "step": step}
        entries = [{"name": k, "shape": list(t.shape)} for k, t in tau.items()]
        return payload, {"toy": info}, self.decode(payload, {"tensors": entries, "toy": info})

    def validate(self, meta, stored, numel, limit):
        info, entries = meta["toy"], meta["tensors"]
        if not isinstance(info, dict) or info.get("bits") not in range(1, 9):
            raise CodecError("header field toy must hold bits from 1 to 8")
        for e in entries:
            if stored.get(f"toy.{e['name']}") != [math.prod(e["shape"])]:
                raise CodecError(f"payload toy.{e['name']} does not match its tensor's shape")

    def decode(self, payload, meta):
        info, out = meta["toy"], {}
        for e, low, step in zip(meta["tensors"], info["low"], info["step"]):
            codes = payload[f"toy.{e['name']}"]
            if int(codes.max()) >= 2 ** info["bits"]:
                raise CodecError(f"toy.{e['name']} holds codes above {info['bits']} bits")
            out[e["name"]] = (codes.float() * step + low).reshape(e["shape"])
        return out

    def summary(self, meta):
        return {"bits": meta["toy"]["bits"]}

    def setting_text(self, summary):
        return f"{summary['bits']}-bit uniform"

    def inspect_lines(self, meta):
        return [("compression", f"toy: {meta['toy']['bits']}-bit uniform, a step per tensor"),
                *super().inspect_lines(meta)]

    def same_setting(self, entry, options):
        return entry.get("bits") == options.bits


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(base, "REGISTRY", dict(base.REGISTRY))  # unregistered afterwards
    register(Toy)
    return base.get("toy")


def test_a_registered_codec_round_trips_through_the_store(toy, lora_dir, tmp_path):
    original = load_adapter(lora_dir).tensors
    expert = compress(lora_dir, ToyOptions(bits=8))
    assert expert.codec == "toy" and expert.meta["toy"]["bits"] == 8 and not expert.sparse
    state = expert.state_dict()
    steps = dict(zip((e["name"] for e in expert.meta["tensors"]), expert.meta["toy"]["step"]))
    assert steps.keys() == original.keys()  # LoRA's tensors are all coded, none carried
    for name, t in original.items():  # within half a step of the original
        assert state[name].dtype == t.dtype
        assert (state[name] - t).abs().max() <= steps[name] / 2 + 1e-6
    path = expert.save(tmp_path / "toy.safetensors")
    loaded = load_expert(path)
    assert not loaded.is_decoded and loaded.summary()["codec"] == "toy"
    assert loaded.summary()["bits"] == 8
    again = loaded.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    with pytest.raises(ExpertFileError, match="no sparse ternary form"):
        loaded.ternary()
    # the codec's defaults and overrides, as for any codec; unknown options are refused
    assert compress(lora_dir, codec="toy").meta["toy"]["bits"] == 8
    assert compress(lora_dir, codec="toy", bits=3).meta["toy"]["bits"] == 3
    with pytest.raises(TypeError, match="unknown option.*density.*it takes bits"):
        compress(lora_dir, codec="toy", density=0.1)


def test_the_store_names_the_file_when_the_codec_refuses_it(toy, lora_dir, tmp_path):
    forged = compress(lora_dir, codec="toy")
    forged.meta["toy"]["bits"] = 9  # saved with a valid digest: the codec's check must catch it
    path = forged.save(tmp_path / "bits.safetensors")
    with pytest.raises(ExpertFileError, match="bits.safetensors: header field toy"):
        load_expert(path)
    forged = compress(lora_dir, codec="toy")
    forged.meta["toy"]["bits"] = 2  # the 8-bit codes no longer fit: decoding refuses them
    path = forged.save(tmp_path / "codes.safetensors")
    expert = load_expert(path)
    with pytest.raises(ExpertFileError, match="codes.safetensors: toy.* holds codes above 2 bits"):
        expert.state_dict()


def test_a_file_of_an_unregistered_codec_is_refused(toy, lora_dir, tmp_path, monkeypatch):
    path = compress(lora_dir, codec="toy").save(tmp_path / "e.safetensors")
    monkeypatch.delitem(base.REGISTRY, "toy")
    with pytest.raises(ExpertFileError, match="unknown codec 'toy'.*upgrade"):
        load_expert(path)


def test_the_command_line_takes_a_registered_codec(toy, lora_dir, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(out), "--codec", "toy", "--bits", "4"]) == 0
    assert "toy (4-bit uniform)" in capsys.readouterr().out
    # the same bytes as from Python, with the flag's value; and with no flag, the default
    python = compress(lora_dir, codec="toy", bits=4).save(tmp_path / "py.safetensors")
    assert out.read_bytes() == python.read_bytes()
    assert main(["compress", str(lora_dir), "-o", str(out), "--codec", "toy", "--force"]) == 0
    assert out.read_bytes() == compress(lora_dir, codec="toy").save(
        tmp_path / "py8.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "toy: 8-bit uniform, a step per tensor" in text and "bits/param" in text
    # another codec's flag, or this codec's flag with another codec, is refused in one line
    assert main(["compress", str(lora_dir), "-o", str(out), "--codec", "toy", "--density", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --density is an option of --codec compeft, not of --codec toy (it "
                   "takes --bits)")
    assert main(["compress", str(lora_dir), "-o", str(out), "--bits", "4", "--force"]) == 2
    assert "--bits is an option of --codec toy" in capsys.readouterr().err


def test_library_add_takes_a_registered_codec(toy, lora_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    assert main(["library", "add", str(root), str(lora_dir), "--codec", "toy", "--bits", "6"]) == 0
    library = ExpertLibrary(root)
    entry = library.entry(lora_dir.name)
    assert entry["codec"] == "toy" and entry["bits"] == 6
    assert library.get(lora_dir.name).state_dict().keys() == load_adapter(lora_dir).tensors.keys()
    capsys.readouterr()
    assert main(["library", "list", str(root)]) == 0
    assert "6-bit uniform" in capsys.readouterr().out
    # adding it again with the same setting changes nothing; from Python, the same entry
    assert library.add(lora_dir, codec="toy", bits=6) == entry
    python = ExpertLibrary(tmp_path / "py")
    assert python.add(lora_dir, ToyOptions(bits=6)) == entry
    assert (python.root / entry["file"]).read_bytes() == (root / entry["file"]).read_bytes()
