"""One sender per pipeline stage (`export_stage_hf_weights`), gloo world 4, PP2×EP2 and TP2×PP2:

- the stage senders together yield every HF tensor of the checkpoint exactly once, each
  torch.equal to what the per-tensor exporter (`export_hf_weights`) yields;
- no rank receives another stage's bytes: received bytes ≤ its own stage's HF bytes (× 1.05, the
  acceptance bound; the exact figure is the stage's non-local share), while the per-tensor exporter
  makes rank 0 receive the other stage's tensors too (the negative control);
- collectives are batched per bucket: at most 2 gathers per bucket (TP, EP) per rank;
- the planner's sync model predicts each sender's HF bytes and received bytes exactly.
"""

from __future__ import annotations

import pytest
import torch

from megarl.testing.distributed import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

LAYOUTS = [("pp2ep2", {"pp": 2, "ep": 2}), ("tp2pp2", {"tp": 2, "pp": 2, "sequence_parallel": True})]
BUCKET_BYTES = 64 * 1024


def export_both_ways(model_dir: str) -> dict:
    from megatron.core import parallel_state as ps

    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.models.builder import build_megatron_model
    from megarl.models.export import export_hf_weights
    from megarl.models.stage_export import ExportTraffic, export_stage_hf_weights, is_stage_sender

    out = {}
    for name, kwargs in LAYOUTS:
        init_distributed(ParallelLayout(**kwargs))
        handle = build_megatron_model(model_dir, ParallelLayout(**kwargs))
        old, new = ExportTraffic(), ExportTraffic()
        old_tensors = dict(export_hf_weights(handle, traffic=old))
        names, tensors = [], {}
        for hf_name, tensor in export_stage_hf_weights(handle, BUCKET_BYTES, new):
            names.append(hf_name)
            tensors[hf_name] = tensor
        out[name] = {
            "pp_rank": ps.get_pipeline_model_parallel_rank(), "sender": is_stage_sender(handle),
            "old": old, "new": new, "names": names, "tensors": tensors,
            "old_tensors": old_tensors if torch.distributed.get_rank() == 0 else None,
            "local_bytes": sum(p.numel() * p.element_size() for c in handle.chunks for p in c.parameters()),
            "sizes": {"tp": handle.bridge.mpu.tp_size, "pp": handle.bridge.mpu.pp_size,
                      "ep": handle.bridge.mpu.ep_size, "etp": handle.bridge.mpu.etp_size},
        }
        del handle
        reset_model_parallel()
    return out


@pytest.fixture(scope="module")
def per_rank(tiny_moe_dir):
    return run_on_ranks(export_both_ways, world_size=4, args=(tiny_moe_dir,), timeout=540)


@pytest.mark.parametrize("layout", [name for name, _ in LAYOUTS])
def test_stage_senders_yield_each_tensor_once_and_receive_only_their_stage(per_rank, layout, tiny_moe_dir):
    from tests.rollout.reference import checkpoint_state_dict

    ranks = [r[layout] for r in per_rank]
    checkpoint = checkpoint_state_dict(tiny_moe_dir)
    senders = [r for r in ranks if r["sender"]]
    assert sorted(r["pp_rank"] for r in senders) == [0, 1]
    all_names = [n for r in senders for n in r["names"]]
    assert len(all_names) == len(set(all_names)) == len(checkpoint) and set(all_names) == set(checkpoint)
    reference = ranks[0]["old_tensors"]
    for r in senders:
        for hf_name, tensor in r["tensors"].items():
            assert torch.equal(tensor, reference[hf_name]), f"{layout}: {hf_name} differs from the per-tensor export"
    for r in ranks:
        assert not r["names"] or r["sender"]
    stage_bytes = {r["pp_rank"]: r["new"].hf_bytes for r in senders}
    assert sum(stage_bytes.values()) == sum(t.numel() * t.element_size() for t in checkpoint.values())
    for rank, r in enumerate(ranks):
        received = r["new"].bytes_received
        assert received <= stage_bytes[r["pp_rank"]] * 1.05, f"{layout} rank {rank}: {received} B > own stage"
        if not r["sender"]:
            assert received == 0, f"{layout} rank {rank} is no sender but received {received} B"
    sender0 = next(r for r in senders if r["pp_rank"] == 0)
    # The per-tensor exporter makes global rank 0 receive stage 1's tensors: more than its stage.
    assert ranks[0]["old"].bytes_received > stage_bytes[0] * 1.05
    buckets = -(-max(r["local_bytes"] for r in ranks) // BUCKET_BYTES)
    assert 0 < sender0["new"].collectives <= 2 * (buckets + 8)  # per bucket ≤ 1 TP + 1 EP gather (+ cut slack)
    assert sender0["new"].collectives * 5 < ranks[0]["old"].collectives
    # The planner's sync model predicts the same bytes from config.json and the layout alone.
    from megarl.planner.memory import ParallelSizes
    from megarl.planner.model_stats import ModelStats, load_hf_config
    from megarl.planner.sync_model import stage_sync_bytes

    sizes = ranks[0]["sizes"]
    par = ParallelSizes(cp=1, vpp=None, sequence_parallel=sizes["tp"] > 1, train_gpus=4, **sizes)
    modelled = stage_sync_bytes(ModelStats.from_hf_config(load_hf_config(tiny_moe_dir)), par, bytes_per_param=4)
    measured = [(stage_bytes[s], next(r["new"].bytes_received for r in senders if r["pp_rank"] == s)) for s in (0, 1)]
    assert modelled == measured, f"{layout}: sync model {modelled} != real push {measured}"
    print(f"{layout}: stage bytes {stage_bytes}; received per rank new {[r['new'].bytes_received for r in ranks]}, "
          f"old {[r['old'].bytes_received for r in ranks]}; collectives new {[r['new'].collectives for r in ranks]}, "
          f"old {[r['old'].collectives for r in ranks]}")
