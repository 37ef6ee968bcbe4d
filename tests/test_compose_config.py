"""compose()'s settings live once, in config.ComposeConfig: checked when made, overridden by
keyword options, read by the runner's methods and the command line."""
import dataclasses

import pytest
import torch

from lorahub_compeft import config
from lorahub_compeft.config import (DEFAULT_N, PAPER_COMPEFT, PAPER_COMPOSE, CompeftOptions,
                                    ComposeConfig)
from lorahub_compeft.eval.methods import make_method
from lorahub_compeft.io.files import read_jsonl


@pytest.mark.parametrize("field, value", [
    ("select", "best"), ("objective", "mine"), ("n_experts", 0), ("n_experts", 2.0),
    ("restarts", 0), ("restarts", True), ("budget", -3), ("candidates_per_step", 0),
    ("batch_size", 0), ("max_length", "long"), ("seed", -1), ("seed", 2 ** 32), ("l1", -0.1),
    ("l1", float("nan")), ("bounds", 0), ("bounds", float("inf")), ("optimizer", ""),
    ("optimizer", 3), ("dtype", 16), ("weights", "equal"), ("budget", "fast"),
    ("budget", 2.5), ("patience", 0), ("threads", 0), ("threads", "2"),
])
def test_a_bad_field_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field) as err:
        ComposeConfig(**{field: value})
    assert "\n" not in str(err.value) and repr(value) in str(err.value)


def test_every_field_has_help_and_the_defaults_are_valid():
    for f in dataclasses.fields(ComposeConfig):
        assert ComposeConfig.help(f.name), f.name
    assert ComposeConfig(dtype=torch.bfloat16).dtype is torch.bfloat16
    assert ComposeConfig(dtype=None, n_experts=None, batch_size=None).dtype is None


def test_resolved_fills_the_defaults_that_depend_on_other_fields():
    assert ComposeConfig().resolved().n_experts == DEFAULT_N["loss"]
    assert ComposeConfig(select="random").resolved().n_experts == DEFAULT_N["random"]
    assert ComposeConfig(n_experts=7).resolved().n_experts == 7
    assert ComposeConfig().resolved().optimizer == "Shiwa"
    assert ComposeConfig(objective="lorahub").resolved().optimizer == "NGOpt"
    assert ComposeConfig(objective="lorahub", optimizer="CMA").resolved().optimizer == "CMA"


def test_paper_preset_is_lorahubs_protocol():
    paper = PAPER_COMPOSE
    assert (paper.select, paper.n_experts, paper.budget) == ("random", 20, 40)
    assert config.replace(PAPER_COMPOSE, budget=5) == dataclasses.replace(PAPER_COMPOSE, budget=5)
    with pytest.raises(TypeError, match="unknown option.*budgte"):
        config.replace(PAPER_COMPOSE, budgte=5)


def test_compose_refuses_an_unknown_option_before_any_work():
    from lorahub_compeft import compose
    with pytest.raises(TypeError, match="unknown option.*n_expert for ComposeConfig"):
        compose(["does-not-matter"], [{"input": "a", "target": "b"}], n_expert=3)


def test_the_runners_methods_take_their_defaults_from_config():
    lorahub, select = make_method("lorahub"), make_method("select")
    assert lorahub.params.compose_config() == PAPER_COMPOSE
    assert select.params.compose_config() == ComposeConfig(n_experts=DEFAULT_N["loss"])
    assert select.params.n_experts == DEFAULT_N["loss"]
    compeft, default = make_method("compeft").params, make_method("select-compeft").params
    assert (compeft.density, compeft.alpha, compeft.per_tensor) == \
        (PAPER_COMPEFT.density, PAPER_COMPEFT.alpha, PAPER_COMPEFT.per_tensor)
    assert (default.density, default.alpha, default.per_tensor) == \
        (CompeftOptions().density, CompeftOptions().alpha, CompeftOptions().per_tensor)
    # a method's own fields override the preset; fields that are not compose()'s are left out
    tuned = make_method("compeft", n_experts=4, budget=9, optimizer="CMA").params.compose_config()
    assert (tuned.select, tuned.n_experts, tuned.budget, tuned.optimizer) == ("random", 4, 9, "CMA")
    # the result keys keep their shape: the method's fields only
    assert set(compeft.to_json()) == {"n_experts", "budget", "objective", "optimizer", "dtype",
                                      "density", "alpha", "per_tensor"}
    assert set(select.params.to_json()) == {"n_experts", "budget", "objective", "optimizer",
                                            "dtype", "restarts", "start"}
    # a later field is keyed only away from the value older results ran: LoraHub's start
    assert "start" not in make_method("lorahub").params.to_json()


def test_strict_jsonl_names_the_bad_line_and_the_lenient_one_skips_torn_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n{"a": 3}')
    with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):
        read_jsonl(path, strict=True)
    assert read_jsonl(path) == [{"a": 1}]  # line 3 is torn, and so is the unfinished last line
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a JSON object"):
        read_jsonl(path, strict=True)
    path.write_text('{"a": 1}\n\n{"a": 3}')  # a user's file may end without a newline
    assert read_jsonl(path, strict=True) == [{"a": 1}, {"a": 3}]
    assert read_jsonl(tmp_path / "none.jsonl") == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "none.jsonl", strict=True)
