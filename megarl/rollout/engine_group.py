"""N data-parallel vLLM engines as Ray actors, behind one `generate` / weight-push interface.

    init_ray()
    group = EngineGroup(VLLMEngineConfig(model=hf_dir, tensor_parallel_size=8), EngineGroupOptions(num_engines=4))
    results = group.generate([RolloutRequest(messages=[...]), ...], SamplingOptions(n=8, max_tokens=1024))
    group.push_weights(export_hf_weights(handle))        # or WeightPusher(group.engines, ...) on training rank 0

Requests are spread over the engines by estimated cost (prompt length + n * max_tokens), each engine
gets one batched call, results come back in request order. A dead engine (actor process gone) gives
`EngineDiedError` at once; an engine that does not answer within `generate_timeout_s` gives
`EngineTimeoutError`. With `on_engine_failure="restart"` the group starts a fresh actor in the same
slot (at most `max_restarts` times over the group's life) and retries the dead engine's requests. A
restarted engine holds the checkpoint's weights: with a `weights_restorer` (the trainer sets one that
re-pushes its current weights into the new actor) it serves again at once; without one it is left out
until the next push reaches it. The rollout config's `on_engine_failure` / `max_engine_restarts` map
onto these options.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from megarl.rollout.placement import RolloutPlacement, actor_options, create_engine_slots, ray_has_gpus
from megarl.rollout.types import EngineHealth, RolloutRequest, SampleResult, SamplingOptions
from megarl.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig, engine_process_env

log = logging.getLogger(__name__)


class EngineDiedError(RuntimeError):
    """A rollout engine's actor died (crash, OOM kill, node loss)."""


class EngineTimeoutError(TimeoutError):
    """A rollout engine did not answer within the configured timeout."""


FAILURE_POLICIES = ("fail", "restart")


