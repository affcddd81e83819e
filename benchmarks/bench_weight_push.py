"""Weight push throughput: trainer tensors → vLLM engine (Ray actor) over the Ray object store,
against a plain memcpy of the same bytes measured in the same run.

    python benchmarks/bench_weight_push.py [--bucket-mb 512] [--repeats 3] [--hidden 1024 --layers 8 --experts 16]

Writes a random Qwen3-MoE (default ≈ 225M parameters, fp32 ≈ 0.9 GB) with
megarl.utils.tiny_models.write_tiny_model, starts one engine, pushes the checkpoint's tensors
(as a trainer would hold them) `--repeats` times, and prints push GB/s (bytes / wall time from
begin to finish, all engines loaded), memcpy GB/s and their ratio (goal >= 0.8), plus where the
push time goes (sender ray.put, engine load, vLLM finish).

    python benchmarks/bench_weight_push.py --layout pp2ep2 [--repeats 3]

Megatron → vLLM at world 4 (gloo ranks, one engine): builds the model sharded at the layout
(pp2ep2 = PP2×EP2, tp2pp2 = TP2×PP2), then pushes it alternately along today's path (per-tensor
export, every tensor broadcast over PP, rank 0 sends everything) and the staged one (one sender
per pipeline stage, gathers batched per bucket), and prints both times, the bytes each rank
received against its own stage's bytes, the collectives, and the speed-up ratio. Default model
for this mode: hidden 256, 4 layers, 8 experts (override with the flags).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


LAYOUTS = {"pp2ep2": {"pp": 2, "ep": 2}, "tp2pp2": {"tp": 2, "pp": 2, "sequence_parallel": True}}
ENGINE_NAME = "megarl-bench-push"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bucket-mb", type=float, default=512.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=None, help="default 1024 (256 with --layout)")
    p.add_argument("--layers", type=int, default=None, help="default 8 (4 with --layout)")
    p.add_argument("--experts", type=int, default=None, help="default 16 (8 with --layout)")
    p.add_argument("--moe-intermediate", type=int, default=None, help="default 512 (256 with --layout)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default=None,
                   help="Megatron world 4 at this layout: today's push vs one sender per stage")
    p.add_argument("--verify", default="none", choices=["none", "digest", "checksum", "all"])
    p.add_argument("--inflight", type=int, nargs="+", default=[1, 2], help="max_inflight_buckets values to measure")
    args = p.parse_args()
    small = args.layout is not None
    for name, full, reduced in (("hidden", 1024, 256), ("layers", 8, 4), ("experts", 16, 8), ("moe_intermediate", 512, 256)):
        if getattr(args, name) is None:
            setattr(args, name, reduced if small else full)
    return args


def memcpy_gbps(tensors, repeats: int) -> float:
    """One pass copying every tensor into a preallocated destination (torch copy_, single process)."""
    import torch

    dst = [torch.empty_like(t) for t in tensors]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for d, t in zip(dst, tensors):
            d.copy_(t)
        times.append(time.perf_counter() - start)
    return nbytes / 1e9 / min(times)


def main() -> None:
    args = parse_args()
    from megarl.rollout.vllm_engine import runtime_dir

    os.environ.setdefault("TMPDIR", os.path.join(runtime_dir(), "tmp"))
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    from safetensors.torch import load_file

    from megarl.rollout import EngineGroup, EngineGroupOptions, VLLMEngineConfig, init_ray
    from megarl.rollout.weight_sync import WeightPushOptions
    from megarl.utils.tiny_models import TinyModelSpec, write_tiny_model

    spec = TinyModelSpec(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 256),
        head_dim=64, num_experts=args.experts, experts_per_token=2, moe_intermediate_size=args.moe_intermediate,
        intermediate_size=4 * args.hidden, init_std=0.02,
    )
    model_dir = os.path.join(runtime_dir(), "bench", f"qwen3_moe_h{args.hidden}_l{args.layers}_e{args.experts}_m{args.moe_intermediate}")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        write_tiny_model(model_dir, spec)
    weights = sorted(load_file(os.path.join(model_dir, "model.safetensors")).items())
    params = sum(t.numel() for _, t in weights)
    nbytes = sum(t.numel() * t.element_size() for _, t in weights)
    print(f"model: {params / 1e6:.0f}M parameters, {nbytes / 1e9:.3f} GB fp32, {len(weights)} tensors")

    init_ray()
    if args.layout:
        return compare_layout(args, model_dir, EngineGroup, EngineGroupOptions, VLLMEngineConfig)
    group = EngineGroup(
        VLLMEngineConfig.for_cpu_tests(model_dir, max_model_len=256),
        EngineGroupOptions(num_engines=1, engine_cpus=1.0, start_timeout_s=900),
    )
    copy = memcpy_gbps([t for _, t in weights], args.repeats)
    print(f"memcpy (torch copy_, same tensors): {copy:.2f} GB/s")
    for inflight in args.inflight:
        options = WeightPushOptions(bucket_mb=args.bucket_mb, verify=args.verify, max_inflight_buckets=inflight)
        group.push_weights(iter(weights), options)  # warm-up: first touch of the shared-memory pages
        pushes = [group.push_weights(iter(weights), options) for _ in range(args.repeats)]
        best = min(pushes, key=lambda s: s.seconds)
        push_gbps = nbytes / 1e9 / best.seconds
        print(f"push (object_store, bucket {args.bucket_mb:g} MiB, {best.buckets} buckets, inflight {inflight}): "
              f"best {best.seconds:.3f} s, median {statistics.median(s.seconds for s in pushes):.3f} s -> {push_gbps:.2f} GB/s")
        print(f"  of which sender ray.put {best.send_seconds:.3f} s, engine load {best.engine_load_seconds:.3f} s, "
              f"vLLM finish {best.finish_seconds:.3f} s")
        print(f"  ratio push / memcpy: {push_gbps / copy:.2f}  (goal >= 0.8)")
    group.shutdown()


def push_both_ways(model_dir: str, gcs_address: str, layout: dict, bucket_mb: float, repeats: int):
    """On each gloo rank: the model at `layout`, then today's push and the staged push, alternately."""
    import torch

    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed
    from megarl.models.builder import build_megatron_model
    from megarl.rollout import engine_handles, init_ray
    from megarl.rollout.weight_sync import WeightPushOptions
    from megarl.rollout.weight_sync.staged import MegatronWeightPush

    init_ray(address=gcs_address)
    engines = engine_handles(ENGINE_NAME, 1)
    init_distributed(ParallelLayout(**layout))
    handle = build_megatron_model(model_dir, ParallelLayout(**layout))
    rank = torch.distributed.get_rank()
    options = WeightPushOptions(bucket_mb=bucket_mb)
    paths = {"today": MegatronWeightPush(handle, engines if rank == 0 else None, options),
             "staged": MegatronWeightPush(handle, engines, options)}
    assert not paths["today"].by_stage and paths["staged"].by_stage
    results = {name: [] for name in paths}
    for _ in range(repeats + 1):  # the first round warms both up
        for name, path in paths.items():
            results[name].append(path.push())
    return {name: runs[1:] for name, runs in results.items()} if rank == 0 else None


