"""AdaScale SGD for data-parallel and sharded training.

``import adascale_shard`` loads torch only; integrations with DeepSpeed, the Hugging Face
Trainer and Accelerate live in ``adascale_shard.integrations`` and are imported by full path.
"""

from .config import AdaScaleConfig
from .integrations import deepspeed as _deepspeed
from .optimizer import AdaScale
from .schedule import follow_tau
from .unwrap import unwrap

# Registers "type": "AdaScale" for DeepSpeed JSON configs, without importing DeepSpeed.
_deepspeed.install()

__all__ = ["AdaScale", "AdaScaleConfig", "follow_tau", "unwrap"]
__version__ = "0.1.0"
