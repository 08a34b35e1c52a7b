"""Multi-process test harness: real ranks, the gloo backend, file rendezvous.

``run_distributed(fn, world_size)`` starts ``world_size`` fresh interpreters (the ``spawn``
start method, never ``fork``), initialises a gloo process group in each through a rendezvous
file in a new temporary directory (no ports to collide), calls ``fn(rank, world_size, *args)``
and returns each rank's result, in rank order.

What each child does, in order:

1. ``OMP_NUM_THREADS=1`` (set in its environment before it starts) and
   ``torch.set_num_threads(1)``: 2 ranks x 1 thread is the honest setting on a 2-core machine;
2. ``dist.init_process_group("gloo", init_method="file://<tmpdir>/rendezvous")`` (``backend="nccl"``:
   first ``torch.cuda.set_device(rank % torch.cuda.device_count())``, one GPU per rank);
3. ``result = fn(rank, world_size, *args)``;
4. ``torch.save(result)`` to ``result_<rank>.pt`` atomically (temporary name, then
   ``os.replace``), *before* any teardown;
5. a ``monitored_barrier`` with a short timeout (never an unbounded wait: the other rank may be
   gone; under NCCL, which has no ``monitored_barrier``, a plain barrier, bounded by the parent's
   ``teardown_grace``), then ``dist.destroy_process_group()``.

If ``fn`` raises, the child writes the traceback to ``error_<rank>.txt`` and exits non-zero
without touching the process group again.

The parent polls the children and the files, then :func:`classify` (a pure function, unit
tested without processes) decides:

* every rank exited 0 with a result: the results;
* every result was written but a rank then exited non-zero, died by a signal or hung in
  teardown: the gloo teardown abort seen in about one launch in twenty on this machine. The
  results are returned and a :class:`TeardownWarning` names the rank and its exit code; there is
  no blind retry;
* a rank wrote an error file: ``RuntimeError`` with the child's traceback (the first failure
  first);
* a rank died with neither result nor error, or the launch ran past ``timeout``:
  ``RuntimeError`` with the exit codes and what each rank had written.

``fn`` and ``args`` are pickled with plain :mod:`pickle` in the parent and unpickled in each
child. Tensors and modules therefore arrive as private copies: never the shared-memory storage
that ``torch.multiprocessing`` would hand out, through which every rank's optimizer step would hit
the same parameters. Still, build models inside ``fn``: that is what a real launcher does.

Batching: a launch costs seconds of imports and rendezvous, so a test module runs several cases
per launch with :func:`run_cases` (``fn`` = :func:`cases_worker`) from a module-scoped fixture,
and each test function asserts on its own case.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "run_distributed",
    "run_cases",
    "cases_worker",
    "error_of",
    "classify",
    "Outcome",
    "TeardownWarning",
    "DEFAULT_CHILD_ENV",
    "TEARDOWN_EXIT_CODE",
    "ERROR_EXIT_CODE",
]

#: Environment of every child (on top of the parent's), set before the interpreter starts.
DEFAULT_CHILD_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONFAULTHANDLER": "1",  # a hard crash prints the Python stack of every thread
}

#: Exit code of a child whose ``fn`` raised (it also wrote ``error_<rank>.txt``).
ERROR_EXIT_CODE = 17
#: Exit code of a child that wrote its result but whose teardown (barrier, destroy) failed.
TEARDOWN_EXIT_CODE = 18

_POLL_S = 0.05


class TeardownWarning(UserWarning):
    """Every rank wrote its result, but a rank failed in teardown (exit code or signal)."""


# ---------------------------------------------------------------------------------------------
# Classification: a pure function of what the parent observed.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What a launch came to.

    ``kind`` is one of:

    * ``"ok"``: every rank exited 0 and wrote its result;
    * ``"teardown"``: every rank wrote its result, some rank then failed (exit code, signal, or
      killed by the harness while hanging in teardown): results are usable, warn;
    * ``"error"``: at least one rank's ``fn`` raised (traceback in ``message``);
    * ``"died"``: a rank ended with neither result nor error file (crash, signal, ``os._exit``);
    * ``"timeout"``: the launch ran past its timeout with results missing.
    """

    kind: str
    message: str = ""
    ranks: tuple[int, ...] = ()

    @property
    def usable(self) -> bool:
        return self.kind in ("ok", "teardown")


