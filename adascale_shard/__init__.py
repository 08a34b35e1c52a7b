"""AdaScale SGD for data-parallel and sharded training.

``import adascale_shard`` loads torch only; integrations with DeepSpeed, the Hugging Face
Trainer and Accelerate live in ``adascale_shard.integrations`` and are imported by full path.
"""

from .config import AdaScaleConfig
from .integrations import accelerate_patch as _accelerate_patch
from .integrations import deepspeed as _deepspeed
from .integrations import hf_patch as _hf_patch
from .optimizer import AdaScale
from .schedule import follow_tau
from .unwrap import unwrap

# Registers "type": "AdaScale" for DeepSpeed JSON configs, gives every HF Trainer whose optimizer is
# AdaScale the whole flow, and Accelerate loops the budget and metrics; none imports its library.
_deepspeed.install()
_hf_patch.install()
_accelerate_patch.install()

__all__ = ["AdaScale", "AdaScaleConfig", "follow_tau", "unwrap"]
__version__ = "0.1.0"
