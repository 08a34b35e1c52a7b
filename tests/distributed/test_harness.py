"""Tests of the multi-process harness (tests/harness.py).

The classification tests are pure and quick (no marker); the launch tests start real gloo
ranks and carry the ``distributed`` marker.
"""

from __future__ import annotations

import multiprocessing.util
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import (
    ERROR_EXIT_CODE,
    TEARDOWN_EXIT_CODE,
    Case,
    TeardownWarning,
    classify,
    describe_exit,
    run_cases,
    run_distributed,
)

TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 3, in fn\nValueError: boom\n'


# ---------------------------------------------------------------------------------------------
# classify(): pure, no processes.
# ---------------------------------------------------------------------------------------------
def test_classify_all_exit_zero_with_results_is_ok():
    outcome = classify(2, [0, 0], [True, True])
    assert outcome.kind == "ok" and outcome.usable and outcome.ranks == ()


def test_classify_abort_after_all_results_is_teardown():
    outcome = classify(2, [0, -6], [True, True])
    assert outcome.kind == "teardown" and outcome.usable
    assert outcome.ranks == (1,)
    assert "rank 1" in outcome.message and "SIGABRT" in outcome.message and "(-6)" in outcome.message


def test_classify_nonzero_exit_after_all_results_is_teardown():
    outcome = classify(3, [TEARDOWN_EXIT_CODE, 0, 1], [True, True, True])
    assert outcome.kind == "teardown"
    assert outcome.ranks == (0, 2)
    assert f"exit code {TEARDOWN_EXIT_CODE}" in outcome.message and "exit code 1" in outcome.message


def test_classify_hang_in_teardown_killed_by_harness_is_teardown():
    outcome = classify(2, [0, -9], [True, True], killed={1: "teardown"})
    assert outcome.kind == "teardown" and outcome.ranks == (1,)
    assert "killed by the harness (teardown)" in outcome.message


def test_classify_error_file_raises_with_traceback():
    outcome = classify(2, [-9, ERROR_EXIT_CODE], [False, False], errors={1: TRACEBACK}, killed={0: "after_failure"})
    assert outcome.kind == "error" and not outcome.usable
    assert outcome.ranks == (1,)
    assert "ValueError: boom" in outcome.message
    assert "first: rank 1" in outcome.message


def test_classify_error_wins_over_written_results_and_timeout():
    # Rank 0 wrote its result, rank 1 raised, rank 2 was still running at the deadline.
    outcome = classify(
        3, [0, ERROR_EXIT_CODE, -9], [True, False, False], errors={1: TRACEBACK}, killed={2: "timeout"}
    )
    assert outcome.kind == "error" and outcome.ranks == (1,)


def test_classify_orders_errors_first_failure_first():
    errors = {0: "Traceback ...\nRuntimeError: connection closed by peer\n", 1: TRACEBACK}
    outcome = classify(2, [ERROR_EXIT_CODE, ERROR_EXIT_CODE], [False, False], errors=errors, error_order=[1, 0])
    assert outcome.ranks == (1, 0)
    assert outcome.message.index("ValueError: boom") < outcome.message.index("connection closed")
    assert "rank 1 (first failure)" in outcome.message


def test_classify_death_without_result_or_error_is_died():
    outcome = classify(2, [-9, -11], [False, False], killed={0: "after_failure"})
    assert outcome.kind == "died" and not outcome.usable
    assert outcome.ranks == (1,)
    assert "SIGSEGV (-11)" in outcome.message and "killed by the harness (after_failure)" in outcome.message


def test_classify_clean_exit_without_result_is_died():
    outcome = classify(2, [0, 0], [True, False])
    assert outcome.kind == "died" and outcome.ranks == (1,)


def test_classify_timeout_with_missing_results():
    outcome = classify(2, [-9, 0], [False, True], killed={0: "timeout"})
    assert outcome.kind == "timeout" and not outcome.usable
    assert outcome.ranks == (0,)
    assert "timed out" in outcome.message


def test_classify_checks_lengths():
    with pytest.raises(ValueError, match="one exit code"):
        classify(2, [0], [True, True])


def test_describe_exit():
    assert describe_exit(None) == "still running"
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(-6) == "signal SIGABRT (-6)"
    assert "fn raised" in describe_exit(ERROR_EXIT_CODE)


def test_unpicklable_fn_is_refused_before_launch():
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(lambda rank, world_size: rank, 2, timeout=5)


def test_duplicate_case_names_are_refused_before_launch():
    with pytest.raises(ValueError, match="unique"):
        run_cases([("a", allreduce_case), ("a", allreduce_case)])


