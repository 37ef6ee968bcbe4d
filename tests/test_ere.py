"""ERE: low-rank factors of each LoRA module's product, rank allocated under one byte budget."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForSeq2SeqLM

from lorahub_compeft import ExpertFileError, compress, load_adapter, load_expert
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft.codecs import ere
from lorahub_compeft.store.expert import _read_checked


def _adapter_dir(tmp_path, tensors, r, alpha=None, name="lowrank"):
    """A PEFT-shaped adapter dir holding the given LoRA tensors."""
    out = tmp_path / name
    out.mkdir()
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha or r, "target_modules": ["q"],
              "base_model_name_or_path": "none"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def _modules(seed, dims=((24, 16), (40, 16)), r=4, true_rank=None, gains=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m, ((out, inp), gain) in enumerate(zip(dims, gains or [1.0] * len(dims))):
        k = true_rank or r
        a = torch.zeros(r, inp)
        b = torch.zeros(out, r)
        a[:k] = torch.randn(k, inp, generator=g)
        b[:, :k] = gain * torch.randn(out, k, generator=g)
        tensors[f"m{m}.q.lora_A.weight"] = a
        tensors[f"m{m}.q.lora_B.weight"] = b
    return tensors


def _products(state, scale=1.0):
    return {k: scale * state[k.replace("lora_A", "lora_B")] @ state[k]
            for k in state if "lora_A" in k}


@pytest.mark.parametrize("bits,tolerance", [(16, 2e-3), (8, 2e-2), (4, 0.25)])
def test_round_trip_of_a_low_rank_product_is_exact_up_to_quantization(tmp_path, bits, tolerance):
    tensors = _modules(0, true_rank=2)  # rank 2 < r = 4: a generous budget keeps all of it
    path = compress(_adapter_dir(tmp_path, tensors, r=4, alpha=8), codec="ere", budget_bits=40,
                    quant_bits=bits).save(tmp_path / "e.safetensors")
    expert = load_expert(path)
    assert expert.meta["ere"]["ranks"] == [2, 2]
    decoded = expert.state_dict()
    for key, product in _products(tensors).items():
        got = decoded[key.replace("lora_A", "lora_B")] @ decoded[key]
        error = float((got - product).norm() / product.norm())
        assert error < tolerance, (bits, key, error)
        assert decoded[key].shape == tensors[key].shape  # zero-padded back to r
        assert torch.all(decoded[key][2:] == 0)


def test_exact_rank_keeps_the_product_up_to_float_error(tmp_path):
    """fp16 factors of a rank-2 product: error at fp16's precision, far below any truncation."""
    tensors = _modules(1, true_rank=2)
    factors = ere.decode_lora(*_compressed(tensors, budget_bits=40, bits=16))
    for key, product in _products(tensors).items():
        got = factors[key.replace("lora_A", "lora_B")] @ factors[key]
        assert torch.allclose(got, product, atol=1e-2 * float(product.abs().max()))


def _compressed(tensors, budget_bits, bits, config=None):
    config = config or {"r": 4, "lora_alpha": 4}
    payload, info = ere.compress_lora(tensors, config, budget_bits, bits)
    return payload, list(tensors), {k: tuple(v.shape) for k, v in tensors.items()}, info


