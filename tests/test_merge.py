"""Merging experts on each module's ΔW: task arithmetic and TIES, dense and compressed."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM

import support
from lorahub_compeft import compress, load_adapter
from lorahub_compeft.config import PAPER_COMPEFT
from lorahub_compeft.merge import merge, merge_deltas, ties_merge


@pytest.fixture(scope="module")
def second_lora(tiny_t5, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora2") / "expert-blue"
    return support.train_expert(tiny_t5, out, support.constant_task("blue"), steps=30, seed=1)


def _deltas(adapter):
    scale = adapter.config["lora_alpha"] / adapter.config["r"]
    return {k: scale * adapter.tensors[k.replace("lora_A", "lora_B")].double()
            @ adapter.tensors[k].double() for k in adapter.tensors if "lora_A" in k}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merge_of_one_expert_with_weight_one_is_that_expert(lora_dir, method):
    result = merge([lora_dir], method=method, weights=[1.0], density=1.0)
    want, got = _deltas(load_adapter(lora_dir)), _deltas(result.adapter)
    assert result.energy_kept == pytest.approx(1.0)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key


def test_ties_sign_election_on_a_hand_made_case():
    d1 = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    d2 = torch.tensor([[-1.0, -2.0], [-4.0, 0.0]])
    d3 = torch.tensor([[-1.0, 4.0], [1.0, 0.0]])
    merged = ties_merge([d1, d2, d3], [1.0, 1.0, 1.0], density=1.0)
    # entry (0,0): sum 1 > 0 elects +, only d1 agrees -> 3; (0,1): sum 1 -> +, only d3 -> 4;
    # (1,0): sum -1 -> -, only d2 -> -4; (1,1): only d1 is non-zero -> 0.5
    assert torch.equal(merged, torch.tensor([[3.0, 4.0], [-4.0, 0.5]]))
    # trimming to 1 of 4 entries per expert leaves 3, -2 (wait: |-4| is d2's largest) and 4
    trimmed = ties_merge([d1, d2, d3], [1.0, 1.0, 1.0], density=0.25)
    assert torch.equal(trimmed, torch.tensor([[3.0, 4.0], [-4.0, 0.0]]))
    # weights scale after the election: halving d1 halves its entry only
    assert ties_merge([d1, d2, d3], [0.5, 1.0, 1.0], density=1.0)[0, 0] == 1.5


def test_task_arithmetic_is_the_weighted_sum_of_products(lora_dir, second_lora):
    merged, _, weights = merge_deltas([lora_dir, second_lora], "task_arithmetic", [0.7, -0.4])
    assert weights == [0.7, -0.4]
    assert merge_deltas([lora_dir, second_lora])[2] == [0.5, 0.5]  # default: the mean
    one, two = _deltas(load_adapter(lora_dir)), _deltas(load_adapter(second_lora))
    for (a_name, _), delta in merged.items():
        assert torch.allclose(delta, 0.7 * one[a_name] - 0.4 * two[a_name])


def fp32_ambiguous(adapters, key: str, density: float) -> torch.Tensor:
    """The entries of module `key` whose TIES outcome PEFT's float32 arithmetic may decide
    otherwise than our float64. PEFT computes each ΔW = s·B·A in float32, within
    e = γ_r·s·(|B|·|A|) + u·|ΔW| of it (Higham's bound for a dot product of length r, u = 2^-24,
    γ_r = r·u / (1 - r·u)). So a kept entry within e_j + max e of the largest dropped magnitude,
    or a dropped one that close to the smallest kept, may land on the other side of the trim
    (magnitudes tied within e fall either way, by the order of torch.topk's kernel on that
    CPU), and an entry whose trimmed sum is within Σe of 0 may elect the other sign."""
    u = 2.0 ** -24
    errors, trimmed = [], []
    ambiguous = None
    for adapter in adapters:
        s = adapter.config["lora_alpha"] / adapter.config["r"]
        a = adapter.tensors[key].double()
        b = adapter.tensors[key.replace("lora_A", "lora_B")].double()
        delta, r = s * b @ a, a.shape[0]
        error = r * u / (1 - r * u) * s * (b.abs() @ a.abs()) + u * delta.abs()
        magnitudes = delta.abs().reshape(-1).sort(descending=True).values
        k = int(density * delta.numel())
        keep = delta.abs() >= magnitudes[k - 1]
        near = torch.where(keep, delta.abs() - magnitudes[k], magnitudes[k - 1] - delta.abs())
        flips = near <= error + error.max()
        ambiguous = flips if ambiguous is None else ambiguous | flips
        errors.append(error)
        trimmed.append(delta * keep)
    kept = sum(t != 0 for t in trimmed) > 0  # an entry every expert trims is 0 either way
    return ambiguous | (kept & (sum(trimmed).abs() <= sum(errors)))


@pytest.mark.parametrize("method,peft_type", [("task_arithmetic", "svd"), ("ties", "ties_svd")])
def test_matches_peft_add_weighted_adapter(tiny_t5, lora_dir, second_lora, method, peft_type):
    weights, density = [0.6, 0.9], 0.3
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), lora_dir,
                                      adapter_name="one")
    model.load_adapter(second_lora, adapter_name="two")
    model.add_weighted_adapter(["one", "two"], weights, "merged", combination_type=peft_type,
                               svd_rank=32, density=density)  # full rank: no truncation
    ours = _deltas(merge([lora_dir, second_lora], method, weights, density, rank=32).adapter)
    adapters = [load_adapter(lora_dir), load_adapter(second_lora)]
    counts = []  # ambiguous entries, entries: per module
    assert ours
    for key, delta in ours.items():
        module = model.base_model.model.get_submodule(key.removeprefix("base_model.model.")
                                                      .removesuffix(".lora_A.weight"))
        theirs = module.get_delta_weight("merged").double()
        # PEFT trims in float32, we in float64: only the entries float32's rounding can move
        # across the trim or the sign election may differ (fp32_ambiguous); all else agrees.
        differ = (delta - theirs).abs() > 1e-5
        if method == "ties":
            ambiguous = fp32_ambiguous(adapters, key, density)
            assert not (differ & ~ambiguous).any(), key
            counts.append((int(ambiguous.sum()), ambiguous.numel()))
        else:
            assert not differ.any(), key
        assert torch.allclose(delta[~differ], theirs[~differ], atol=1e-5)
    if method == "ties":  # rare, or the comparison would test nothing
        assert sum(a for a, _ in counts) < 0.01 * sum(n for _, n in counts)


def test_compressed_experts_merge_like_their_decoded_adapters(lora_dir, second_lora):
    experts = [compress(lora_dir, PAPER_COMPEFT, density=0.3, alpha=2), compress(second_lora, codec="ere")]
    via_experts = merge(experts, "ties").adapter
    via_adapters = merge([e.to_adapter() for e in experts], "ties").adapter
    assert all(torch.equal(via_experts.tensors[k], via_adapters.tensors[k])
               for k in via_experts.tensors)


def test_bad_merge_input_is_a_clear_error(lora_dir, ia3_dir, lora_head_dir):
    with pytest.raises(ValueError, match="unknown merge method"):
        merge([lora_dir], method="dare")
    with pytest.raises(ValueError, match="one weight per expert"):
        merge([lora_dir], weights=[1, 2])
    with pytest.raises(ValueError, match="only plain LoRA"):
        merge([lora_dir, ia3_dir])
    with pytest.raises(ValueError, match="non-LoRA tensors"):
        merge([lora_head_dir])
    with pytest.raises(ValueError, match="no experts"):
        merge([])


def test_cli_merge_writes_a_peft_adapter(tiny_t5, lora_dir, second_lora, tmp_path, capsys):
    from lorahub_compeft.cli import main
    out = tmp_path / "merged"
    assert main(["merge", str(lora_dir), str(second_lora), "-o", str(out), "--method", "ties",
                 "--weights", "1,1", "--density", "0.5"]) == 0
    assert "ties" in capsys.readouterr().out
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out)
    assert model.peft_config["default"].r == 8
    assert main(["merge", str(lora_dir), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_merge_and_compose_check_experts_alike(tiny_t5, lora_dir, tmp_path):
    """One check for both (compose/experts.py): an incompatible pair gets one message, and the
    base model is compared by identity, not by the string an expert records."""
    import json
    import os
    import shutil

    from lorahub_compeft.compose.composer import compose
    rank_two = support.train_expert(tiny_t5, tmp_path / "rank-two", support.constant_task("red"),
                                    steps=2, r=2)
    with pytest.raises(ValueError) as merging:
        merge([lora_dir, rank_two])
    with pytest.raises(ValueError) as composing:
        compose([str(lora_dir), str(rank_two)], support.constant_task("red"), progress=False)
    assert str(merging.value) == str(composing.value)
    assert f"rank-two: r is 2, but {lora_dir.name} has 4" in str(merging.value)

    def with_base(name, base):
        shutil.copytree(lora_dir, tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(
            json.dumps(dict(config, base_model_name_or_path=base)))
        return tmp_path / name
    relative = with_base("relative", os.path.relpath(tiny_t5))  # the same folder, another string
    assert merge([lora_dir, relative]).energy_kept == pytest.approx(1.0)
    with pytest.raises(ValueError, match="elsewhere: base_model_name_or_path") as other_base:
        merge([lora_dir, with_base("elsewhere", "t5-small")])
    assert "--model" not in str(other_base.value)  # merging has no base to choose
