"""A rank killed with SIGKILL mid-training: torchrun restarts the group, the run resumes from the
last complete checkpoint and ends exactly where the uninterrupted run ends.

Three launches of ``killable_train.py`` (DDP, 2 gloo ranks x 2 accumulation steps, AdaScale
around SGD with momentum, a warm-up + cosine schedule read at ``floor(tau)``, training until
``tau >= 30``: 10 updates; rank 0 checkpoints every 3 updates with write-to-temp, fsync,
``os.replace``), each under ``torchrun --max-restarts=1`` on a fresh rendezvous port:

* ``clean``: no fault;
* ``killed_rank``: rank 1 SIGKILLs itself after the first backward pass of update 8 (7 complete,
  in the middle of an accumulation window, with rank 0 blocked in DDP's all-reduce), on the
  first attempt only. torchrun stops rank 0 and restarts both; they resume from the checkpoint
  of update 6 and redo updates 7 to 10;
* ``killed_in_save``: rank 0 SIGKILLs itself while saving the checkpoint of update 6, after
  writing half of the bytes to the temporary file and before the rename. The restart finds the
  half-written temporary file (not loadable; removed), loads the checkpoint of update 3, which
  the cut save never touched, and redoes updates 4 to 10.

Both faulted runs must end with the clean run's parameters, ``tau``, gain and tau sequences and
AdaScale state **bitwise** (DDP on gloo/CPU is deterministic and the checkpoint holds every bit
the next update depends on: weights, momentum, AdaScale's estimator, the schedule, the data
generator). A fourth check, in one process, shows the atomic save directly: a process killed
between writing the temporary file and the rename leaves the previous checkpoint intact.

torchrun is launched with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``. With torch 2.13's default
(the workers share the agent's rendezvous store across restarts) the restarted group sometimes
fails to form: a restarted rank can read its peer's gloo address from the previous attempt and
hang or fail with ``Gloo connectFullMesh failed ... Connection refused`` (pytorch/pytorch#135712).
With the variable set, every attempt gets a store of its own.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("killable_train.py")
REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 120
KILL_RANK_FLAGS = ("--kill-rank", "1", "--kill-update", "7", "--kill-micro", "0")
KILL_IN_SAVE_FLAGS = ("--kill-in-save", "6")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def launch(run_dir: Path, *flags: str) -> dict:
    """One ``torchrun --max-restarts=1`` launch; its result, events and wall time."""
    run_dir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4().hex[:12]}",
        str(SCRIPT), "--dir", str(run_dir), *flags,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(
            f"torchrun timed out after {LAUNCH_TIMEOUT_S} s: {' '.join(command)}\n"
            f"--- stdout ---\n{err.stdout}\n--- stderr ---\n{err.stderr}\n--- events ---\n{read_events(run_dir)}"
        )
    seconds = time.perf_counter() - started
    result_path = run_dir / "result.pt"
    if proc.returncode != 0 or not result_path.exists():
        pytest.fail(
            f"torchrun exited {proc.returncode}: {' '.join(command)}\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr}\n--- events ---\n{read_events(run_dir)}"
        )
    return {
        "result": torch.load(result_path, weights_only=True),
        "events": read_events(run_dir),
        "stderr": proc.stderr,
        "seconds": seconds,
        "dir": run_dir,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("killed_rank")
    out = {
        "clean": launch(base / "clean"),
        "killed_rank": launch(base / "killed_rank", *KILL_RANK_FLAGS),
        "killed_in_save": launch(base / "killed_in_save", *KILL_IN_SAVE_FLAGS),
    }
    print("\nkilled-rank launches (torchrun, 2 ranks, wall time): " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in out.items()))
    return out


def events(run: dict, event: str, attempt: int | None = None) -> list[dict]:
    return [e for e in run["events"] if e["event"] == event and (attempt is None or e["attempt"] == attempt)]


def assert_same_result(run: dict, reference: dict) -> None:
    got, want = run["result"], reference["result"]
    assert got["updates"] == want["updates"]
    assert got["tau"] == want["tau"]
    assert got["gains"] == want["gains"]  # every update's gain, bitwise
    assert got["taus"] == want["taus"]
    assert got["adascale"] == want["adascale"]  # averages, counters, gain, tau
    for p, q in zip(got["params"], want["params"], strict=True):
        assert torch.equal(p, q)


def worker_failure_reported(stderr: str) -> bool:
    """torchrun reports the first worker failure it notices: the killed rank (SIGKILL, -9) or its
    peer, which gloo aborts (SIGABRT, -6) when the connection drops; which one comes first is a
    race (seen both ways here)."""
    return re.search(r"failed \(exitcode: -(9|6)\)", stderr) is not None


def test_clean_run_checkpoints_and_ends_at_the_budget(runs):
    run = runs["clean"]
    result = run["result"]
    assert result["attempt"] == 0 and not events(run, "resumed")
    assert result["tau"] >= 30 and result["updates"] == 10
    assert [e["update"] for e in events(run, "saved")] == [3, 6, 9]
    assert 1 < min(result["gains"][3:]) and max(result["gains"]) <= 4  # S = N = 4
    assert result["adascale"]["nonfinite_updates"] == 0


def test_killed_rank_is_restarted_from_the_last_checkpoint_and_ends_bitwise_equal(runs):
    run = runs["killed_rank"]
    assert (run["dir"] / "killed_rank").exists()
    assert "mid-window at update 7, after micro-batch 0; SIGKILL" in run["stderr"]
    assert worker_failure_reported(run["stderr"])
    assert run["result"]["attempt"] == 1  # the group was restarted once
    first = [e["update"] for e in events(run, "update", attempt=0)]
    assert first == list(range(1, 8))  # attempt 0 died during update 8
    assert [e["update"] for e in events(run, "saved", attempt=0)] == [3, 6]
    assert [(e["update"], e["tau"]) for e in events(run, "resumed", attempt=1)] == [
        (6, runs["clean"]["result"]["taus"][5])
    ]
    # Update 7 ran twice (before the kill, and again after the resume): identical both times.
    again = {e["update"]: e for e in events(run, "update", attempt=1)}
    assert events(run, "update", attempt=0)[-1]["gain"] == again[7]["gain"]
    assert_same_result(run, runs["clean"])


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(runs):
    run = runs["killed_in_save"]
    assert (run["dir"] / "killed_in_save").exists()
    assert "killed while saving" in run["stderr"] and worker_failure_reported(run["stderr"])
    assert run["result"]["attempt"] == 1
    assert [e["update"] for e in events(run, "saved", attempt=0)] == [3]  # the save of 6 never completed
    (stale,) = events(run, "stale_tmp", attempt=1)
    assert stale["path"].startswith("checkpoint.pt.tmp.") and not stale["loadable"]
    complete = (runs["clean"]["dir"] / "checkpoint.pt").stat().st_size
    assert 0 < stale["bytes"] < complete  # really half-written
    assert [e["update"] for e in events(run, "resumed", attempt=1)] == [3]
    assert not list(run["dir"].glob("checkpoint.pt.tmp.*"))  # cleaned up
    assert_same_result(run, runs["clean"])


def test_atomic_save_killed_before_the_rename_keeps_the_previous_file(tmp_path):
    """One process, no torchrun: save A, then die half-way through saving B."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from tests.distributed.killable_train import atomic_save
atomic_save({{"update": 3, "w": list(range(1000))}}, {str(tmp_path / "ckpt.pt")!r})
atomic_save({{"update": 6, "w": list(range(1000))}}, {str(tmp_path / "ckpt.pt")!r}, die_halfway=True)
print("not reached")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr  # SIGKILL
    assert "not reached" not in proc.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["update"] == 3
    (tmp,) = tmp_path.glob("ckpt.pt.tmp.*")
    assert 0 < tmp.stat().st_size < (tmp_path / "ckpt.pt").stat().st_size + 100
    with pytest.raises(Exception):  # noqa: B017 - a truncated zip fails in torch's own way
        torch.load(tmp, weights_only=True)
