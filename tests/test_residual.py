"""Full fine-tuning residuals: θ_ft − θ_base of the zoo base, stored with both codecs."""
import pytest
import torch

from lorahub_compeft import load_expert
from lorahub_compeft.cli import main
from lorahub_compeft.io.models import load_model
from lorahub_compeft.io.residuals import load_state, residual_adapter
from zoo_build.build import collate, encode
from lorahub_compeft.zoo.artifacts import ARTIFACTS
from lorahub_compeft.zoo.tasks import generate

BASE = ARTIFACTS / "base"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The zoo base fully fine-tuned on one upstream task for a few Adam steps."""
    torch.manual_seed(0)
    model, tokenizer = load_model(str(BASE))
    batch = collate(encode(tokenizer, generate("list_count", 16, seed=7)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(4):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("fullft") / "list_count"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("codec_args", [["--codec", "compeft", "--density", "0.3"],
                                        ["--codec", "ere", "--budget-bits", "40",
                                         "--quant-bits", "16"]])
def test_compress_residual_and_export_the_model(tuned, tmp_path, codec_args, capsys):
    expert_path = tmp_path / "r.safetensors"
    assert main(["compress", str(tuned), "--base", str(BASE), "-o", str(expert_path)]
                + codec_args) == 0
    expert = load_expert(expert_path)
    assert expert.config["peft_type"] == "RESIDUAL"
    out = tmp_path / "model"
    assert main(["export", str(expert_path), "-o", str(out)]) == 0
    assert "wrote model" in capsys.readouterr().out
    base, ft, got = load_state(BASE), load_state(tuned), load_state(out)
    residual = expert.state_dict()
    for name, t in ft.items():
        if name not in residual:
            assert torch.equal(got[name], base[name]), name  # nothing coded, nothing changed
            continue
        # the exported model is exactly base + the decoded residual
        assert torch.allclose(got[name], base[name] + residual[name], atol=1e-6), name
    true = torch.cat([(ft[n] - base[n]).reshape(-1) for n in residual])
    coded = torch.cat([residual[n].reshape(-1) for n in residual])
    error = float((coded - true).norm() / true.norm())
    if "ere" in codec_args:  # full rank in fp16: only fp16 rounding of the factors is lost
        assert error < 1e-2
        assert expert.meta["ere"]["energy_kept"] == pytest.approx(1.0)
    else:
        assert error < 1.0 and (coded != 0).float().mean() == pytest.approx(0.3, abs=0.01)


def test_residual_of_an_unrelated_model_is_refused(tuned, tmp_path, tiny_t5):
    with pytest.raises(ValueError, match="different tensors|wrong --base"):
        residual_adapter(tuned, tiny_t5)


def test_residual_budget_is_respected(tuned):
    from lorahub_compeft import compress
    adapter = residual_adapter(tuned, BASE)
    expert = compress(adapter, codec="ere", budget_bits=0.5, quant_bits=8)
    coded = [t for t in adapter.tensors.values() if t.dim() == 2]
    stored = sum(v.numel() * v.element_size() for k, v in expert._payload.items()
                 if k.startswith("ere."))
    assert 0 < stored <= 0.5 * sum(t.numel() for t in coded) / 8
