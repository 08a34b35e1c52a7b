"""Run a training script that does not import adascale_shard, with AdaScale from its DeepSpeed JSON.

::

    python -m adascale_shard.run SCRIPT [ARGS...]
    python -m adascale_shard.run -m MODULE [ARGS...]
    torchrun --nproc_per_node=2 -m adascale_shard.run SCRIPT [ARGS...]
    deepspeed --num_gpus 2 --module adascale_shard.run SCRIPT [ARGS...]
    accelerate launch -m adascale_shard.run SCRIPT [ARGS...]

It imports the package, which registers ``"type": "AdaScale"`` with DeepSpeed and makes every HF
``Trainer`` whose optimizer is AdaScale run the whole AdaScale flow (budget in ``tau``, schedule at
``floor(tau)``, ``adascale/*`` metrics, the ``tau`` progress bar), then runs the script as
``__main__``, exactly as ``python SCRIPT ARGS...`` would (``sys.argv``, ``sys.path[0]``).
"""

from __future__ import annotations

import os
import runpy
import sys

from ._docs import see
from .integrations.accelerate_patch import RUNNER_ENV
from .integrations.deepspeed import NO_PATCH_ENV as NO_DEEPSPEED_PATCH_ENV

__all__ = ["main"]

USAGE = "usage: python -m adascale_shard.run SCRIPT [ARGS...]  |  python -m adascale_shard.run -m MODULE [ARGS...]"


def _split(argv: list[str]) -> tuple[list[str], str | None, str | None, list[str]]:
    """(launcher arguments placed before the target, script, module, the target's arguments).

    The ``deepspeed`` launcher puts ``--local_rank=N`` right after the module it runs, i.e. before
    our target: it is handed on to the target, where HF scripts expect it."""
    leading: list[str] = []
    args = list(argv)
    while args and (args[0].startswith("--local_rank") or args[0].startswith("--local-rank")):
        leading.append(args.pop(0))
        if "=" not in leading[-1] and args:
            leading.append(args.pop(0))
    if not args:
        return leading, None, None, []
    if args[0] == "-m":
        if len(args) < 2:
            return leading, None, None, []
        return leading, None, args[1], args[2:]
    return leading, args[0], None, args[1:]


def main(argv: list[str] | None = None) -> None:
    """Import adascale_shard, then run the script or module named in ``argv`` as ``__main__``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    leading, script, module, rest = _split(argv)
    if script is None and module is None:
        raise SystemExit(f"{USAGE}\nno script or module was given" + see("runner-usage"))
    os.environ[RUNNER_ENV] = "1"  # the script was not written for AdaScale (also in its subprocesses)
    import adascale_shard  # noqa: F401 - the DeepSpeed type, the Trainer flow, Accelerate's budget

    if script is not None and not os.path.isfile(script):
        raise SystemExit(f"adascale_shard.run: no such script {script!r}\n{USAGE}" + see("runner-usage"))
    try:
        if script is not None:
            sys.argv = [script, *rest, *leading]
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
        else:
            sys.argv = [module, *rest, *leading]
            sys.path[0] = os.getcwd()
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except AssertionError as err:
        # DeepSpeed's own words when the type is not registered: only with the patch switched off.
        if "AdaScale is not a supported DeepSpeed Optimizer" not in str(err):
            raise
        raise RuntimeError(
            f'DeepSpeed does not know "type": "AdaScale": {NO_DEEPSPEED_PATCH_ENV}=1 switched its registration '
            f"off. Unset {NO_DEEPSPEED_PATCH_ENV} to train with AdaScale" + see("runner-deepspeed-patch-off")
        ) from err


if __name__ == "__main__":
    main()
