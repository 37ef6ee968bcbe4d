"""docs/expert-header.schema.json against real headers: every shipped zoo expert (format 1), fresh
ComPEFT experts (golomb and bitmask, global and per tensor), ERE, IA3, carried tensors and full
fine-tuning residuals (format 2), each as store.format.read_header returns it; and headers the
reader refuses fail the schema too."""
import json
from pathlib import Path

import jsonschema  # the test extra's (setup.cfg)
import pytest
import torch

import support
from lorahub_compeft import ExpertFileError, compress
from lorahub_compeft.io.residuals import residual_adapter
from lorahub_compeft.store.format import read_header
from lorahub_compeft.zoo.artifacts import ARTIFACTS

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "expert-header.schema.json"
ZOO_EXPERTS = sorted((Path(ARTIFACTS) / "experts").glob("*.safetensors"))
DENSE = Path(ARTIFACTS) / "dense" / "pair_sum"


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _assert_valid(validator, header):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(header)]
    assert not errors, errors


def test_zoo_experts_format_1(validator):
    assert len(ZOO_EXPERTS) == 22
    for path in ZOO_EXPERTS:
        header = read_header(path)
        assert header["format_version"] == 1
        _assert_valid(validator, header)


@pytest.mark.parametrize("encoding", ["golomb", "bitmask"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per_tensor"])
def test_fresh_compeft_experts(validator, tmp_path, encoding, per_tensor):
    path = compress(DENSE, density=0.3, alpha="auto", per_tensor=per_tensor,
                    encoding=encoding).save(tmp_path / "e.safetensors")
    header = read_header(path)
    assert header["format_version"] == 2 and header["encoding"] == encoding
    _assert_valid(validator, header)


def test_ere_expert(validator, tmp_path):
    header = read_header(compress(DENSE, codec="ere", budget_bits=1).save(tmp_path / "e.safetensors"))
    assert header["codec"] == "ere"
    _assert_valid(validator, header)


def test_ia3_and_carried_tensors(validator, ia3_dir, lora_head_dir, tmp_path):
    ia3 = read_header(compress(ia3_dir, density=0.5).save(tmp_path / "ia3.safetensors"))
    assert {t["init"] for t in ia3["tensors"]} == {1.0}  # (IA)3 vectors start at 1
    head = read_header(compress(lora_head_dir, density=0.5).save(tmp_path / "head.safetensors"))
    assert head["carried"]
    for header in (ia3, head):
        _assert_valid(validator, header)


@pytest.fixture(scope="module")
def tuned(tiny_t5, tmp_path_factory):
    """The tiny T5 with every weight moved a little: a full fine-tuning residual to store."""
    from transformers import AutoModelForSeq2SeqLM
    torch.manual_seed(1)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("tuned")
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("options", [{"codec": "compeft", "density": 0.3},
                                     {"codec": "ere", "budget_bits": 4}], ids=["compeft", "ere"])
def test_full_fine_tuning_residual(validator, tiny_t5, tuned, tmp_path, options):
    adapter = residual_adapter(tuned, tiny_t5)
    header = read_header(compress(adapter, **options).save(tmp_path / "r.safetensors"))
    assert header["adapter_config"]["peft_type"] == "RESIDUAL"
    if options["codec"] == "ere":
        assert header["carried"]  # layer norms travel as is
    _assert_valid(validator, header)


REFUSED = {
    "negative density": lambda m: m.update(density=-0.1),
    "density above 1": lambda m: m.update(density=1.5),
    "no tensors field": lambda m: m.pop("tensors"),
    "no density field": lambda m: m.pop("density"),
    "empty tensors": lambda m: m.update(tensors=[]),
    "unknown encoding": lambda m: m.update(encoding="zip"),
    "unknown selection": lambda m: m.update(selection="random"),
    "integer dtype": lambda m: m["tensors"][0].update(dtype="int8"),
    "zero in a shape": lambda m: m["tensors"][0].update(shape=[0, 128]),
    "init not a number": lambda m: m["tensors"][0].update(init="0"),
    "zero payload bytes": lambda m: m["sizes"].update(payload_bytes=0),
    "empty peft_type": lambda m: m["adapter_config"].update(peft_type=""),
    "name not a string": lambda m: m.update(name=5),
    "source not an object": lambda m: m.update(source=7),
    "unknown codec": lambda m: m.update(codec="zip"),
}


@pytest.fixture(scope="module")
def v2_expert(tmp_path_factory):
    return compress(DENSE, density=0.3).save(tmp_path_factory.mktemp("v2") / "e.safetensors")


@pytest.mark.parametrize("mutate", list(REFUSED.values()), ids=list(REFUSED))
def test_a_header_the_reader_refuses_fails_the_schema(validator, v2_expert, tmp_path, mutate):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(v2_expert.read_bytes())
    header = read_header(path)
    _assert_valid(validator, header)  # the unedited copy passes both
    support.edit_v2_header(path, mutate)
    with pytest.raises(ExpertFileError):
        read_header(path)
    mutate(header)
    assert not validator.is_valid(header)


@pytest.mark.parametrize("mutate", [lambda i: i.update(bits=3), lambda i: i.update(scaling=0),
                                    lambda i: i.update(ranks=[-1] + i["ranks"][1:])],
                         ids=["bits", "scaling", "negative rank"])
def test_a_refused_ere_header_fails_the_schema(validator, tmp_path, mutate):
    path = compress(DENSE, codec="ere", budget_bits=1).save(tmp_path / "e.safetensors")
    header = read_header(path)
    support.edit_v2_header(path, lambda m: mutate(m["ere"]))
    with pytest.raises(ExpertFileError):
        read_header(path)
    mutate(header["ere"])
    assert not validator.is_valid(header)
