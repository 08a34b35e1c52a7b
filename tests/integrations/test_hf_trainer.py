"""The HF Trainer with AdaScale on 2 gloo ranks: DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Each Trainer run records the micro-batches every rank received; a plain-PyTorch loop on the same
engine (DDP, or ``deepspeed.initialize``) then replays them from the same initial weights with
the same loss normalisation, clipping and schedule. The gain sequences and the final parameters
(gathered from their partitions under ZeRO-3) must agree, the Trainer must stop at the requested
``tau``, TensorBoard must hold the ``adascale/*`` scalars, and a run resumed from a mid-run
checkpoint must end where the uninterrupted one does.
"""

from __future__ import annotations

import math
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from tests.harness import Case, run_cases

pytestmark = pytest.mark.distributed
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

BLOCK, SAMPLES = 32, 256
PER_DEVICE, ACCUMULATION = 4, 2
BUDGET, WARMUP = 24, 4
LR, MOMENTUM, MAX_GRAD_NORM = 0.05, 0.9, 1.0
# The plain loop reproduces the Trainer's loss exactly: the summed token loss divided by the
# label count of the whole window over all ranks (HF counts every label, 32 per sequence, though
# the shifted loss predicts 31), times the world size. Both then run the same float32 arithmetic
# on the same engine; what remains is summation order inside the engines' reductions.
GAIN_RTOL, PARAM_ATOL = 1e-6, 1e-6


def gathered_params(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter in full, float32. Under ZeRO-3 each rank holds only its partition (the
    module's tensors are empty): ``GatheredParameters`` all-gathers them for the copy (a collective:
    every rank calls it), and is a no-op on parameters that are not partitioned."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().float().clone() for p in params]


def _env(rank: int, world: int) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": os.environ.get("MASTER_PORT", "29511"),
            "HF_HUB_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu",
        }
    )


def _datasets():
    from datasets import Dataset

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(stdlib.glob("a*.py")))
    ids = list(data[: (SAMPLES + 32) * BLOCK])
    blocks = [ids[i * BLOCK : (i + 1) * BLOCK] for i in range(SAMPLES + 32)]
    train = Dataset.from_dict({"input_ids": blocks[:SAMPLES], "labels": blocks[:SAMPLES]})
    val = Dataset.from_dict({"input_ids": blocks[SAMPLES:], "labels": blocks[SAMPLES:]})
    return train, val


def _model():
    """Built with from_config, as recipes do: after TrainingArguments with a ZeRO-3 config the
    Trainer's integration builds it under deepspeed.zero.Init, already partitioned."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return AutoModelForCausalLM.from_config(config)


def _ds_config(stage: int) -> dict:
    # ZeRO-3 keeps parameters below stage3_param_persistence_threshold (default 1e5 elements: all
    # of this tiny model's) whole on every rank after their first gather; 0 keeps every parameter
    # partitioned between passes, as in a model of real size.
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "optimizer": {"type": "AdaScale", "params": {"optimizer": "SGD", "lr": "auto", "momentum": MOMENTUM}},
        "steps_per_print": 10**9,
    }


def train_with_trainer(rank: int, world: int, mode: str, output_dir: str, resume: bool = False) -> dict:
    _env(rank, world)
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import adascale_shard  # noqa: F401 - registers the DeepSpeed type
    from adascale_shard.integrations.hf import enable_adascale

    train, val = _datasets()
    args = TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        per_device_train_batch_size=PER_DEVICE,
        gradient_accumulation_steps=ACCUMULATION,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,
        max_steps=BUDGET,
        max_grad_norm=MAX_GRAD_NORM,
        logging_steps=4,
        save_strategy="steps",
        save_steps=12,
        eval_strategy="no",
        report_to=["tensorboard"],
        seed=0,
        disable_tqdm=True,
        deepspeed=_ds_config(int(mode[-1])) if mode.startswith("zero") else None,
    )
    model = _model()  # after the arguments: partitioned at construction under ZeRO-3
    if mode == "zero3":
        assert all(p.numel() == 0 for p in model.parameters()), "expected a model built under zero.Init"
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    if mode.startswith("zero"):
        callback = enable_adascale(trainer)
    else:
        callback = enable_adascale(trainer, optimizer="SGD", momentum=MOMENTUM)
    inputs: list[torch.Tensor] = []

    def record(module, args_, kwargs):
        if module.training:
            inputs.append(kwargs["input_ids"].detach().clone())

    model.register_forward_pre_hook(record, with_kwargs=True)

    class Record(TrainerCallback):
        def __init__(self):
            self.gains, self.taus, self.lrs = [], [], []

        def on_step_end(self, args, state, control, **kwargs):
            adascale = callback.adascale
            self.gains.append(adascale.gain())
            self.taus.append(adascale.tau)
            self.lrs.append(adascale.stats()["effective_lr"])

    recorder = Record()
    trainer.add_callback(recorder)
    checkpoint = None
    if resume:
        checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        checkpoint = str(checkpoints[0])
    trainer.train(resume_from_checkpoint=checkpoint)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "gains": recorder.gains,
        "taus": recorder.taus,
        "updates": trainer.state.global_step,
        "inputs": inputs,
        "log_history": trainer.state.log_history,
        "last_loss": losses[-1] if losses else None,
        "params": gathered_params(model),
        "engine": type(trainer.model_wrapped).__name__,
        "resumed_from": checkpoint,
    }


def window_tokens(world: int) -> torch.Tensor:
    """The Trainer's num_items_in_batch: labels in the accumulation window, summed over ranks."""
    return torch.tensor(world * ACCUMULATION * PER_DEVICE * BLOCK)


