"""The device layer: accelerator detection, the megatron-core CPU shim, layer specs, config overrides.

Importing this package does not import megatron-core; `layer_specs`, `attention` and `cpu_compat`
import it when they are imported / applied.
"""

from megarl.platform.config_overrides import transformer_config_overrides
from megarl.platform.device import (
    DevicePlan,
    accelerator_available,
    apply_device_compat,
    collective_backend,
    current_device,
    device_plan,
    process_plan,
)

__all__ = [
    "DevicePlan",
    "device_plan",
    "process_plan",
    "accelerator_available",
    "apply_device_compat",
    "collective_backend",
    "current_device",
    "transformer_config_overrides",
]