def compare_layout(args, model_dir, EngineGroup, EngineGroupOptions, VLLMEngineConfig) -> None:
    import ray

    from megarl.testing.distributed import run_on_ranks

    group = EngineGroup(
        VLLMEngineConfig.for_cpu_tests(model_dir, max_model_len=256),
        EngineGroupOptions(num_engines=1, engine_cpus=0.5, name=ENGINE_NAME, start_timeout_s=900),
    )
    try:
        gcs = ray.get_runtime_context().gcs_address
        results = run_on_ranks(push_both_ways, world_size=4, timeout=3600,
                               args=(model_dir, gcs, LAYOUTS[args.layout], args.bucket_mb, args.repeats))[0]
    finally:
        group.shutdown()
    best = {}
    for name, runs in results.items():
        fastest = min(runs, key=lambda m: m["weight_push/seconds"])
        best[name] = fastest["weight_push/seconds"]
        received = fastest.get("weight_push/max_received_gbytes", fastest.get("weight_push/rank0_received_gbytes"))
        line = (f"{args.layout} {name:6s}: best {best[name]:.3f} s of {len(runs)} "
                f"({fastest['weight_push/gbytes']:.3f} GB, {fastest['weight_push/buckets']} buckets, "
                f"{fastest['weight_push/tensors']} tensors); most bytes received by one rank {received:.4f} GB")
        if "weight_push/max_received_over_stage_bytes" in fastest:
            line += (f" = {fastest['weight_push/max_received_over_stage_bytes']:.3f} x its stage; "
                     f"{fastest['weight_push/senders']} senders, {fastest['weight_push/sender_collectives']} gathers per rank")
        print(line)
    print(f"{args.layout}: staged push is {best['today'] / best['staged']:.2f}x faster than today's (time ratio today / staged)")


if __name__ == "__main__":
    main()