def train_plain(rank: int, world: int, mode: str, inputs: list[torch.Tensor]) -> dict:
    """The same micro-batches through a plain loop on the same engine (no Trainer)."""
    _env(rank, world)
    from transformers import get_linear_schedule_with_warmup

    from adascale_shard import AdaScale, follow_tau

    model = _model()
    gains, taus = [], []
    batches = iter(inputs)
    if mode == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = AdaScale(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
        sched = follow_tau(get_linear_schedule_with_warmup(opt, WARMUP, BUDGET), opt)
        while not opt.budget_spent(BUDGET):
            for k in range(ACCUMULATION):
                ids = next(batches)
                loss = ddp(input_ids=ids, labels=ids, num_items_in_batch=window_tokens(world)).loss * world
                if k < ACCUMULATION - 1:
                    with ddp.no_sync():
                        loss.backward()
                else:
                    loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
            sched.step()
            opt.zero_grad()
            gains.append(opt.gain())
            taus.append(opt.tau)
        params = gathered_params(model)
    else:
        import deepspeed

        stage = int(mode[-1])
        config = _ds_config(stage)
        config.update(
            train_micro_batch_size_per_gpu=PER_DEVICE, gradient_accumulation_steps=ACCUMULATION,
            gradient_clipping=MAX_GRAD_NORM,
        )
        config["optimizer"]["params"]["lr"] = LR
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=config,
            lr_scheduler=lambda opt: get_linear_schedule_with_warmup(opt, WARMUP, BUDGET),
        )
        opt = engine.basic_optimizer
        while not opt.budget_spent(BUDGET):
            for _ in range(ACCUMULATION):
                ids = next(batches)
                loss = engine(input_ids=ids, labels=ids, num_items_in_batch=window_tokens(world)).loss * world
                engine.backward(loss, scale_wrt_gas=False)  # as the Trainer calls it
                engine.step()
            gains.append(opt.gain())
            taus.append(opt.tau)
        params = gathered_params(engine.module)
    return {"gains": gains, "taus": taus, "params": params}