def describe_exit(code: int | None) -> str:
    """``'exit code 1'``, ``'signal SIGABRT (-6)'`` or ``'still running'``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"signal {name} ({code})"
    if code == ERROR_EXIT_CODE:
        return f"exit code {code} (fn raised)"
    if code == TEARDOWN_EXIT_CODE:
        return f"exit code {code} (teardown failed after the result was written)"
    return f"exit code {code}"


def classify(
    world_size: int,
    exitcodes: Sequence[int | None],
    has_result: Sequence[bool],
    errors: Mapping[int, str] | None = None,
    killed: Mapping[int, str] | None = None,
    error_order: Sequence[int] | None = None,
) -> Outcome:
    """Decide what a launch came to, from what the parent saw (no processes, no files).

    Args:
        world_size: number of ranks.
        exitcodes: per rank, ``Process.exitcode`` at the end (negative: killed by that signal;
            ``None``: still running, which happens only if the harness could not reap it).
        has_result: per rank, whether ``result_<rank>.pt`` was written.
        errors: rank -> traceback text from ``error_<rank>.txt``.
        killed: rank -> why the harness killed it: ``"timeout"`` (the launch's deadline),
            ``"after_failure"`` (another rank had failed) or ``"teardown"`` (it hung after every
            result was written).
        error_order: the ranks of ``errors`` in the order they failed (first failure first);
            default: rank order.
    """
    errors = dict(errors or {})
    killed = dict(killed or {})
    if len(exitcodes) != world_size or len(has_result) != world_size:
        raise ValueError(
            f"classify() needs one exit code and one result flag per rank: world_size={world_size}, "
            f"got {len(exitcodes)} exit codes and {len(has_result)} result flags"
        )

    def status(rank: int) -> str:
        parts = [describe_exit(exitcodes[rank])]
        if rank in killed:
            parts.append(f"killed by the harness ({killed[rank]})")
        parts.append("result written" if has_result[rank] else "no result")
        if rank in errors:
            parts.append("error file written")
        return f"rank {rank}: " + ", ".join(parts)

    summary = "\n".join(status(r) for r in range(world_size))

    if errors:
        order = [r for r in (error_order or sorted(errors)) if r in errors]
        order += [r for r in sorted(errors) if r not in order]
        blocks = []
        for position, rank in enumerate(order):
            label = "first failure" if position == 0 else "then"
            blocks.append(f"--- rank {rank} ({label}) traceback ---\n{errors[rank].rstrip()}")
        message = (
            f"{len(order)} of {world_size} ranks raised (first: rank {order[0]}).\n{summary}\n"
            + "\n".join(blocks)
        )
        return Outcome("error", message, tuple(order))

    if all(has_result):
        bad = tuple(r for r in range(world_size) if exitcodes[r] != 0 or r in killed)
        if not bad:
            return Outcome("ok", "", ())
        details = "; ".join(
            f"rank {r}: {describe_exit(exitcodes[r])}"
            + (f", killed by the harness ({killed[r]})" if r in killed else "")
            for r in bad
        )
        message = (
            f"every rank wrote its result, then failed in teardown ({details}). This is the known "
            "gloo teardown abort (about one launch in twenty on a 2-core machine); the results "
            "were written before teardown and are used as they are."
        )
        return Outcome("teardown", message, bad)

    missing = tuple(r for r in range(world_size) if not has_result[r])
    if any(reason == "timeout" for reason in killed.values()):
        hung = tuple(r for r, reason in sorted(killed.items()) if reason == "timeout")
        message = (
            f"the launch timed out: ranks {list(hung)} were still running and were killed; "
            f"ranks {list(missing)} wrote no result.\n{summary}"
        )
        return Outcome("timeout", message, hung)

    # The ranks that ended on their own without a result are the cause; the ones the harness
    # killed afterwards are collateral.
    dead = tuple(r for r in missing if r not in killed) or missing
    message = (
        f"ranks {list(dead)} ended without a result and without an error file (a crash, a "
        f"signal or os._exit inside fn).\n{summary}"
    )
    return Outcome("died", message, dead)


# ---------------------------------------------------------------------------------------------
# Child side.
# ---------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _child_main(
    rank: int,
    world_size: int,
    tmpdir: str,
    payload: bytes,
    env: dict[str, str],
    pg_timeout_s: float,
    teardown_timeout_s: float,
    backend: str = "gloo",
) -> None:
    os.environ.update(env)  # already set by the parent at spawn time; repeated for clarity
    phase = "set-up"
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        phase = "unpickling fn and args"
        fn, args = pickle.loads(payload)
        phase = "init_process_group"
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            init_method=f"file://{os.path.join(tmpdir, 'rendezvous')}",
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        phase = f"fn {getattr(fn, '__qualname__', fn)!r}"
        result = fn(rank, world_size, *args)
        phase = "saving the result"
        path = os.path.join(tmpdir, f"result_{rank}.pt")
        tmp = f"{path}.tmp"
        torch.save(result, tmp)
        os.replace(tmp, path)
    except BaseException:
        text = f"failed at time {time.time():.6f} during {phase} (pid {os.getpid()})\n"
        text += traceback.format_exc()
        try:
            _atomic_write_bytes(os.path.join(tmpdir, f"error_{rank}.txt"), text.encode())
        finally:
            sys.stderr.write(f"[harness rank {rank}] {text}")
            sys.stderr.flush()
            os._exit(ERROR_EXIT_CODE)  # no teardown: the other ranks may be mid-collective

    # Teardown. The result is safe on disk; nothing here may wait without a bound.
    exit_code = 0
    try:
        if backend == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=teardown_timeout_s))
        else:
            dist.barrier()
    except Exception as err:
        sys.stderr.write(f"[harness rank {rank}] teardown barrier failed: {err!r}\n")
        exit_code = TEARDOWN_EXIT_CODE
    try:
        dist.destroy_process_group()
    except Exception as err:
        sys.stderr.write(f"[harness rank {rank}] destroy_process_group failed: {err!r}\n")
        exit_code = TEARDOWN_EXIT_CODE
    sys.stdout.flush()
    sys.stderr.flush()
    if exit_code:
        os._exit(exit_code)


# ---------------------------------------------------------------------------------------------
# Parent side.
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _patched_environ(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` on top, restored afterwards: a spawned child inherits it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pickle_payload(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    if getattr(fn, "__module__", None) == "__main__":
        raise TypeError(
            f"run_distributed: fn {fn!r} is defined in __main__; define it in an importable module "
            "(a test module is fine) so that the spawned ranks can import it"
        )
    try:
        return pickle.dumps((fn, tuple(args)), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:
        raise TypeError(
            f"run_distributed: fn and args must be picklable by plain pickle ({err}). Use a "
            "module-level function (no lambda, no closure) and pass data, not live objects; build "
            "models inside fn"
        ) from err


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError as err:
        return f"<could not read {path}: {err}>"


def _error_time(text: str) -> float:
    first = text.split("\n", 1)[0]
    try:
        return float(first.split("failed at time ", 1)[1].split(" ", 1)[0])
    except (IndexError, ValueError):
        return float("inf")


def _kill(process: Any) -> None:
    if process.is_alive():
        process.kill()  # SIGKILL, this process only
    process.join(5)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: tuple[Any, ...] = (),
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    failure_grace: float = 5.0,
    teardown_grace: float = 30.0,
    keep_files: bool | None = None,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    Args:
        fn: a module-level function (pickled by reference) returning something ``torch.save``
            can write: dicts of floats, lists, tensors.
        world_size (int): number of ranks (default 2).
        args (tuple): extra positional arguments, pickled with plain ``pickle`` (copies).
        timeout (float): seconds for the whole launch (start-up included); past it every rank
            still running is killed and ``RuntimeError`` is raised (default 300).
        env (mapping, optional): environment variables for the children, on top of
            :data:`DEFAULT_CHILD_ENV`.
        failure_grace (float): once a rank has failed, seconds the others get to fail or finish
            on their own before they are killed (they are usually blocked in a collective).
        teardown_grace (float): once every result is written, seconds the ranks get to exit
            before a hang in teardown is cut short (and reported as a :class:`TeardownWarning`).
        keep_files (bool, optional): keep the temporary directory (rendezvous, results, error
            files) when the launch fails, and name it in the error. Default: the environment
            variable ``ADASCALE_HARNESS_KEEP_FILES=1``; otherwise it is always removed (the
            tracebacks are in the error message anyway).
        backend (str): the process group's backend, ``"gloo"`` (default) or ``"nccl"`` (one GPU
            per rank: rank ``r`` uses ``cuda:r % device_count`` before the group is made).

    Returns:
        The results, in rank order.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message), died without a result,
            or the launch timed out.
    """
    import multiprocessing

    import torch

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    payload = _pickle_payload(fn, args)
    child_env = {**DEFAULT_CHILD_ENV, **(dict(env) if env else {})}
    ctx = multiprocessing.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="adascale-dist-")
    pg_timeout_s = max(float(timeout), 1.0)
    teardown_timeout_s = max(min(teardown_grace, pg_timeout_s) / 2, 1.0)
    result_paths = [os.path.join(tmpdir, f"result_{r}.pt") for r in range(world_size)]
    error_paths = [os.path.join(tmpdir, f"error_{r}.txt") for r in range(world_size)]
    processes = []
    killed: dict[int, str] = {}
    if keep_files is None:
        keep_files = os.environ.get("ADASCALE_HARNESS_KEEP_FILES", "") == "1"
    succeeded = False
    try:
        with _patched_environ(child_env):
            for rank in range(world_size):
                process = ctx.Process(
                    target=_child_main,
                    args=(rank, world_size, tmpdir, payload, child_env, pg_timeout_s, teardown_timeout_s, backend),
                    name=f"harness-rank{rank}",
                )
                process.start()
                processes.append(process)

        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        all_written_at: float | None = None
        while True:
            alive = [r for r, p in enumerate(processes) if p.is_alive()]
            if not alive:
                break
            now = time.monotonic()
            written = [os.path.exists(path) for path in result_paths]
            # A rank that ended without a result (re-checked after its exit: no race with the
            # write) has failed, whatever its exit code.
            failure = any(os.path.exists(path) for path in error_paths) or any(
                p.exitcode is not None and not os.path.exists(result_paths[r])
                for r, p in enumerate(processes)
            )
            if failure and failed_at is None:
                failed_at = now
            if all(written) and all_written_at is None:
                all_written_at = now
            if now >= deadline:
                reason = "timeout"
            elif failed_at is not None and now - failed_at >= failure_grace:
                reason = "after_failure"
            elif all_written_at is not None and now - all_written_at >= teardown_grace:
                reason = "teardown"
            else:
                time.sleep(_POLL_S)
                continue
            for rank in alive:
                killed[rank] = reason
                _kill(processes[rank])
            break
        for process in processes:
            process.join(5)

        exitcodes = [p.exitcode for p in processes]
        has_result = [os.path.exists(path) for path in result_paths]
        errors = {r: _read_text(path) for r, path in enumerate(error_paths) if os.path.exists(path)}
        error_order = sorted(errors, key=lambda r: (_error_time(errors[r]), r))
        outcome = classify(world_size, exitcodes, has_result, errors, killed, error_order)
        if not outcome.usable:
            raise RuntimeError(
                f"run_distributed({getattr(fn, '__qualname__', fn)}, world_size={world_size}) "
                f"failed [{outcome.kind}]: {outcome.message}"
                + (f"\n(files kept in {tmpdir})" if keep_files else "")
            )
        results = [torch.load(path, weights_only=False) for path in result_paths]
        if outcome.kind == "teardown":
            warnings.warn(
                f"run_distributed({getattr(fn, '__qualname__', fn)}): {outcome.message}",
                TeardownWarning,
                stacklevel=2,
            )
        succeeded = True
        return results
    finally:
        for process in processes:
            _kill(process)
        if succeeded or not keep_files:
            shutil.rmtree(tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Several cases per launch.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One case of a batched launch: ``fn(rank, world_size, *args)`` under ``name``."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = field(default_factory=tuple)


def cases_worker(rank: int, world_size: int, cases: Sequence[Case]) -> dict[str, Any]:
    """Run each case in order on this rank; return ``{name: result}``.

    A case that raises fails the whole launch (the other ranks would otherwise wait in a
    collective the failed rank never reaches); the traceback names the case.
    """
    results: dict[str, Any] = {}
    for case in cases:
        try:
            results[case.name] = case.fn(rank, world_size, *case.args)
        except BaseException as err:
            err.add_note(f"(in harness case {case.name!r} on rank {rank})")
            raise
    return results


def run_cases(
    cases: Sequence[Case | tuple[Any, ...]],
    world_size: int = 2,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """One launch for several cases: per rank, ``{case name: result}``.

    ``cases`` holds :class:`Case` objects or ``(name, fn, *args)`` tuples; ``kwargs`` go to
    :func:`run_distributed`.
    """
    normalised = []
    for case in cases:
        if not isinstance(case, Case):
            name, fn, *rest = case
            case = Case(name, fn, tuple(rest))
        normalised.append(case)
    names = [c.name for c in normalised]
    if len(set(names)) != len(names):
        raise ValueError(f"run_cases: case names must be unique, got {names}")
    return run_distributed(cases_worker, world_size, args=(normalised,), **kwargs)


def error_of(fn: Callable[[], Any]) -> str | None:
    """``"<Type>: <message>"`` of what ``fn()`` raises, or ``None``: for a case that records an
    error on every rank instead of failing the launch."""
    try:
        fn()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None
