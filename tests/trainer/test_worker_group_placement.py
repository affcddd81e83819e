"""`RayWorkerGroup` gives each rank torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE (index among the
group's ranks on its node) and the device index within the actor's visible GPUs — on a Ray cluster
of 2 fake nodes × 4 fake GPUs (`ray.cluster_utils.Cluster`, GPUs declared as resources).

That cluster is its own Ray instance in a subprocess, so the session's shared Ray (tests/conftest.py
`ray_session`) is neither joined nor shut down by this test.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from megarl.trainer.worker_group import node_local_ranks

pytestmark = [pytest.mark.timeout(400)]


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import ray
    from ray.cluster_utils import Cluster

    from megarl.trainer.worker_group import RayWorkerGroup

    class Probe:
        def __init__(self):
            from megarl.distributed.init import local_device_index

            self.seen = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES")}
            self.seen["device_index"] = local_device_index()
            self.seen["node"] = ray.get_runtime_context().get_node_id()

        def report(self):
            return self.seen

    small = {"num_cpus": 4, "num_gpus": 4, "object_store_memory": 80 * 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=small, shutdown_at_exit=True)
    cluster.add_node(**small)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    group = RayWorkerGroup(Probe, 8, num_cpus_per_rank=0.5, num_gpus_per_rank=1, timeout_s=300)
    print("RESULT " + json.dumps(group.all.report()))
    group.shutdown()
    ray.shutdown()
    cluster.shutdown()
""")


def test_node_local_ranks_follow_nodes_in_rank_order():
    assert node_local_ranks(["a", "a", "b", "a", "b"]) == [(0, 3), (1, 3), (0, 2), (2, 3), (1, 2)]


@pytest.mark.slow  # two raylets start on 2 shared cores: ~2.5 min
def test_local_rank_and_device_index_on_two_fake_nodes_of_four_gpus():
    # Ray's socket paths must stay under 107 bytes: a short folder outside the deep work tree.
    temp = tempfile.mkdtemp(prefix="megarl_fakegpu_", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = temp
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=360)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"probe failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    ranks = json.loads(lines[0][len("RESULT "):])
    by_node: dict[str, list[dict]] = {}
    for r in ranks:
        by_node.setdefault(r["node"], []).append(r)
    assert sorted(len(v) for v in by_node.values()) == [4, 4]
    for members in by_node.values():
        assert [int(m["LOCAL_RANK"]) for m in members] == [0, 1, 2, 3]  # in global rank order
        assert {m["LOCAL_WORLD_SIZE"] for m in members} == {"4"}
        # Ray narrows each actor's CUDA_VISIBLE_DEVICES to its own GPU: device index 0, not LOCAL_RANK
        assert sorted(m["CUDA_VISIBLE_DEVICES"] for m in members) == ["0", "1", "2", "3"]
        assert [m["device_index"] for m in members] == [0, 0, 0, 0]
    assert [int(r["RANK"]) for r in ranks] == list(range(8))
