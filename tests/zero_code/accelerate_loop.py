"""An Accelerate training loop that never imports adascale_shard, in the style of the HF
``run_clm_no_trainer.py`` example: ``DummyOptim``/``DummyScheduler`` when the DeepSpeed JSON names
the optimizer and scheduler, its own update count and ``max_train_steps``, ``accelerator.log``.

Launched by ``tests/integrations/test_runner.py`` with ``accelerate launch -m adascale_shard.run``.
Rank 0 writes ``<output_dir>/result.json``: the optimizer classes, the updates, what was logged and
the scheduler's position.
"""

import argparse
import sysconfig
from pathlib import Path

import torch
from _result import optimizer_chain, write_result  # tests/zero_code/_result.py, beside this script
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DummyOptim, DummyScheduler
from transformers import AutoModelForCausalLM, GPT2Config

BLOCK = 32


class RecordingTracker(GeneralTracker):
    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def tracker(self):
        return self.records

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        self.records.append({**values, "step": step})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_train_steps", type=int, default=20)
    p.add_argument("--num_warmup_steps", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--num_train_epochs", type=int, default=100)
    args = p.parse_args()
    tracker = RecordingTracker()
    accelerator = Accelerator(log_with=[tracker])
    accelerator.init_trackers("zero_code")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2))
    data = Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_bytes()
    blocks = torch.tensor([list(data[i * BLOCK : (i + 1) * BLOCK]) for i in range(128)])
    loader = torch.utils.data.DataLoader(blocks, batch_size=args.per_device_train_batch_size, shuffle=True)
    optimizer = DummyOptim(model.parameters(), lr=args.learning_rate)
    scheduler = DummyScheduler(optimizer, total_num_steps=args.max_train_steps, warmup_num_steps=args.num_warmup_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    completed_steps = 0
    for _epoch in range(args.num_train_epochs):
        model.train()
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed_steps += 1
                accelerator.log({"loss": loss.item()}, step=completed_steps)
            if completed_steps >= args.max_train_steps:
                break
        if completed_steps >= args.max_train_steps:
            break
    accelerator.end_training()
    if accelerator.is_main_process:
        schedule = scheduler
        while hasattr(schedule, "scheduler"):
            schedule = schedule.scheduler
        names = optimizer_chain(optimizer)
        write_result(args.output_dir, {
            "optimizers": names,
            "completed_steps": completed_steps,
            "epochs_begun": _epoch + 1,
            "records": tracker.records,
            "scheduler": type(schedule).__name__,
            "last_batch_iteration": schedule.last_batch_iteration,
        })
        tau = [r["adascale/tau"] for r in tracker.records if "adascale/tau" in r]
        reached = f"tau {tau[-1]:.2f} / max_train_steps {args.max_train_steps}" if tau else f"max_train_steps {args.max_train_steps}"
        print(f"trained {completed_steps} updates; {reached}; optimizers {names}")

if __name__ == "__main__":
    main()