# ---------------------------------------------------------------------------------------------
# Real launches. Worker functions are module-level: the spawned ranks import this module.
# ---------------------------------------------------------------------------------------------
def allreduce_case(rank, world_size):
    t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
    dist.all_reduce(t)
    return {
        "rank": rank,
        "world_size": world_size,
        "reduced": t.tolist(),
        "backend": dist.get_backend(),
        "threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "extra_env": os.environ.get("ADASCALE_HARNESS_TEST"),
        "pid": os.getpid(),
    }


def private_args_case(rank, world_size, shared_looking):
    # If the ranks shared the tensor's storage (torch.multiprocessing reductions), both would
    # see both increments after the barrier.
    shared_looking.add_(rank + 1)
    dist.barrier()
    return {"value": shared_looking.clone()}


def private_module_case(rank, world_size, module):
    with torch.no_grad():
        module.weight.add_(rank + 1)
    dist.barrier()
    return module.weight.detach().clone()


@pytest.fixture(scope="module")
def batched_launch():
    start = time.perf_counter()
    shared = torch.zeros(3)
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.zero_()
    results = run_cases(
        [
            Case("allreduce", allreduce_case),
            Case("private_args", private_args_case, (shared,)),
            ("private_module", private_module_case, module),
        ],
        world_size=2,
        timeout=120,
        env={"ADASCALE_HARNESS_TEST": "yes"},
    )
    return {"results": results, "seconds": time.perf_counter() - start, "shared": shared, "module": module}


@pytest.mark.distributed
def test_allreduce_on_two_ranks(batched_launch):
    results = batched_launch["results"]
    assert [r["allreduce"]["rank"] for r in results] == [0, 1]  # rank order
    for r in results:
        out = r["allreduce"]
        assert out["world_size"] == 2
        assert out["reduced"] == [3.0, 30.0]
        assert out["backend"] == "gloo"
    assert results[0]["allreduce"]["pid"] != results[1]["allreduce"]["pid"]
    print(f"\nbatched 2-rank launch: {batched_launch['seconds']:.1f} s")


@pytest.mark.distributed
def test_children_run_single_threaded_with_extra_env(batched_launch):
    for r in batched_launch["results"]:
        assert r["allreduce"]["threads"] == 1
        assert r["allreduce"]["omp"] == "1"
        assert r["allreduce"]["extra_env"] == "yes"
    assert os.environ.get("ADASCALE_HARNESS_TEST") is None  # the parent's environment is restored


@pytest.mark.distributed
def test_tensor_and_module_args_arrive_as_private_copies(batched_launch):
    results = batched_launch["results"]
    assert results[0]["private_args"]["value"].tolist() == [1.0, 1.0, 1.0]
    assert results[1]["private_args"]["value"].tolist() == [2.0, 2.0, 2.0]
    assert results[0]["private_module"].tolist() == [[1.0, 1.0]]
    assert results[1]["private_module"].tolist() == [[2.0, 2.0]]
    assert batched_launch["shared"].tolist() == [0.0, 0.0, 0.0]  # the parent's copy untouched
    assert batched_launch["module"].weight.tolist() == [[0.0, 0.0]]


def raising_fn(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    t = torch.ones(1)
    dist.all_reduce(t)  # never matched: rank 1 is gone
    return t.item()


@pytest.mark.distributed
def test_error_in_a_rank_is_raised_with_its_traceback():
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        run_distributed(raising_fn, 2, timeout=120)
    message = str(info.value)
    assert "[error]" in message
    assert "first: rank 1" in message
    assert "ValueError: boom from rank 1" in message
    assert "in raising_fn" in message  # the child's traceback, not just the exception text
    # The other rank is not left waiting for the whole timeout.
    assert time.perf_counter() - start < 60


def abort_at_exit_fn(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    if rank == 1:
        # Runs when the child process exits, after the harness wrote the result and tore down
        # the process group: the same situation as gloo's occasional teardown abort.
        multiprocessing.util.Finalize(None, os.abort, exitpriority=100)
    return t.item()


@pytest.mark.distributed
def test_abort_after_results_are_written_warns_and_returns_results():
    with pytest.warns(TeardownWarning, match=r"rank 1: signal SIGABRT \(-6\)"):
        results = run_distributed(abort_at_exit_fn, 2, timeout=120)
    assert results == [1.0, 1.0]


def hang_fn(rank, world_size):
    if rank == 0:
        time.sleep(600)
    return rank


@pytest.mark.distributed
def test_timeout_kills_the_ranks_and_raises():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"\[timeout\]"):
        run_distributed(hang_fn, 2, timeout=5)
    assert time.perf_counter() - start < 30
