"""compose() picks torch's threads by the same load-aware rule as the command line
(io/threads.py) and gives the caller's setting back after, also when it fails."""
import os

import pytest
import torch

import support
from lorahub_compeft.io.threads import idle_cores
from lorahub_compeft.compose.composer import compose


def threads_seen(seen: list):
    """A loss_fn that records torch's threads at each forward and scores like the default."""
    def loss(model, batch):
        seen.append(torch.get_num_threads())
        return float(model(**batch).loss)
    return loss


@pytest.fixture
def busy_four_cores(monkeypatch):
    """4 cores, a 1-minute load of 2.6: one core idle."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_without_threads_a_busy_machine_gets_only_its_idle_cores(lora_dir, busy_four_cores):
    seen = []
    compose([str(lora_dir)], support.constant_task("red"), budget=2, loss_fn=threads_seen(seen),
            progress=False)
    assert seen and set(seen) == {1}  # as the command line would choose:
    assert idle_cores() == 1
    assert torch.get_num_threads() == 4  # the caller's setting, back


def test_without_threads_a_quiet_machine_keeps_the_callers_setting(lora_dir, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    before = torch.get_num_threads()
    seen = []
    compose([str(lora_dir)], support.constant_task("red"), budget=2, loss_fn=threads_seen(seen),
            progress=False)
    assert set(seen) == {before} and torch.get_num_threads() == before


def test_threads_given_are_used_while_composing_and_restored_after(lora_dir, busy_four_cores):
    torch.set_num_threads(1)
    seen = []
    result = compose([str(lora_dir)], support.constant_task("red"), budget=2, threads=2,
                     loss_fn=threads_seen(seen), progress=False)
    assert set(seen) == {2}  # the number given wins over the load
    assert torch.get_num_threads() == 1
    assert result.generate(["say the word : alpha ?"], max_new_tokens=2)  # still usable after


def test_the_callers_threads_are_restored_when_composing_fails(lora_dir):
    before = torch.get_num_threads()

    def broken(model, batch):
        assert torch.get_num_threads() == 2
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        compose([str(lora_dir)], support.constant_task("red"), budget=2, threads=2,
                loss_fn=broken, progress=False)
    assert torch.get_num_threads() == before


def test_a_bad_threads_value_is_refused_before_any_work():
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        compose(["does-not-matter"], [{"input": "a", "target": "b"}], threads=0)