@dataclass(frozen=True)
class EngineGroupOptions:
    """num_engines: data-parallel engines. placement: "disaggregated" | "colocated".
    on_engine_failure: "fail" (EngineDiedError) | "restart" (fresh actor, requests retried).
    max_restarts: engine restarts allowed over the group's life (all engines together); each retry
    of a dead engine's requests follows a restart, so it bounds the retries too."""

    num_engines: int = 1
    placement: str = "disaggregated"
    on_engine_failure: str = "fail"
    max_restarts: int = 3
    generate_timeout_s: float = 1800.0
    start_timeout_s: float = 900.0
    engine_cpus: float = 1.0  # CPUs reserved per engine bundle (fractions let small test machines pack engines)
    name: str | None = None  # named actors "<name>-<i>": other processes (training rank 0) find them with engine_handles()

    @classmethod
    def from_config(cls, cfg, device, num_engines: int) -> "EngineGroupOptions":
        """From a MegaRLConfig and its DevicePlan: the plan decides the placement actually used (on
        CPU a colocated recipe runs disaggregated) and the CPUs per engine."""
        r = cfg.rollout
        return cls(num_engines=num_engines, placement=device.placement, engine_cpus=device.engine_cpus,
                   on_engine_failure=r.on_engine_failure, max_restarts=r.max_engine_restarts)

    def __post_init__(self):
        if self.on_engine_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_engine_failure must be fail|restart, got {self.on_engine_failure!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {self.num_engines}")


class EngineGroup:
    def __init__(self, engine_config: VLLMEngineConfig, options: EngineGroupOptions = EngineGroupOptions(), slots=None):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("call megarl.rollout.init_ray() (or ray.init) before creating an EngineGroup")
        self.config = engine_config
        self.options = options
        self.use_gpu = ray_has_gpus()
        placement = RolloutPlacement(
            num_engines=options.num_engines,
            tensor_parallel_size=engine_config.tensor_parallel_size,
            mode=options.placement,
            cpus_per_bundle=options.engine_cpus,
        )
        self.slots = slots or create_engine_slots(placement, timeout_s=options.start_timeout_s)
        self.engines = [self._start_actor(i) for i in range(options.num_engines)]
        self._stale: set[int] = set()  # restarted engines that may have missed weight pushes
        self._versions = [0] * options.num_engines  # each engine's weights version, as last seen
        self._required_version = 0  # what a restarted engine must reach before it serves again
        self.restarts = 0  # engine restarts so far (bounded by options.max_restarts)
        # Called with the indices of freshly restarted engines; must load the current weights into
        # them (the trainer re-pushes from its rank 0). None: they wait for the next push.
        self.weights_restorer = None
        self._wait_started(range(options.num_engines))

    # ---------------------------------------------------------------- actors
    def _start_actor(self, index: int):
        import ray

        env = engine_process_env(self.config, cpu=not self.use_gpu)
        opts = actor_options(
            self.slots[index],
            use_gpu=self.use_gpu,
            tensor_parallel_size=self.config.tensor_parallel_size,
            env=env,
            cpus=self.options.engine_cpus,
        )
        name = f"{self.options.name}-{index}" if self.options.name else None
        return ray.remote(VLLMEngine).options(name=name, max_restarts=0, **opts).remote(self.config, index)

    def _wait_started(self, indices) -> None:
        import ray

        indices = list(indices)
        try:
            ray.get([self.engines[i].health.remote() for i in indices], timeout=self.options.start_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise EngineTimeoutError(f"engines {indices} did not start within {self.options.start_timeout_s:.0f} s") from e
        except ray.exceptions.RayActorError as e:
            raise EngineDiedError(f"an engine died while starting (model {self.config.model}): {e}") from e

    def check_failure_policy(self, what: str) -> None:
        """Raise EngineDiedError(what + why) unless the options allow one more restart."""
        if self.options.on_engine_failure == "fail":
            raise EngineDiedError(f"{what}; set rollout.on_engine_failure=restart (EngineGroupOptions"
                                  "(on_engine_failure='restart')) to restart the engine and retry")
        if self.restarts >= self.options.max_restarts:
            raise EngineDiedError(f"{what}; the {self.restarts} engine restarts allowed "
                                  f"(rollout.max_engine_restarts={self.options.max_restarts}) are used up")

    def dead_engines(self, timeout_s: float = 30.0) -> list[int]:
        return [h.engine_index for h in self.health(timeout_s) if not h.ok]

    def restart_engines(self, indices: list[int], reason: str, restore_weights: bool = True) -> None:
        """Restart dead engines under the failure policy and (restore_weights) bring them to the
        current weights through `weights_restorer`, if set. Raises EngineDiedError when the policy
        says fail. restore_weights=False: the caller pushes next (a push that an engine died in)."""
        for index in indices:
            self.check_failure_policy(f"rollout engine {index} {reason}")
            log.warning("rollout engine %d %s; restarting it (restart %d of at most %d)", index, reason,
                        self.restarts + 1, self.options.max_restarts)
            self.restart_engine(index)
            self.restarts += 1
        if restore_weights and self.weights_restorer is not None and indices:
            self.weights_restorer(list(indices))
            self._refresh_stale()

    def restart_engine(self, index: int) -> None:
        """Replace engine `index` by a fresh actor in the same slot (kills the old one if alive)."""
        import ray

        try:
            ray.kill(self.engines[index], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self.options.name:  # the name is free only once the old actor is gone
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(f"{self.options.name}-{index}")
                except ValueError:
                    break
                time.sleep(0.2)
        self._required_version = max(self._required_version, *self._versions)
        self.engines[index] = self._start_actor(index)
        self._wait_started([index])
        self._versions[index] = 0
        self._stale.add(index)

    # ---------------------------------------------------------------- generation
    def generate(self, requests: list[RolloutRequest], sampling: SamplingOptions = SamplingOptions()) -> list[list[SampleResult]]:
        """`results[i][j]`: sample j of request i. Raises EngineDiedError / EngineTimeoutError."""
        if not requests:
            return []
        results: list[list[SampleResult] | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        while todo:  # ends: every failed attempt used one of the max_restarts restarts, or raised
            todo = self._generate_once(requests, sampling, todo, results)
        return results  # type: ignore[return-value]

    def _usable_engines(self) -> list[int]:
        if self._stale:
            self._refresh_stale()
        usable = [i for i in range(len(self.engines)) if i not in self._stale]
        if not usable:
            raise EngineDiedError(
                f"no engine holds the current weights (version {self._required_version}): every engine was "
                "restarted after a weight push and has the checkpoint's weights; push weights again before generating"
            )
        return usable

    def _refresh_stale(self) -> None:
        """A restarted engine serves again once a push has brought it to the version the group had
        seen before the restart (pushes may come from another process, so ask the engines)."""
        import ray

        if not self._stale:
            return
        health = ray.get([self.engines[i].health.remote() for i in sorted(self._stale)], timeout=60)
        for h in health:
            self._versions[h.engine_index] = h.weights_version
        self._stale = {i for i in self._stale if self._versions[i] < self._required_version}

    def _generate_once(self, requests, sampling, todo, results) -> list[int]:
        import ray

        usable = self._usable_engines()
        assignment = balance(requests, todo, sampling, len(usable))
        pending = {}
        for slot, indices in enumerate(assignment):
            if indices:
                engine = usable[slot]
                pending[self.engines[engine].generate_tagged.remote([requests[i] for i in indices], sampling)] = (engine, indices)
        failed: list[int] = []
        deadline = time.monotonic() + self.options.generate_timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(engine for engine, _ in pending.values())
                for ref in pending:
                    ray.cancel(ref, force=False)
                raise EngineTimeoutError(f"engines {late} did not finish generate within {self.options.generate_timeout_s:.0f} s")
            ref = ready[0]
            engine, indices = pending.pop(ref)
            try:
                self._versions[engine], outputs = ray.get(ref)
                for i, res in zip(indices, outputs, strict=True):
                    results[i] = res
            except ray.exceptions.RayActorError as e:
                reason = f"died during generate ({len(indices)} requests): {e.__class__.__name__}"
                self.restart_engines([engine], reason)
                failed.extend(indices)
        return failed

    # ---------------------------------------------------------------- weights & phases
    def pusher(self, options=None):
        from megarl.rollout.weight_sync import WeightPusher, WeightPushOptions

        return WeightPusher(self.engines, options or WeightPushOptions())

    def push_weights(self, named_tensors, options=None, version: int | None = None):
        """Push from this process (the sender). Returns PushStats. Clears the stale marks: every
        engine, restarted or not, now holds the pushed weights. `version`: the engines' weights
        version afterwards (None: one more than before; a restore of earlier weights gives theirs)."""
        pusher = self.pusher(options)
        pusher.last_version = max(self._required_version, *self._versions)  # versions only grow
        stats = pusher.push(named_tensors, version=version)
        self._versions = [stats.weights_version] * len(self.engines)
        self._required_version = stats.weights_version
        self._stale.clear()
        return stats

    def weights_checksums(self) -> list[str]:
        import ray

        return ray.get([e.weights_checksum.remote() for e in self.engines], timeout=600)

    def sleep(self, level: int = 1) -> list[bool]:
        import ray

        return ray.get([e.sleep.remote(level) for e in self.engines], timeout=600)

    def wake_up(self) -> list[bool]:
        import ray

        return ray.get([e.wake_up.remote() for e in self.engines], timeout=600)

    def health(self, timeout_s: float = 30.0) -> list[EngineHealth]:
        """One entry per engine; a dead or unresponsive engine is reported with ok=False, not raised."""
        import ray

        refs = [e.health.remote() for e in self.engines]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                out.append(EngineHealth(False, i, self.config.model, -1, self.config.tensor_parallel_size, False, -1, repr(e)[:300]))
        return out

    def shutdown(self) -> None:
        import ray

        for engine in self.engines:
            try:
                ray.kill(engine, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.engines = []


def engine_handles(name: str, num_engines: int) -> list:
    """The actors of the EngineGroup created with `EngineGroupOptions(name=name)`, from any process
    connected to the same Ray cluster and namespace (e.g. training rank 0, which sends the weights)."""
    import ray

    return [ray.get_actor(f"{name}-{i}") for i in range(num_engines)]


def balance(requests: list[RolloutRequest], todo: list[int], sampling: SamplingOptions, num_engines: int) -> list[list[int]]:
    """Split request indices over engines, greedily by estimated tokens (prompt + n * max_tokens),
    keeping each engine's indices in request order."""
    loads = [0] * num_engines
    assignment: list[list[int]] = [[] for _ in range(num_engines)]
    for i in todo:
        request = requests[i]
        s = request.sampling or sampling
        prompt = len(request.prompt_token_ids) if request.prompt_token_ids else sum(len(str(m.get("content", ""))) // 3 for m in request.messages)
        target = loads.index(min(loads))
        assignment[target].append(i)
        loads[target] += prompt + s.n * s.max_tokens
    return assignment
