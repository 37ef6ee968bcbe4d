"""The Ray backend against a real local Ray instance (started by the tests, no cluster)."""
import os
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from conftest import BBH, bbh_argv  # noqa: E402
from test_runner import cells_for, same_results  # noqa: E402
from lorahub_compeft.io.files import read_jsonl
from lorahub_compeft.eval.runner import run  # noqa: E402

pytestmark = pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")


def max_overlap(rows) -> int:
    """How many cells ran at the same moment, at most."""
    events = sorted([(r["started"], 1) for r in rows] + [(r["started"] + r["seconds"], -1) for r in rows])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def test_ray_gives_the_local_results_and_shuts_down(uninterrupted, tiny_t5, experts, tmp_path):
    assert not ray.is_initialized()
    out = tmp_path / "ray"
    run(cells_for(tiny_t5, experts, out), out, backend="ray", workers=2, progress=False)
    assert not ray.is_initialized()  # started here, so shut down here
    same_results(out, uninterrupted)
    rows = read_jsonl(out / "results.jsonl")
    workers = {r["worker"] for r in rows}
    assert len(workers) <= 2 < len(rows)  # actors kept between cells
    assert all(r["worker"].split(":")[1] != str(os.getpid()) for r in rows)


def test_ray_resumes_after_the_driver_is_killed_and_honours_the_cap(uninterrupted, tiny_t5,
                                                                    experts, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lorahub_compeft.cli",
            *bbh_argv(tiny_t5, experts, out, "--backend", "ray", "--workers", "1")]
    # its own session: the driver and the Ray processes it starts are one group to kill
    proc = subprocess.Popen(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while len(read_jsonl(out / "results.jsonl")) < 2 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the driver
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its Ray is left
        except ProcessLookupError:
            pass
    before = {r["key"] for r in read_jsonl(out / "results.jsonl")}
    assert 2 <= len(before) < 16, "the run finished before it could be killed"

    ray.init(address="local", num_cpus=4, include_dashboard=False)  # room for 4 cells at once; the cap is 1
    try:
        run(cells_for(tiny_t5, experts, out), out, backend="ray", workers=1, progress=False)
        assert ray.is_initialized()  # not started by run(), so not shut down by it
    finally:
        ray.shutdown()
    same_results(out, uninterrupted)
    resumed = [r for r in read_jsonl(out / "results.jsonl") if r["key"] not in before]
    assert len(resumed) == 16 - len(before)
    assert max_overlap(resumed) == 1 and len({r["worker"] for r in resumed}) == 1


def test_gpus_per_cell_more_than_the_cluster_has_is_refused(tiny_t5, experts, tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(ValueError, match="GPUs; lower it"):
        run(cells_for(tiny_t5, experts, tmp_path, tasks=["navigate"], methods=["zeroshot"]),
            tmp_path, backend="ray", gpus_per_cell=1000, progress=False)
    assert not ray.is_initialized()
