"""Defaults in one place: the same verb from Python and from the command line writes the same
bytes, with no options (the package's defaults, config.CompeftOptions()) and with the paper's
preset; the evaluation pool compresses through the library; the shipped zoo is reproduced."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from lorahub_compeft import ExpertLibrary, compress, load_adapter, load_expert
from lorahub_compeft.cli import main
from lorahub_compeft.config import PAPER_COMPEFT, CompeftOptions, EreOptions
from lorahub_compeft.eval.pool import ExpertPool
from lorahub_compeft.zoo.artifacts import ARTIFACTS, Zoo

PRESETS = {"defaults": ([], None), "paper": (["--preset", "paper"], PAPER_COMPEFT)}


@pytest.mark.parametrize("preset", PRESETS)
def test_compress_writes_the_same_bytes_from_python_and_the_command_line(lora_dir, tmp_path, preset):
    flags, options = PRESETS[preset]
    out = tmp_path / "cli.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(out), *flags]) == 0
    python = (compress(lora_dir) if options is None else compress(lora_dir, options)).save(
        tmp_path / "python.safetensors")
    assert out.read_bytes() == python.read_bytes()
    meta = load_expert(out).meta
    wanted = options or CompeftOptions()
    assert (meta["density"], meta["encoding"]) == (wanted.density, wanted.encoding)
    assert meta["selection"] == ("per_tensor" if wanted.per_tensor else "global")


@pytest.mark.parametrize("preset", PRESETS)
def test_library_add_stores_the_same_bytes_and_entry_from_python_and_the_command_line(
        lora_dir, tmp_path, preset):
    flags, options = PRESETS[preset]
    assert main(["library", "add", str(tmp_path / "cli"), str(lora_dir), *flags]) == 0
    python = ExpertLibrary(tmp_path / "python")
    entry = python.add(lora_dir) if options is None else python.add(lora_dir, options)
    cli = ExpertLibrary(tmp_path / "cli")
    assert cli.names() == python.names() == [lora_dir.name]
    assert cli.entry(lora_dir.name) == entry
    assert (cli.root / entry["file"]).read_bytes() == (python.root / entry["file"]).read_bytes()
    index = lambda root: json.loads((root / "index.json").read_text())
    assert index(cli.root) == index(python.root)


def test_the_paper_preset_is_one_argument_away_and_overrides_still_work(lora_dir):
    paper = compress(lora_dir, PAPER_COMPEFT).meta
    assert (paper["density"], paper["alpha"], paper["selection"]) == (0.1, 1.0, "global")
    changed = compress(lora_dir, PAPER_COMPEFT, density=0.2).meta
    assert (changed["density"], changed["alpha"], changed["selection"]) == (0.2, 1.0, "global")
    assert compress(lora_dir, EreOptions(budget_bits=2)).meta["ere"]["budget_bits"] == 2
    with pytest.raises(TypeError, match="unknown option.*denisty.*it takes alpha, density"):
        compress(lora_dir, denisty=0.2)
    with pytest.raises(TypeError, match="codec 'ere' takes EreOptions, got CompeftOptions"):
        compress(lora_dir, PAPER_COMPEFT, codec="ere")
    with pytest.raises(TypeError, match="options must be a codec's Options.*density=0.1"):
        compress(lora_dir, 0.1)


def test_the_command_line_refuses_an_option_of_another_codec(lora_dir, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(out), "--codec", "ere", "--density", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --density is an option of --codec compeft, not of --codec ere (it "
                   "takes --budget-bits, --quant-bits)"]
    assert main(["library", "add", str(tmp_path / "lib"), str(lora_dir), "--codec", "ere",
                 "--preset", "paper"]) == 2
    assert "--preset paper is not a setting of --codec ere" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "lib").exists()


def test_the_pool_compresses_once_per_setting_and_again_for_a_changed_expert(lora_dir, tmp_path):
    local = tmp_path / "expert"
    shutil.copytree(lora_dir, local)
    pool = ExpertPool.from_sources([str(local)], tmp_path / "cache")
    first = pool.compressed(str(local), CompeftOptions())
    mtime = first.stat().st_mtime_ns
    assert pool.compressed(str(local), CompeftOptions()) == first and first.stat().st_mtime_ns == mtime
    # the copy is what the library stores for the same source and options
    library = ExpertLibrary(tmp_path / "lib")
    entry = library.add(local, name=load_expert(first).name)
    assert (library.root / entry["file"]).read_bytes() == first.read_bytes()
    paper = pool.compressed(str(local), PAPER_COMPEFT)
    assert paper.parent != first.parent and load_expert(paper).density == 0.1
    # new weights in the same folder: a new identity, compressed again
    weights = local / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 2 for k, v in tensors.items()}, weights)
    changed = ExpertPool.from_sources([str(local)], tmp_path / "cache")
    again = changed.compressed(str(local), CompeftOptions())
    assert again != first and again.parent == first.parent and first.exists()
    assert load_expert(again).state_dict().keys() == load_expert(first).state_dict().keys()


def test_the_zoo_pool_uses_the_shipped_files_at_their_setting(tmp_path):
    manifest = json.loads((ARTIFACTS / "manifest.json").read_text())
    pool = Zoo(ARTIFACTS, manifest, base=None).pool()
    shipped = CompeftOptions(density=manifest["density"], alpha=manifest["alpha"],
                             per_tensor=manifest["selection"] == "per_tensor")
    assert pool.shipped == shipped
    assert pool.compressed("pair_sum", shipped) == ARTIFACTS / "experts" / "pair_sum.safetensors"
    pool.cache = str(tmp_path / "cache")
    other = pool.compressed("pair_sum", PAPER_COMPEFT)
    assert other.is_relative_to(tmp_path) and load_expert(other).density == PAPER_COMPEFT.density


@pytest.mark.parametrize("name", ["pair_sum", "bool_value"])
def test_a_zoo_expert_compressed_at_the_shipped_setting_is_the_shipped_file(name, tmp_path):
    """The format and the codec are unchanged: the shipped (version 1) files hold the same
    payload and header fields as compressing their dense experts now."""
    manifest = json.loads((ARTIFACTS / "manifest.json").read_text())
    adapter = load_adapter(ARTIFACTS / "dense" / name)
    adapter.source = {"path": f"dense/{name}"}  # as the zoo's build records it
    options = CompeftOptions(density=manifest["density"], alpha=manifest["alpha"],
                             per_tensor=manifest["selection"] == "per_tensor")
    path = compress(adapter, options, name=name).save(tmp_path / "e.safetensors")
    shipped_path = ARTIFACTS / "experts" / f"{name}.safetensors"
    new, shipped = load_expert(path).meta, load_expert(shipped_path).meta
    differ = {k for k in new.keys() | shipped.keys() if new.get(k) != shipped.get(k)}
    # version 2 digests dtypes and shapes too; sigma, a float64 sum, may differ in its last
    # bits with the number of threads that summed it (the scales, rounded to fp16, do not)
    assert differ <= {"format_version", "payload_sha256", "sigma"}
    assert new["sigma"] == pytest.approx(shipped["sigma"], rel=1e-12)
    a, b = load_file(path), load_file(shipped_path)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
    again = load_expert(load_expert(shipped_path).save(tmp_path / "again.safetensors")).meta
    assert again["format_version"] == 2 and again["payload_sha256"] == new["payload_sha256"]
