"""Starting (or joining) Ray with an environment every actor inherits.

On a cluster, `init_ray()` joins the running cluster (RAY_ADDRESS or address="auto" from the Slurm
script). On a single machine it starts a local Ray whose logical CPU count covers the actors the
run creates (training ranks + rollout engines): logical CPUs are a scheduling budget, not cores, and
2-core CI machines would otherwise leave actors pending forever.
"""

from __future__ import annotations

import os
import sys

# Variables every actor must see exactly as the driver does: caches inside the run's work tree, no
# hub access, vLLM's CPU settings.
FORWARDED_ENV = (
    "PYTHONPATH", "TMPDIR", "HF_HOME", "HF_HUB_OFFLINE", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR",
    "XDG_CACHE_HOME", "VLLM_CPU_KVCACHE_SPACE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "TORCH_COMPILE_DISABLE",
    "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_LEVEL", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_DEBUG",
    "MEGARL_DEVICE",  # trainer.device=cpu: every actor decides the device as the driver did
)


def forwarded_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    repo_root = _repo_root()
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if repo_root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([repo_root, *paths])
    env.update(extra or {})
    return env


LOCAL_START_ATTEMPTS = 3  # a local Ray start that times out under load is tried again (see init_ray)
RAY_NAMESPACE = "megarl"  # named actors (rollout engines) are found by every driver and rank in it


def init_ray(num_cpus: int | None = None, address: str | None = None, object_store_gb: float | None = None,
             extra_env: dict[str, str] | None = None) -> None:
    """Start or join Ray once per process; later calls return immediately.

    `address` (or RAY_ADDRESS) joins a running cluster. Otherwise a local Ray starts with its temp
    files under the work tree and `num_cpus` logical CPUs (default: max(4, cores)).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    common = dict(namespace=RAY_NAMESPACE, runtime_env={"env_vars": forwarded_env(extra_env)},
                  log_to_driver=os.environ.get("MEGARL_RAY_LOG_TO_DRIVER", "0") == "1")
    if address:
        ray.init(address=address, **common)
        return
    runtime = os.environ.get("MEGARL_RUNTIME_DIR", os.path.join(_repo_root(), ".runtime"))
    temp = os.path.join(runtime, "ray")
    # Ray's socket paths must stay under ~107 bytes: fall back to a short folder in a deep tree.
    if len(temp) > 60:
        temp = "/tmp/megarl_ray"
    os.makedirs(temp, exist_ok=True)
    local = dict(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, _temp_dir=temp,
                 object_store_memory=int(object_store_gb * 2**30) if object_store_gb else None, **common)
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(**local)
            return
        except Exception as err:  # noqa: BLE001 - only Ray's start-up time-out is retried
            # Ray waits a fixed 30 s for its raylet to register (ray/_private/node.py, not configurable);
            # on a loaded 2-core machine that start-up can take longer. A fresh start usually succeeds.
            if "timed out during startup" not in str(err) or attempt == LOCAL_START_ATTEMPTS:
                raise
            print(f"warning: local Ray did not start within Ray's fixed 30 s (attempt {attempt} of "
                  f"{LOCAL_START_ATTEMPTS}; the machine is loaded); starting it again", file=sys.stderr, flush=True)
            ray.shutdown()


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
