"""The DeepSpeed engine patch can be switched off (``ADASCALE_NO_DEEPSPEED_PATCH=1``) and undone
(``unpatch()``): DeepSpeed's own methods come back. Each case in a fresh interpreter, because the
patch applies when DeepSpeed's engine module is imported."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

PROBE = """
import json, adascale_shard
from deepspeed.runtime import config, engine
from deepspeed.runtime.zero import utils as zero_utils
from adascale_shard.integrations import deepspeed as integration
names = ["save_checkpoint", "load_checkpoint", "_is_supported_optimizer", "_configure_basic_optimizer",
         "_configure_optimizer", "_configure_lr_scheduler", "_take_model_step"]
def state():
    cls = engine.DeepSpeedEngine
    return {"patched": bool(getattr(cls, "_adascale_shard_patched", False)),
            "own_methods": [getattr(cls, n).__module__ == "deepspeed.runtime.engine" for n in names],
            "registered": adascale_shard.AdaScale in zero_utils.ZERO_SUPPORTED_OPTIMIZERS,
            "own_config_parsing": config.get_optimizer_name.__module__ == "deepspeed.runtime.config"}
out = {"after_import": state()}
integration.unpatch()
out["after_unpatch"] = state()
integration.install()  # and back on
out["after_install"] = state()
print("RESULT " + json.dumps(out))
"""


def probe(**env):
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu", **env},
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_unpatch_restores_deepspeed_and_install_patches_again():
    out = probe()
    patched = {"patched": True, "own_methods": [False] * 7, "registered": True, "own_config_parsing": False}
    assert out["after_import"] == patched
    assert out["after_unpatch"] == {"patched": False, "own_methods": [True] * 7, "registered": False, "own_config_parsing": True}
    assert out["after_install"] == out["after_import"]


def test_the_environment_switch_leaves_deepspeed_alone():
    out = probe(ADASCALE_NO_DEEPSPEED_PATCH="1")
    untouched = {"patched": False, "own_methods": [True] * 7, "registered": False, "own_config_parsing": True}
    assert out["after_import"] == out["after_unpatch"] == out["after_install"] == untouched