@pytest.mark.parametrize("budget_bits", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("bits", [4, 8])
def test_budget_is_respected(budget_bits, bits):
    tensors = _modules(2, dims=((24, 16), (40, 16), (16, 64)), r=4)
    payload, _, _, info = _compressed(tensors, budget_bits, bits)
    numel = sum(t.numel() for t in tensors.values())
    stored = sum(v.numel() * v.element_size() for v in payload.values())
    assert stored <= budget_bits * numel / 8
    # and the budget is used: one more component of any module would not have fitted
    left = budget_bits * numel / 8 - stored
    spectra_shapes = [(24, 16), (40, 16), (16, 64)]
    assert all(k == 4 or ere.component_bytes(s, bits) > left
               for s, k in zip(spectra_shapes, info["ranks"]))


def test_rank_allocation_prefers_the_module_with_the_larger_spectrum():
    tensors = _modules(3, dims=((32, 32), (32, 32)), gains=(1.0, 5.0))
    _, _, _, info = _compressed(tensors, budget_bits=2.0, bits=8)
    small, large = info["ranks"]
    assert large > small
    # the same spectra swapped give the swapped ranks
    swapped = _modules(3, dims=((32, 32), (32, 32)), gains=(5.0, 1.0))
    assert _compressed(swapped, 2.0, 8)[3]["ranks"][0] > _compressed(swapped, 2.0, 8)[3]["ranks"][1]


def test_allocation_is_greedy_by_energy_per_byte():
    """Same energies, one module twice as costly: the cheap one's components come first."""
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    cheap = ere.Spectrum(torch.eye(8, 3, dtype=torch.float64), s, torch.eye(8, 3, dtype=torch.float64))
    dear = ere.Spectrum(torch.eye(24, 3, dtype=torch.float64), s, torch.eye(24, 3, dtype=torch.float64))
    cost_cheap, cost_dear = ere.component_bytes((8, 8), 8), ere.component_bytes((24, 24), 8)
    assert ere.allocate_ranks([cheap, dear], 3 * cost_cheap, 8) == [3, 0]
    # sigma 3 in the dear one (9/cost_dear) beats sigma 1 in the cheap one (1/cost_cheap)
    assert ere.allocate_ranks([cheap, dear], 2 * cost_cheap + cost_dear, 8) == [2, 1]


def test_trained_expert_round_trips_through_peft(tiny_t5, lora_dir, tmp_path):
    expert = compress(lora_dir, codec="ere", budget_bits=16, quant_bits=8)
    path = expert.save(tmp_path / "e.safetensors")
    loaded = load_expert(path)
    assert loaded.codec == "ere" and loaded.summary()["codec"] == "ere"
    out = loaded.export(tmp_path / "adapter")
    original = load_adapter(lora_dir)
    scale = original.config["lora_alpha"] / original.config["r"]
    want = _products(original.tensors, scale)
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out)
    decoded = loaded.state_dict()
    errors = []
    for key, product in want.items():
        got = scale * decoded[key.replace("lora_A", "lora_B")] @ decoded[key]
        errors.append(float((got - product).norm() / product.norm()))
        module = model.get_submodule(key.removesuffix(".lora_A.weight"))
        merged = module.get_delta_weight("default")
        assert torch.allclose(merged, got.to(merged.dtype), atol=1e-6)
    assert loaded.meta["ere"]["ranks"] == [4] * len(want)  # 16 bits a value afford full rank
    assert max(errors) < 0.05


def test_old_compeft_files_without_a_codec_field_still_load(lora_dir, tmp_path):
    expert = compress(lora_dir, PAPER_COMPEFT, density=0.2)
    assert "codec" not in expert.meta  # ComPEFT files are written exactly as before
    loaded = load_expert(expert.save(tmp_path / "old.safetensors"))
    assert loaded.codec == "compeft" and loaded.summary()["codec"] == "compeft"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expert.state_dict().items())


def test_shipped_zoo_expert_loads(tmp_path):
    from lorahub_compeft.zoo.artifacts import ARTIFACTS
    path = next((ARTIFACTS / "experts").glob("*.safetensors"))
    expert = load_expert(path)
    assert expert.codec == "compeft" and len(expert.state_dict()) == 96


