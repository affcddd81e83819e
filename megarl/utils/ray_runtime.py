"""Starting (or joining) Ray with an environment every actor inherits.

On a cluster, `init_ray()` joins the running cluster (RAY_ADDRESS or address="auto" from the Slurm
script). On a single machine it starts a local Ray whose logical CPU count covers the actors the
run creates (training ranks + rollout engines): logical CPUs are a scheduling budget, not cores, and
2-core CI machines would otherwise leave actors pending forever.
"""

from __future__ import annotations

import os

# Variables every actor must see exactly as the driver does: caches inside the run's work tree, no
# hub access, vLLM's CPU settings.
FORWARDED_ENV = (
    "PYTHONPATH", "TMPDIR", "HF_HOME", "HF_HUB_OFFLINE", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR",
    "XDG_CACHE_HOME", "VLLM_CPU_KVCACHE_SPACE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "TORCH_COMPILE_DISABLE",
    "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_LEVEL", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_DEBUG",
)


def forwarded_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if repo_root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([repo_root, *paths])
    env.update(extra or {})
    return env


def init_ray(min_cpus: int = 4, address: str | None = None, extra_env: dict[str, str] | None = None):
    """Start or join Ray once per process; later calls return immediately."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(runtime_env={"env_vars": forwarded_env(extra_env)}, include_dashboard=False,
                  log_to_driver=True, ignore_reinit_error=True)
    if address:
        ray.init(address=address, **kwargs)
        return
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ray")
    os.makedirs(tmp, exist_ok=True)
    # Ray's socket paths must stay under ~107 bytes: keep the temp dir short if the tree is deep.
    if len(tmp) > 60:
        tmp = "/tmp/megarl_ray"
    ray.init(num_cpus=max(min_cpus, os.cpu_count() or 1), _temp_dir=tmp, **kwargs)
