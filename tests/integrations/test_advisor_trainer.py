"""The advisor on a real Trainer run's output directory (checkpoint-*/trainer_state.json)."""

import pytest

pytest.importorskip("transformers")

from adascale_shard import advisor
from adascale_shard.integrations.hf import enable_adascale
from tests.integrations.test_hf_enable import make_trainer


def test_advisor_reads_a_trainer_output_dir(tmp_path, capsys):
    trainer = make_trainer(tmp_path, max_steps=24, logging_steps=3, save_strategy="steps", save_steps=8)
    enable_adascale(trainer, base_batch_size=4, optimizer="SGD", momentum=0.9)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "adascale/tau" in r]
    assert logged and all(r["adascale/S"] == 2.0 for r in logged)
    for r in logged:
        assert r["adascale/efficiency"] == pytest.approx(r["adascale/gain"] / 2.0)
    advice = advisor.advise(tmp_path, base_batch_size=4, phases=2)
    assert advice.source.parent.name.startswith("checkpoint-") and advice.source.name == "trainer_state.json"
    assert advice.model.kind == "averaging"  # tau, updates, var, sqr and S are all logged
    assert advice.run_scale == 2.0
    # At the run's own scale the replay reproduces the run's update count closely.
    last = logged[-1]
    assert advice.model.updates(2.0, 0.0, last["adascale/tau"]) == pytest.approx(last["adascale/updates"], rel=0.1)
    assert advisor.main([str(tmp_path), "--base_batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "Recommendation:" in out and "B_noise (samples)" in out
    assert (tmp_path / "adascale_advisor.png").exists()
