"""compose() picks torch's threads by the same load-aware rule as the command line
(io/threads.py) and gives the caller's setting back after, also when it fails; the rule counts
the cores other processes keep busy, not this one."""
import os

import pytest
import torch

import support
from lorahub_compeft.io import threads
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
    """4 cores, 2.6 of them kept busy by other processes: one core idle."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 2.6)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def samples(*values):
    """A reader that returns `values` one call after another."""
    it = iter(values)
    return lambda: next(it)


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_the_cores_busy_elsewhere_leave_out_this_processs_own_time(monkeypatch, four_cores):
    # over the sample the 4 cores ran 40 ticks, 30 of them busy, 20 of those this process's
    monkeypatch.setattr(threads, "cpu_ticks", samples((100, 1000), (130, 1040)))
    monkeypatch.setattr(threads, "own_ticks", samples(50.0, 70.0))
    assert threads.busy_elsewhere() == pytest.approx(1.0)
    monkeypatch.setattr(threads, "cpu_ticks", samples((100, 1000), (130, 1040)))
    monkeypatch.setattr(threads, "own_ticks", samples(50.0, 70.0))
    assert idle_cores() == 3
    # all the busy time this process's own (it just loaded a model): the machine is quiet
    monkeypatch.setattr(threads, "cpu_ticks", samples((100, 1000), (140, 1040)))
    monkeypatch.setattr(threads, "own_ticks", samples(50.0, 90.0))
    assert idle_cores() is None


def test_without_proc_stat_the_load_average_is_the_measure(monkeypatch, four_cores):
    monkeypatch.setattr(threads, "cpu_ticks", lambda: None)
    monkeypatch.delattr(os, "sysconf")  # as on Windows: nothing but the load average is read
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.busy_elsewhere() == 2.6 and idle_cores() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert idle_cores() is None


def test_cpu_ticks_sum_the_cores_this_process_may_use_with_steal_as_busy(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # the columns: user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  99 99 99 99 99 99 99 99 0 0\n"
                    "cpu0 10 1 2 100 3 1 1 4 7 0\n"
                    "cpu1 500 0 0 5 0 0 0 0 0 0\n"
                    "cpu2 20 0 5 50 5 0 0 0 0 0\n"
                    "\n"
                    "cpu3 1 1 1 1 1 1 1\n"  # an old kernel's: no steal column
                    "intr 1 2 3\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})
    assert threads.cpu_ticks(stat) == (10 + 1 + 2 + 1 + 1 + 4 + 20 + 5, 122 + 80)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert threads.cpu_ticks(stat) == (5, 7)
    assert threads.cpu_ticks(tmp_path / "missing") is None


def test_without_threads_a_busy_machine_gets_only_its_idle_cores(lora_dir, busy_four_cores):
    seen = []
    compose([str(lora_dir)], support.constant_task("red"), budget=2, loss_fn=threads_seen(seen),
            progress=False)
    assert seen and set(seen) == {1}  # as the command line would choose:
    assert idle_cores() == 1
    assert torch.get_num_threads() == 4  # the caller's setting, back


def test_without_threads_a_quiet_machine_keeps_the_callers_setting(lora_dir, monkeypatch,
                                                                    four_cores):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
    before = torch.get_num_threads()
    assert before == 4  # the fixture's: a machine of 4 cores whatever this one has
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


def test_the_runners_local_workers_share_the_cores_unless_omp_num_threads_is_set(monkeypatch,
                                                                                 four_cores):
    """run(..., workers=N) from Python gets the command line's rule: each spawned worker is
    given its share of the idle cores, unless OMP_NUM_THREADS (which it reads) says otherwise."""
    import multiprocessing

    from lorahub_compeft.eval import runner
    given = []

    class Pool:  # records what each worker would be initialized with
        def __init__(self, processes, initializer, initargs):
            given.append(initargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def imap_unordered(self, fn, cells):
            return iter(())

    context = type("Context", (), {"Pool": Pool})
    monkeypatch.setattr(multiprocessing, "get_context", lambda kind: context)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    list(runner._execute(["a cell"], 2, "local", None, None, 16, None))
    assert given[-1] == (16, 2)  # 4 quiet cores, 2 workers: 2 threads each
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 1.0)
    list(runner._execute(["a cell"], 2, "local", None, None, 16, None))
    assert given[-1] == (16, 1)  # 3 idle: 1 each
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    list(runner._execute(["a cell"], 2, "local", None, None, 16, None))
    assert given[-1] == (16, None)  # the workers read OMP_NUM_THREADS themselves
