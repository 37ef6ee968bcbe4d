"""Session-wide tiny models and experts (built once, a few seconds on CPU)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # zoo_build, the zoo's build code
import support  # noqa: E402

# Tiny models run faster on one thread than on two fighting over a shared machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory):
    """dtype "auto"'s measurements are cached in the test session's folder, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("precision-cache")
        patch.setenv("LORAHUB_COMPEFT_CACHE", str(path))
        yield path

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


# --- a small BBH run (2 tasks x 2 seeds x 4 methods) for the runner and Ray tests -------------
BBH = SHARED_DATA / "bbh" / "tasks"
TASKS, SEEDS, METHOD_NAMES = ["boolean_expressions", "navigate"], [1, 2], ["zeroshot", "icl", "lorahub", "compeft"]


def bbh_argv(tiny_t5, experts, out, *extra):
    return ["bbh", "--model", str(tiny_t5), "--experts", *experts, "--tasks", ",".join(TASKS),
            "--seeds", "1-2", "-n", "2", "--density", "0.3", "--budget", "3", "--bbh-dir", str(BBH),
            "--max-eval", "4", "--out", str(out), *extra]


@pytest.fixture(scope="session")
def experts(tiny_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("bbh-experts")
    return [str(support.train_expert(tiny_t5, root / w, support.constant_task(w), steps=15))
            for w in ("red", "green", "blue")]


@pytest.fixture(scope="session")
def uninterrupted(tiny_t5, experts, tmp_path_factory):
    """The reference: one whole `bbh` run through the command line, never interrupted."""
    from lorahub_compeft.cli import main
    out = tmp_path_factory.mktemp("reference")
    assert main(bbh_argv(tiny_t5, experts, out)) == 0
    return out
