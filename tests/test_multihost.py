"""Two processes, 4 CPU devices each, one global mesh: JAX's multi-controller runtime on
the loopback address, as a user runs it on many hosts (docs/multi_host.md).

``tests/_multihost_worker.py`` is the program each process runs; its docstring says what
it computes. This test starts both processes (coordinator on ``127.0.0.1`` and a free
port, a deadline, and every process it started ended on failure), then checks that
every clipper, guard and ``dp_aggregate``, and the ``shard_map`` cases with
``axis_name``, gave on the 8 devices of the two processes the updates, statistics and
parameters of a single-device run on the same numbers, and the same statistics on both
processes.
"""

import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _multihost_worker as worker
import jax
import numpy as np
import pytest
from _trees import assert_trees_close

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_multihost_worker.py"
DEADLINE = 300  # seconds for both processes, start to finish (30-60 s on 2 busy cores)
CASES = sorted(worker.CASES) + [f"shard_map/{name}" for name in sorted(worker.SHARD_MAP_CASES)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _end(proc: subprocess.Popen) -> None:
    """Kills a worker still running, by its own process group (its session, see below)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _run_two(command: list[str], out: Path) -> list[str]:
    """Runs ``command + [process id]`` as processes 0 and 1; their logs. Fails with both
    logs when a process fails or they do not finish in time; ends both either way."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        # LLVM optimisations off: compiling is most of this run's time.
        XLA_FLAGS="--xla_backend_optimization_level=0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    logs = [out / f"process_{i}.log" for i in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as log_file:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, command[0], str(i), *command[1:]],
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=out,
                        start_new_session=True,  # its own process group, killed as one
                    )
                )
        deadline = time.monotonic() + DEADLINE
        # Wait for both, but stop at the first failure: the other would wait for it
        # until the runtime's own timeouts.
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        timed_out = all(p.poll() in (None, 0) for p in procs) and time.monotonic() >= deadline
    finally:
        for proc in procs:
            _end(proc)
    codes = [p.returncode for p in procs]
    texts = [log.read_text() for log in logs]
    if codes != [0, 0]:
        text = "\n".join(f"--- process {i}:\n{t[-5000:]}" for i, t in enumerate(texts))
        reason = "did not finish in time" if timed_out else "failed"
        pytest.fail(f"the processes {reason} (exit statuses {codes}).\n{text}", pytrace=False)
    return texts


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> list[dict]:
    """Each worker process's results."""
    out = tmp_path_factory.mktemp("multihost")
    _run_two([str(WORKER), str(_free_port()), str(out)], out)
    return [pickle.loads((out / f"process_{i}.pkl").read_bytes()) for i in range(2)]


@pytest.fixture(scope="module")
def reference() -> dict:
    """Every case run on this process's single device, on the same numbers."""
    results = {}
    for name, (make, per_example) in worker.CASES.items():
        params = jax.device_put(worker.initial_params())
        steps = worker.gradient_steps(per_example)
        results[name] = worker.train(make(), params, steps, per_example=per_example)
    for name, (make, per_example) in worker.SHARD_MAP_CASES.items():
        params = jax.device_put(worker.initial_params(split=True))
        steps = worker.gradient_steps(per_example, split=True)
        results[f"shard_map/{name}"] = worker.train(make(), params, steps, per_example=per_example)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one_device(processes, reference, case):
    for i, results in enumerate(processes):
        assert case in results, f"process {i} did not run {case}"
        if "error" in results[case]:
            pytest.fail(f"process {i}: {results[case]['error']}", pytrace=False)
    first, second = (results[case] for results in processes)
    # The same statistics on every process, bit for bit (each process's own copy).
    for step, (a, b) in enumerate(zip(first["stats"], second["stats"])):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step} stats {key}")
    expected = reference[case]
    for step, (updates, stats) in enumerate(zip(first["updates"], first["stats"])):
        assert_trees_close(updates, expected["updates"][step], f"step {step} updates")
        assert_trees_close(stats, expected["stats"][step], f"step {step} stats")
    assert_trees_close(first["params"], expected["params"], "final parameters")


@pytest.mark.slow
def test_multi_host_page_program_runs_on_two_processes(tmp_path):
    """docs/multi_host.md's train.py, run as the page says (process id, port, directory)."""
    page = (ROOT / "docs" / "multi_host.md").read_text()
    program = re.search(r"```\{code-block\} python\n:caption: train.py\n\n(.*?)\n```", page, re.S)
    assert program, "docs/multi_host.md has no train.py block"
    (tmp_path / "train.py").write_text(program.group(1))
    logs = _run_two(["train.py", str(_free_port()), str(tmp_path / "checkpoints")], tmp_path)
    steps = re.findall(r"^step (\d): norm ([\d.]+), threshold (\S+)$", logs[0], re.M)
    assert [int(s[0]) for s in steps] == list(range(6)), logs[0]
    assert not re.search(r"^step ", logs[1], re.M), "only process 0 logs"
    norm, threshold = float(steps[4][1]), float(steps[4][2])
    assert norm > 5 * threshold, f"the spike is clipped: {steps[4]}"
    restored = [re.search(r"^process \d: restored, threshold (\S+)$", log, re.M) for log in logs]
    assert all(restored), logs
    assert restored[0].group(1) == restored[1].group(1) == steps[-1][2]