def read_tensorboard(log_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for events in Path(log_dir).rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return scalars


MODES = ("ddp", "zero2", "zero3")


def evaluate_first(rank: int, world: int, root: str) -> str:
    """transformers 5.23 / accelerate 1.15: evaluate() before train() leaves the model unwrapped;
    AdaScale must refuse rather than train one copy per rank."""
    _env(rank, world)
    from transformers import Trainer, TrainingArguments

    from adascale_shard.integrations.hf import enable_adascale

    train, val = _datasets()
    args = TrainingArguments(
        output_dir=os.path.join(root, "evaluate_first"), use_cpu=True, per_device_train_batch_size=PER_DEVICE,
        learning_rate=LR, max_steps=4, save_strategy="no", report_to=[], disable_tqdm=True,
    )
    trainer = Trainer(model=_model(), args=args, train_dataset=train, eval_dataset=val)
    enable_adascale(trainer, optimizer="SGD", momentum=MOMENTUM)
    trainer.evaluate()
    try:
        trainer.train()
    except RuntimeError as err:
        return str(err)
    return "trained"


def trainer_then_plain(rank: int, world: int, mode: str, root: str) -> dict:
    out = os.path.join(root, mode)
    trained = train_with_trainer(rank, world, mode, out)
    tensorboard = read_tensorboard(os.path.join(out, "runs")) if rank == 0 else {}  # before the resumed run logs
    plain = train_plain(rank, world, mode, trained["inputs"])
    resumed = train_with_trainer(rank, world, mode, out, resume=True) if mode in ("ddp", "zero2") else None
    trained.pop("inputs")
    return {"trainer": trained, "plain": plain, "resumed": resumed, "tensorboard": tensorboard}


@pytest.fixture(scope="module")
def results() -> dict:
    root = tempfile.mkdtemp(prefix="adascale_hf_")  # made here: every rank must see the same files
    try:
        # evaluate_first before the DeepSpeed runs: HF keeps a process-global DeepSpeed config.
        cases = [Case("evaluate_first", evaluate_first, (root,))]
        cases += [Case(m, trainer_then_plain, (m, root)) for m in MODES]
        per_rank = run_cases(cases, 2, timeout=900, env={"DS_ACCELERATOR": "cpu"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return per_rank[0]


@pytest.mark.parametrize("mode", MODES)
def test_trainer_gains_equal_the_plain_engine_loop(results, mode):
    trainer, plain = results[mode]["trainer"], results[mode]["plain"]
    assert len(trainer["gains"]) == len(plain["gains"]) == trainer["updates"]
    for a, b in zip(trainer["gains"], plain["gains"]):
        assert a == pytest.approx(b, rel=GAIN_RTOL)
    assert 1.0 < max(trainer["gains"]) < ACCUMULATION * 2  # informative, inside (1, S)
    diff = max(abs(a - b) for a, b in zip(trainer["gains"], plain["gains"]))
    print(f"\nTrainer {mode} ({trainer['engine']}): {trainer['updates']} updates, max |gain diff| vs plain {diff:.2e}")
    # The final parameters, gathered in full under ZeRO-3 too (see gathered_params): full shapes.
    shapes = [p.shape for p in _model().parameters()]
    assert [p.shape for p in trainer["params"]] == [p.shape for p in plain["params"]] == shapes
    param_diff = max(float((p - q).abs().max()) for p, q in zip(trainer["params"], plain["params"]))
    print(f"Trainer {mode}: max |param diff| vs plain {param_diff:.2e} over {sum(p.numel() for p in plain['params'])} values")
    # PARAM_ATOL under ZeRO-3 too: both loops run the same engine's float32 arithmetic (measured: identical, 0.0).
    for p, q in zip(trainer["params"], plain["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=PARAM_ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_trainer_stops_at_the_budget(results, mode):
    taus = results[mode]["trainer"]["taus"]
    assert taus[-1] >= BUDGET > taus[-2]
    assert results[mode]["trainer"]["updates"] < BUDGET  # gains > 1 saved real updates


@pytest.mark.parametrize("mode", MODES)
def test_tensorboard_receives_the_adascale_metrics(results, mode):
    scalars = results[mode]["tensorboard"]
    history = [r for r in results[mode]["trainer"]["log_history"] if "adascale/gain" in r]
    for key in ("gain", "tau", "var", "sqr", "noise_scale", "effective_lr"):
        tag = f"train/adascale/{key}"
        assert tag in scalars, sorted(scalars)
        assert len(scalars[tag]) == len(history)
    assert scalars["train/adascale/tau"] == pytest.approx([r["adascale/tau"] for r in history])
    # Logged exactly at the updates whose floor(tau) reaches the next multiple of logging_steps
    # (4, in scale-invariant steps), and at the last update: one expected list from the taus of
    # every update.
    every = results[mode]["trainer"]["taus"]
    last = len(every) - 1
    expected = [
        t for u, (s, t) in enumerate(zip([0.0] + every, every)) if math.floor(t) // 4 > math.floor(s) // 4 or u == last
    ]
    assert [r["adascale/tau"] for r in history] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ("ddp", "zero2"))
def test_resume_from_checkpoint_reproduces_the_run(results, mode):
    trainer, resumed = results[mode]["trainer"], results[mode]["resumed"]
    assert resumed["resumed_from"].endswith(tuple(f"checkpoint-{n}" for n in range(1, BUDGET)))
    assert resumed["taus"][-1] == pytest.approx(trainer["taus"][-1], rel=1e-12)
    assert resumed["updates"] == trainer["updates"]
    assert resumed["last_loss"] == pytest.approx(trainer["last_loss"], rel=1e-6)
    n = len(resumed["gains"])
    assert resumed["gains"] == pytest.approx(trainer["gains"][-n:], rel=1e-12)


def test_evaluate_before_train_is_refused(results):
    message = results["evaluate_first"]
    assert "not wrapped for data parallelism" in message and "evaluate()" in message
