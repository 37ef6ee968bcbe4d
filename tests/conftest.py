"""Session-wide tiny models and experts (built once, a few seconds on CPU)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import support  # noqa: E402

# Tiny models run faster on one thread than on two fighting over a shared machine.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    return support.build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def lora_dir(tiny_t5, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "expert-red"
    return support.train_expert(tiny_t5, out, support.constant_task("red"), steps=30)


@pytest.fixture(scope="session")
def lora_head_dir(tiny_t5, tmp_path_factory):
    """A LoRA expert that also saves a full lm_head under modules_to_save."""
    out = tmp_path_factory.mktemp("lora-head") / "expert-green-head"
    return support.train_expert(tiny_t5, out, support.constant_task("green"), steps=10,
                                modules_to_save=["lm_head"])


@pytest.fixture(scope="session")
def ia3_dir(tiny_t5, tmp_path_factory):
    out = tmp_path_factory.mktemp("ia3") / "expert-blue-ia3"
    return support.train_expert(tiny_t5, out, support.constant_task("blue"), kind="ia3", steps=30)
