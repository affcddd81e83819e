"""Where engines run: Ray placement groups for the disaggregated and colocated layouts.

Disaggregated (rollout on its own GPUs): one placement group per engine with `tensor_parallel_size`
bundles of {"GPU": 1, "CPU": c}, strategy PACK. For TP=16 on 8-GPU nodes PACK cannot fit the group
on one node, so Ray places 8 bundles on each of two nodes (STRICT_PACK would refuse). The engine
actor is scheduled on bundle 0 with `placement_group_capture_child_tasks=True` and asks for no GPU
itself; vLLM's Ray executor (`distributed_executor_backend="ray"`) then finds the actor's placement
group with `ray.util.get_current_placement_group()` and starts one worker per GPU bundle, in bundle
order — so TP ranks 0-7 sit on node A and 8-15 on node B, and vLLM's TP communicator spans both
(NCCL over the inter-node fabric). Training runs in a separate pool.

Colocated (training and rollout share GPUs, verl/slime "hybrid" style): ONE placement group with a
bundle per GPU of the job, shared by the training workers (each takes a GPU fraction of bundle i) and
the engines. Engine e is scheduled in that group and given `VLLM_RAY_BUNDLE_INDICES` = its bundles
[e*tp, (e+1)*tp), which vLLM's Ray executor uses instead of bundle order. The phases alternate:
trainer offloads (params/grads/optimizer to CPU) → engines `wake_up()` → generate → engines
`sleep()` → trainer onloads. Weights go over `cuda_ipc` (same GPUs, same node).

On CPU (tests) the layout is disaggregated with CPU bundles: one {"CPU": 1} bundle per engine, TP 1,
the engine inside the actor process.
"""

from __future__ import annotations

from dataclasses import dataclass

from megarl.utils.ray_runtime import RAY_NAMESPACE, init_ray  # noqa: F401  (init_ray is re-exported)


@dataclass(frozen=True)
class EngineSlot:
    """Where one engine goes: a placement group and the bundles its workers use (bundle_indices[0]
    hosts the engine actor)."""

    placement_group: object
    bundle_indices: tuple[int, ...]


@dataclass(frozen=True)
class RolloutPlacement:
    """mode: "disaggregated" | "colocated". use_gpu None = decide by what Ray sees."""

    num_engines: int = 1
    tensor_parallel_size: int = 1
    mode: str = "disaggregated"
    cpus_per_bundle: float = 1.0
    use_gpu: bool | None = None

    def __post_init__(self):
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"RolloutPlacement.mode must be disaggregated|colocated, got {self.mode!r}")
        if self.num_engines < 1 or self.tensor_parallel_size < 1:
            raise ValueError("RolloutPlacement needs num_engines >= 1 and tensor_parallel_size >= 1")


def ray_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def bundle(use_gpu: bool, cpus: float) -> dict:
    return {"GPU": 1, "CPU": cpus} if use_gpu else {"CPU": cpus}


def create_engine_slots(placement: RolloutPlacement, shared_group=None, timeout_s: float = 300) -> list[EngineSlot]:
    """Reserve the engines' resources and wait until Ray granted them.

    Disaggregated: a new PACK group per engine. Colocated: slices of `shared_group` (the group the
    trainer's workers also use; created here with one bundle per GPU if None)."""
    from ray.util.placement_group import placement_group

    use_gpu = ray_has_gpus() if placement.use_gpu is None else placement.use_gpu
    tp = placement.tensor_parallel_size
    if placement.mode == "disaggregated":
        groups = [
            placement_group([bundle(use_gpu, placement.cpus_per_bundle)] * tp, strategy="PACK")
            for _ in range(placement.num_engines)
        ]
        _wait_ready(groups, timeout_s)
        return [EngineSlot(g, tuple(range(tp))) for g in groups]
    if not use_gpu:
        raise ValueError("colocated placement shares GPUs between training and rollout; on CPU use disaggregated")
    if shared_group is None:
        shared_group = placement_group([bundle(True, placement.cpus_per_bundle)] * (placement.num_engines * tp), strategy="PACK")
    _wait_ready([shared_group], timeout_s)
    if len(shared_group.bundle_specs) < placement.num_engines * tp:
        raise ValueError(
            f"colocated: {placement.num_engines} engines x TP {tp} need {placement.num_engines * tp} bundles, "
            f"the shared group has {len(shared_group.bundle_specs)}"
        )
    return [EngineSlot(shared_group, tuple(range(e * tp, (e + 1) * tp))) for e in range(placement.num_engines)]


def _wait_ready(groups: list, timeout_s: float) -> None:
    import ray

    try:
        ray.get([g.ready() for g in groups], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise RuntimeError(
            f"Ray could not reserve the rollout placement groups within {timeout_s:.0f} s; "
            f"cluster resources: {ray.cluster_resources()}, requested: {[g.bundle_specs for g in groups]}"
        ) from e


def actor_options(slot: EngineSlot, *, use_gpu: bool, tensor_parallel_size: int, env: dict[str, str], cpus: float = 1.0) -> dict:
    """Ray options for the engine actor of `slot`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    env = dict(env)
    if use_gpu and tensor_parallel_size > 1:
        env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(i) for i in slot.bundle_indices)
    # TP 1 on GPU: the actor itself drives the GPU. TP > 1: vLLM's Ray workers take the GPUs.
    num_gpus = 1 if use_gpu and tensor_parallel_size == 1 else 0
    return dict(
        num_cpus=0 if use_gpu and tensor_parallel_size > 1 else cpus,
        num_gpus=num_gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=slot.placement_group,
            placement_group_bundle_index=slot.bundle_indices[0],
            placement_group_capture_child_tasks=True,
        ),
        runtime_env={"env_vars": env},
    )



