"""An engine killed mid-rollout: a clear error (on_engine_failure="fail", naming the config option that
restarts) or a restart and retry ("restart", at most max_restarts times), within a bounded time; a slow engine gives a timeout error; a restarted engine that missed a weight push is not used until
the next push. Uses its own one-engine group so the shared engine is never killed."""

import threading
import time
from dataclasses import replace

import pytest

from megarl.rollout import EngineDiedError, EngineGroup, EngineTimeoutError, EngineGroupOptions, RolloutRequest, SamplingOptions, VLLMEngineConfig
from tests.rollout.reference import checkpoint_state_dict

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

# Long enough (several seconds on 2 cores) that a kill after 2 s lands mid-generation.
LONG = SamplingOptions(n=4, max_tokens=800, ignore_eos=True, seed=1)
REQUESTS = [RolloutRequest(prompt_token_ids=[5 + i, 6, 7]) for i in range(4)]
SHORT = SamplingOptions(n=2, max_tokens=8, seed=4)


def kill_soon(group: EngineGroup, seconds: float = 2.0) -> None:
    import ray

    victim = group.engines[0]
    threading.Timer(seconds, lambda: ray.kill(victim, no_restart=True)).start()


def test_killed_engine_raises_or_restarts_and_retries(ray_cluster, tiny_moe_dir):
    options = EngineGroupOptions(num_engines=1, engine_cpus=0.5, generate_timeout_s=240, start_timeout_s=300)
    group = EngineGroup(VLLMEngineConfig.for_cpu_tests(tiny_moe_dir), options)
    try:
        reference = group.generate(REQUESTS[:1], SHORT)[0]
        first_pid = group.health()[0].pid

        kill_soon(group)
        start = time.monotonic()
        with pytest.raises(EngineDiedError, match=r"engine 0 died during generate .*set rollout\.on_engine_failure=restart "):
            group.generate(REQUESTS, LONG)
        assert time.monotonic() - start < 30
        health = group.health(timeout_s=10)[0]
        assert not health.ok and health.pid == -1

        # With "restart" the dead engine is replaced and its requests retried inside generate.
        group.options = replace(options, on_engine_failure="restart", max_restarts=2)
        results = group.generate(REQUESTS, LONG)
        assert [len(r) for r in results] == [4] * 4 and all(len(s.token_ids) == 800 for r in results for s in r)
        assert group.restarts == 1
        assert group.health()[0].pid not in (first_pid, -1)
        assert [s.token_ids for s in group.generate(REQUESTS[:1], SHORT)[0]] == [s.token_ids for s in reference]

        # After a push, a restarted engine holds the checkpoint, not the pushed weights: refused.
        assert group.push_weights(iter(checkpoint_state_dict(tiny_moe_dir).items())).weights_version == 1
        kill_soon(group)
        with pytest.raises(EngineDiedError, match=r"no engine holds the current weights \(version 1\)"):
            group.generate(REQUESTS, LONG)
        # the next push is version 2 although the fresh engine reported 0: versions only grow
        assert group.push_weights(iter(checkpoint_state_dict(tiny_moe_dir).items())).weights_version == 2
        assert [s.token_ids for s in group.generate(REQUESTS[:1], SHORT)[0]] == [s.token_ids for s in reference]
        assert group.restarts == 2


        # An engine that does not answer in time: EngineTimeoutError after generate_timeout_s.
        group.options = replace(options, generate_timeout_s=1.0)
        start = time.monotonic()
        with pytest.raises(EngineTimeoutError, match=r"engines \[0\] did not finish generate within 1 s"):
            group.generate(REQUESTS, LONG)
        assert time.monotonic() - start < 10

        # The restart budget is spent: the next death fails, naming the option that bounds it.
        group.options = replace(options, on_engine_failure="restart", max_restarts=2)
        kill_soon(group)
        with pytest.raises(EngineDiedError, match=r"the 2 engine restarts allowed \(rollout\.max_engine_restarts=2\) are used up"):
            group.generate(REQUESTS, LONG)
    finally:
        group.shutdown()