def test_library_list_reads_an_index_written_before_codecs(capsys):
    from lorahub_compeft.cli import main
    from lorahub_compeft.zoo.artifacts import ARTIFACTS
    index = json.loads((ARTIFACTS / "experts" / "index.json").read_text())
    assert all("codec" not in e for e in index["experts"].values())  # the shipped, older index
    assert main(["library", "list", str(ARTIFACTS / "experts")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pair_sum")]
    assert len(rows) == 1 and " compeft " in rows[0] and "k=0.2 a=3 pt" in rows[0]


def test_ternary_form_is_refused_for_ere(lora_dir):
    with pytest.raises(ExpertFileError, match="no sparse ternary form"):
        compress(lora_dir, codec="ere").ternary()


def test_resaving_a_loaded_ere_expert_keeps_its_bytes(lora_dir, tmp_path):
    first = compress(lora_dir, codec="ere", budget_bits=2).save(tmp_path / "a.safetensors")
    second = load_expert(first).save(tmp_path / "b.safetensors")
    assert first.read_bytes() == second.read_bytes()


def test_bad_ere_input_is_a_clear_error(lora_dir, ia3_dir, tmp_path):
    with pytest.raises(ValueError, match="LoRA factors only"):
        compress(ia3_dir, codec="ere")
    with pytest.raises(ValueError, match="bits per parameter"):
        compress(lora_dir, codec="ere", budget_bits=0)
    with pytest.raises(ValueError, match="quantization bits"):
        compress(lora_dir, codec="ere", quant_bits=3)
    with pytest.raises(ValueError, match="codec must be"):
        compress(lora_dir, codec="zip")


def test_forged_ere_ranks_are_refused_before_decoding(lora_dir, tmp_path):
    path = compress(lora_dir, codec="ere", budget_bits=2).save(tmp_path / "e.safetensors")
    payload = _read_checked(path, load_expert(path).meta)
    meta = load_expert(path).meta
    for ranks in ([99] * len(meta["ere"]["ranks"]), [k + 1 for k in meta["ere"]["ranks"]]):
        forged = dict(meta, ere=dict(meta["ere"], ranks=ranks))
        header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in forged.items()}
        bad = tmp_path / f"forged{ranks[0]}.safetensors"
        save_file(payload, bad, metadata=header)
        with pytest.raises(ExpertFileError, match="rank|payload"):
            load_expert(bad)


def test_cli_compress_inspect_and_list_show_the_codec(lora_dir, tmp_path, capsys):
    from lorahub_compeft.cli import main
    out = tmp_path / "e.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(out), "--codec", "ere",
                 "--budget-bits", "2", "--quant-bits", "8"]) == 0
    assert "ere (2b/p int8" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ere: low-rank factors" in text and "budget 2 bits/param" in text
    lib = tmp_path / "lib"
    assert main(["library", "add", str(lib), str(lora_dir), "--name", "x-ere", "--codec", "ere"]) == 0
    assert main(["library", "add", str(lib), str(lora_dir), "--name", "x-compeft", "--alpha", "1",
                 "--global", "--density", "0.1"]) == 0  # the paper's settings, shown as such
    capsys.readouterr()
    assert main(["library", "list", str(lib)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert " ere " in rows["x-ere"] and "1b/p int4" in rows["x-ere"]
    assert " compeft " in rows["x-compeft"] and "k=0.1 a=1" in rows["x-compeft"]


def test_ere_experts_compose_like_their_decoded_factors(lora_dir, tmp_path):
    from lorahub_compeft import Adapter
    from lorahub_compeft.compose.composer import compose
    from lorahub_compeft.store.library import ExpertLibrary
    import support
    second = support.train_expert(load_adapter(lora_dir).base_model, tmp_path / "blue",
                                  support.constant_task("blue"), steps=20, seed=2)
    library = ExpertLibrary(tmp_path / "lib")
    library.add(lora_dir, name="red", codec="ere", budget_bits=4)
    library.add(second, PAPER_COMPEFT, name="blue")  # a ComPEFT expert beside it: the stack goes dense
    examples = support.constant_task("red")
    by_library = compose(library, examples, n_experts=2, budget=6, seed=3, progress=False)
    decoded = [Adapter(library.get(n).state_dict(), library.get(n).config, {"path": n})
               for n in library.names()]
    by_factors = compose(decoded, examples, n_experts=2, budget=6, seed=3, progress=False)
    assert list(by_library.weights.values()) == list(by_factors.weights.values())
    assert by_library.losses == by_factors.losses
