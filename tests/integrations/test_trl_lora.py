"""recipes/sft_lora.py on 2 gloo ranks: TRL's SFTTrainer, a PEFT LoRA adapter, AdaScale.

One launch (``tests/harness.py``) runs the recipe's own ``build_trainer`` and ``run`` in each
rank, first under DDP and then under DeepSpeed ZeRO-2 and ZeRO-3 (after DDP: HF keeps a
process-global DeepSpeed config), with 2 accumulation steps (``S = N = 4``) on padded
prompt/completion batches of different lengths, in bf16 with gradient checkpointing (TRL's
defaults; reentrant on ZeRO-3, where TRL forces it for PEFT). ZeRO-3 builds the base model
partitioned, so it skips the recipe's whole-model pretraining (``--pretrain_steps 0``). For each
engine:

(a) AdaScale hooks exactly the adapter's trainable LoRA ``A``/``B`` matrices, no frozen weight;
(b) the gain ends above 1;
(c) the run stops at the first update with ``tau >= max_steps``, in fewer updates than ``max_steps``;
(d) the ``adascale/*`` metrics are in ``trainer.state.log_history``;
and AdaScale logs no warning: in particular not the probe warning that LoRA's zero-initialised
``B`` used to set off at the first update under DDP (the genuine case of that warning is tested
in ``tests/unit/test_probe_gradients.py``).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import Case, run_cases

pytestmark = pytest.mark.distributed
pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 12  # max_steps: scale-invariant steps
ACCUMULATION = 2
# The recipe's defaults but small: 256 examples, a 512-token vocabulary, 20 pretraining steps.
ARGS = [
    "--use_cpu", "true", "--max_steps", str(BUDGET), "--learning_rate", "0.2",
    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", str(ACCUMULATION),
    "--max_train_samples", "256", "--max_eval_samples", "32", "--vocab_size", "512", "--pretrain_steps", "20",
    "--logging_steps", "4", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
    "--plot", "false", "--seed", "0",
]  # fmt: skip
CAPTURE_HOOK = "MicroGradCapture._make_hook.<locals>.hook"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def sft_lora(rank: int, world: int, engine: str, root: str) -> dict:
    from tests.integrations.test_hf_trainer import _env

    _env(rank, world)
    sys.path.insert(0, str(ROOT / "recipes"))
    import sft_lora as recipe
    from transformers import TrainerCallback

    extra = ["--deepspeed", str(ROOT / "configs" / f"{engine}.json")] if engine.startswith("zero") else []
    if engine == "zero3":  # the base model is built partitioned (zero.Init): no whole-model pretraining
        extra += ["--pretrain_steps", "0"]
    warnings = _Warnings()
    infos = _Warnings()
    infos.setLevel(logging.INFO)
    logging.getLogger("adascale_shard").addHandler(warnings)
    logging.getLogger("adascale_shard").addHandler(infos)
    logging.getLogger("adascale_shard").setLevel(logging.INFO)
    trainer, callback, plot = recipe.build_trainer([*ARGS, "--output_dir", f"{root}/{engine}", *extra])

    class Record(TrainerCallback):
        def __init__(self) -> None:
            self.taus: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.taus.append(callback.adascale.tau)

    recorder = Record()
    trainer.add_callback(recorder)
    summary = recipe.run(trainer, callback, plot)
    logging.getLogger("adascale_shard").removeHandler(warnings)
    logging.getLogger("adascale_shard").removeHandler(infos)
    params = list(trainer.model.named_parameters())

    def hooked(p) -> bool:
        return any(getattr(h, "__qualname__", "") == CAPTURE_HOOK for h in (p._backward_hooks or {}).values())

    return {
        "summary": summary,
        "taus": recorder.taus,
        "log_history": trainer.state.log_history,
        "trainable": sorted(n for n, p in params if p.requires_grad),
        "hooked": sorted(n for n, p in params if hooked(p)),
        "frozen": sum(not p.requires_grad for _, p in params),
        "num_hooks": callback.adascale._capture.num_hooks,
        "warnings": warnings.messages,
        "infos": infos.messages,
        "bf16": trainer.args.bf16,
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "gradient_checkpointing_kwargs": trainer.args.gradient_checkpointing_kwargs,
    }


@pytest.fixture(scope="module")
def runs() -> dict:
    root = tempfile.mkdtemp(prefix="adascale_trl_")  # made here: every rank must see the same files
    try:
        cases = [Case(engine, sft_lora, (engine, root)) for engine in ("ddp", "zero2", "zero3")]
        per_rank = run_cases(cases, 2, timeout=600, env={"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return per_rank[0]


ENGINES = [("ddp", "DistributedDataParallel"), ("zero2", "DeepSpeedEngine"), ("zero3", "DeepSpeedEngine")]


def test_every_engine_ran_bf16_with_gradient_checkpointing(runs):
    """TRL's defaults: bf16 and gradient checkpointing, non-reentrant (transformers' default) under
    DDP and ZeRO-2; with PEFT on ZeRO-3 TRL forces reentrant checkpointing. ``S == N == 4`` in
    test_the_gain_ends_above_one also checks that the reentrant inner backward passes were not
    counted as micro-batches of their own."""
    for engine, _ in ENGINES:
        r = runs[engine]
        assert r["bf16"] and r["gradient_checkpointing"], engine
        reentrant = (r["gradient_checkpointing_kwargs"] or {}).get("use_reentrant", False)
        assert reentrant is (engine == "zero3"), (engine, r["gradient_checkpointing_kwargs"])


@pytest.mark.parametrize("engine, wrapper", ENGINES)
def test_only_the_adapter_is_hooked(runs, engine, wrapper):
    r = runs[engine]
    assert r["summary"]["engine"] == wrapper
    assert r["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in r["trainable"]), r["trainable"]
    assert r["hooked"] == r["trainable"]
    assert r["num_hooks"] == len(r["trainable"])
    assert r["frozen"] > len(r["trainable"])  # the base model's weights: no hook on any of them


@pytest.mark.parametrize("engine, wrapper", ENGINES)
def test_the_gain_ends_above_one(runs, engine, wrapper):
    s = runs[engine]["summary"]
    assert s["S"] == s["N"] == 2 * ACCUMULATION
    assert s["gain"] > 1.2, s  # measured: 1.69 (DDP), 1.70 (ZeRO-2), 1.86 (ZeRO-3, no pretraining)
    print(f"\n{engine}: {s['updates']} updates, tau {s['tau']:.2f}, gain {s['gain']:.3f}, eval loss {s['eval_loss']:.3f}")


@pytest.mark.parametrize("engine, wrapper", ENGINES)
def test_training_stops_at_the_budget(runs, engine, wrapper):
    r = runs[engine]
    taus = r["taus"]
    assert r["summary"]["updates"] == len(taus) < BUDGET
    assert taus[-1] >= BUDGET > taus[-2]
    assert r["summary"]["tau"] == taus[-1]


@pytest.mark.parametrize("engine, wrapper", ENGINES)
def test_adascale_metrics_are_in_the_log_history(runs, engine, wrapper):
    records = [r for r in runs[engine]["log_history"] if "loss" in r]
    assert records
    for record in records:
        for key in ("gain", "tau", "var", "sqr", "effective_lr", "S"):
            assert f"adascale/{key}" in record, record
    assert records[-1]["adascale/tau"] == pytest.approx(runs[engine]["taus"][-1])


@pytest.mark.parametrize("engine, wrapper", ENGINES)
def test_no_adascale_warning(runs, engine, wrapper):
    """Under DDP LoRA's first update used to log the probe warning (every probe was an ``A``
    matrix, whose gradient is exactly zero while ``B`` is); no AdaScale warning is expected."""
    assert runs[engine]["warnings"] == []
