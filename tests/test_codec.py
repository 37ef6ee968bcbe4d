import pytest
import torch

from lorahub_compeft.codecs.compeft import CompressionError, calibrate, prune, sparsify


def _tv(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Two tensors of different scales, like LoRA's A (larger) and B (smaller).
    return {"a": (torch.randn(16, 40, generator=g) * 1.0).to(dtype),
            "b": (torch.randn(40, 16, generator=g) * 0.05).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_are_exactly_sign_times_alpha_sigma(dtype):
    tv = _tv(dtype=dtype)
    ternary = sparsify(tv, density=0.1, alpha=2.0)
    flat = torch.cat([t.reshape(-1).double() for t in tv.values()])
    sigma = flat.std().item()
    assert ternary.sigma == pytest.approx(sigma)
    expected_scale = torch.tensor(2.0 * sigma, dtype=dtype)
    out = ternary.to_tensors()
    for name, t in out.items():
        assert t.dtype == dtype and t.shape == tv[name].shape
        nz = t[t != 0]
        assert torch.equal(nz.abs(), expected_scale.expand_as(nz))
        # signs agree with the original entries that were kept
        assert torch.equal(torch.sign(nz), torch.sign(tv[name][t != 0]))
    kept = sum(int((t != 0).sum()) for t in out.values())
    assert kept == round(0.1 * flat.numel())


def test_global_selection_keeps_the_largest_magnitudes():
    tv = _tv()
    out = sparsify(tv, density=0.2).to_tensors()
    flat = torch.cat([t.reshape(-1) for t in tv.values()]).abs()
    kept = torch.cat([t.reshape(-1) for t in out.values()]) != 0
    assert flat[kept].min() >= flat[~kept].max()
    # B is 20x smaller: a global top-k leaves it almost empty.
    assert (out["b"] != 0).float().mean() < 0.02


def test_per_tensor_selection_has_one_scale_per_tensor():
    tv = _tv()
    ternary = sparsify(tv, density=0.2, alpha=1.0, per_tensor=True)
    out = ternary.to_tensors()
    for name, t in out.items():
        assert (t != 0).float().mean().item() == pytest.approx(0.2, abs=1 / t.numel())
        assert t[t != 0].abs().unique().item() == pytest.approx(tv[name].double().std().item(), rel=1e-6)


def test_stc_uses_mean_kept_magnitude_and_prune_keeps_values():
    tv = _tv()
    stc = sparsify(tv, density=0.1, magnitude="stc")
    flat = torch.cat([t.reshape(-1) for t in tv.values()])
    kept = flat[torch.from_numpy(stc.positions)].abs().double().mean().item()
    assert stc.scales.item() == pytest.approx(kept, rel=1e-6)
    pruned = prune(tv, density=0.1)
    for name in tv:
        mask = pruned[name] != 0
        assert torch.equal(pruned[name][mask], tv[name][mask])


@pytest.mark.parametrize("density,alpha,match", [
    (0.0, 1.0, "density"), (1.5, 1.0, "density"), (-0.1, 1.0, "density"),
    (0.1, 0.0, "alpha"), (0.1, -2.0, "alpha"), (0.1, float("nan"), "alpha")])
def test_bad_arguments(density, alpha, match):
    with pytest.raises(CompressionError, match=match):
        sparsify(_tv(), density, alpha)


def test_bad_tensors():
    with pytest.raises(CompressionError, match="no task-vector"):
        sparsify({}, 0.1)
    with pytest.raises(CompressionError, match="dtype"):
        sparsify({"x": torch.ones(4, dtype=torch.int64)}, 0.1)
    with pytest.raises(CompressionError, match="NaN or Inf"):
        sparsify({"x": torch.tensor([1.0, float("inf"), 0.5])}, 0.5)


def test_density_one_keeps_everything():
    tv = _tv()
    out = sparsify(tv, 1.0).to_tensors()
    assert all(bool((t != 0).all()) for t in out.values())


def test_calibrate_finds_the_pair_closest_to_the_original():
    tv = _tv()
    flat = torch.cat([t.reshape(-1) for t in tv.values()])

    def metric(tensors):  # negative reconstruction error: a real, checkable objective
        rec = torch.cat([tensors[n].reshape(-1) for n in tv])
        return -float((rec - flat).norm())

    result = calibrate(tv, metric, densities=(0.05, 0.3), alphas=(0.5, 1.0, 8.0))
    assert len(result.grid) == 6
    assert result.best_score == max(result.grid.values())
    assert (result.best_density, result.best_alpha) == max(result.grid, key=result.grid.get)
    assert result.best_alpha != 8.0  # a huge scale overshoots every kept value
    with pytest.raises(CompressionError):
        calibrate(tv, metric, densities=(0.0,), alphas=(1.0,))


def _product_error(original: dict, decoded: dict) -> float:
    from lorahub_compeft.codecs.compeft import lora_pairs
    total = 0.0
    for a, b in lora_pairs(list(original)):
        p = original[b].double() @ original[a].double()
        q = decoded[b].double() @ decoded[a].double()
        total += float(((p - q) ** 2).sum())
    return total


@pytest.mark.parametrize("per_tensor", [False, True])
def test_auto_alpha_fits_the_lora_products_better_and_is_stored(lora_dir, tmp_path, per_tensor):
    from lorahub_compeft.io.adapters import load_adapter
    from lorahub_compeft.codecs.compeft import lora_pairs
    from lorahub_compeft.store.expert import compress, load_expert
    tensors = load_adapter(lora_dir).tensors  # a really trained LoRA expert
    assert len(lora_pairs(list(tensors))) == 12
    auto = sparsify(tensors, 0.2, "auto", per_tensor)
    one = sparsify(tensors, 0.2, 1.0, per_tensor)
    assert auto.alpha != 1.0 and torch.equal(torch.from_numpy(auto.positions),
                                            torch.from_numpy(one.positions))
    assert _product_error(tensors, auto.to_tensors()) < _product_error(tensors, one.to_tensors())
    # the least-squares alpha: a little more or less does worse
    for factor in (0.95, 1.05):
        other = sparsify(tensors, 0.2, auto.alpha * factor, per_tensor)
        assert _product_error(tensors, auto.to_tensors()) < _product_error(tensors, other.to_tensors())
    expert = compress(lora_dir, density=0.2, alpha="auto", per_tensor=per_tensor)
    assert expert.alpha == auto.alpha  # a number in the header, like any alpha
    expert.save(tmp_path / "e.safetensors")
    loaded = load_expert(tmp_path / "e.safetensors")
    assert isinstance(loaded.alpha, float) and loaded.alpha == auto.alpha
    for name, value in loaded.task_vector().items():
        torch.testing.assert_close(value, auto.to_tensors()[name])


def test_auto_alpha_without_lora_pairs_fits_the_vector():
    tv = _tv()
    auto = sparsify(tv, 0.3, "auto")
    err = lambda t: sum(float(((tv[n] - t[n]) ** 2).sum()) for n in tv)
    assert err(auto.to_tensors()) < err(sparsify(tv, 0.3, 1.0).to_tensors())
    with pytest.raises(CompressionError, match="auto"):
        sparsify(tv, 0.3, "best")


def test_a_scale_that_overflows_its_dtype_is_refused():
    from lorahub_compeft.codecs.compeft import CompressionError
    tau = {"a.lora_A.weight": ((torch.rand(8, 8) * 2 - 1) * 3e4).half()}  # finite in fp16
    with pytest.raises(CompressionError, match="does not fit in float16"):
        sparsify(tau, 0.5, alpha=5.0)  # 5 * 1.7e4 > 65504


def test_sigma_zero_falls_back_to_the_kept_magnitude_with_a_warning(caplog):
    tau = {"one.lora_A.weight": torch.tensor([[0.25]]), "flat.lora_B.weight": torch.full((2, 2), -0.5)}
    ternary = sparsify(tau, 1.0, per_tensor=True)
    out = ternary.to_tensors()
    assert torch.equal(out["one.lora_A.weight"], tau["one.lora_A.weight"])
    assert torch.equal(out["flat.lora_B.weight"], tau["flat.lora_B.weight"])
    assert "sigma is 0" in caplog.text
    only = sparsify({"x.lora_A.weight": torch.tensor([0.75])}, 1.0)  # global, one element
    assert only.to_tensors()["x.lora_A.weight"].item() == 0.75


def test_default_compression_keeps_zoo_files_8x_smaller_than_fp16(tmp_path):
    """The bound the default density was chosen under (docs/defaults.md, Compression)."""
    from lorahub_compeft.store.expert import compress
    from lorahub_compeft.zoo.artifacts import ARTIFACTS
    dense = ARTIFACTS / "dense" / "pair_sum"
    path = compress(dense).save(tmp_path / "e.safetensors")  # the package's default options
    assert (dense / "adapter_model.safetensors").stat().st_size >= 8 * path.stat().st_size
