"""megarl's training step vs bare megatron-core forward/backward, same model, batch and layout.

    python benchmarks/bench_step.py                       # world 1, tiny Qwen3-MoE
    python benchmarks/bench_step.py --world 2 --tp 2      # any layout: --tp --pp --ep --cp --vpp

Both sides use the same DDP-wrapped chunks, the same micro-batches (megarl's plan, packed THD) and
the same megatron optimizer. "bare" is what a hand-written megatron loop does: fixed tensors, the
model's own fused vocab-parallel cross entropy (`labels=...`), `get_forward_backward_func`, then
`optimizer.step()`. "megarl" is `MegatronEngine.train_step` with a token-mean policy-gradient loss
on vocab-parallel log-probs (planning, batch layout, CP gather, metrics included). Prints the median
time per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def _bare_step(engine, micro_batches, pos, num_loss_tokens):
    """One step the way a plain megatron-core training loop does it."""
    import torch

    from megarl.models.forward import packed_seq_params, run_schedule

    for chunk in engine.handle.chunks:
        chunk.zero_grad_buffer()
    engine.optimizer.zero_grad()
    prepared = [(mb, mb.model_inputs(pos.cp_size, pos.cp_rank)) for mb in micro_batches]
    by_id = {id(mb): inputs for mb, inputs in prepared}

    def forward_step(model, mb, _inputs):
        inputs = by_id[id(mb)]
        psp = packed_seq_params(inputs["cu_seqlens"], inputs["max_seqlen"]) if "cu_seqlens" in inputs else None
        output = model(inputs["input_ids"], inputs["position_ids"], None, labels=inputs["labels"], packed_seq_params=psp)

        def loss_func(per_token_loss):
            loss = per_token_loss.sum() / num_loss_tokens
            return loss, torch.tensor(1, dtype=torch.int), {"loss": loss.detach().clone()}

        return output, loss_func

    run_schedule(engine.handle.chunks, [mb for mb, _ in prepared], forward_step, forward_only=False, pos=pos)
    engine.optimizer.step()


def bench(hf_dir: str, layout_kwargs: dict, steps: int, num_seqs: int, max_len: int, max_tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)  # spinning intra-op threads make timings noisy on a shared machine

    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed
    from megarl.models.batch import SequenceBatch
    from megarl.models.builder import build_megatron_model
    from megarl.models.engine import EngineOptions, MegatronEngine, MicroBatchOptions
    from megarl.models.optimizer import OptimizerOptions

    layout = ParallelLayout(**layout_kwargs)
    init_distributed(layout)
    engine = MegatronEngine(
        build_megatron_model(hf_dir, layout),
        EngineOptions(micro_batches=MicroBatchOptions(max_tokens_per_gpu=max_tokens), optimizer=OptimizerOptions(lr=1e-5, weight_decay=0.0, use_distributed_optimizer=False)),
    )
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(max_len // 4, max_len + 1, (num_seqs,), generator=gen).tolist()
    seqs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]
    batch = SequenceBatch.from_sequences(seqs, loss_mask=[[0.0] + [1.0] * (n - 1) for n in lengths])
    num_loss_tokens = float(batch.fields["loss_mask"].sum())

    def loss_fn(logprobs, entropy, mb):
        mask = mb.fields["loss_mask"]
        return -(mask * logprobs).sum() / num_loss_tokens, {}

    pos = engine.rank_position()
    micro_batches = engine.local_micro_batches(batch)
    times = {"megarl": [], "bare": []}
    for step in range(steps + 1):  # the first of each is warm-up
        for name in ("bare", "megarl"):
            torch.distributed.barrier()
            start = time.perf_counter()
            if name == "megarl":
                engine.train_step(batch, loss_fn)
            else:
                _bare_step(engine, micro_batches, pos, num_loss_tokens)
            torch.distributed.barrier()
            if step:
                times[name].append(time.perf_counter() - start)
    return {
        "megarl": statistics.median(times["megarl"]), "bare": statistics.median(times["bare"]),
        "tokens": batch.num_tokens, "micro_batches": len(micro_batches),
    }


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=1)
    for flag in ("tp", "pp", "ep", "cp"):
        parser.add_argument(f"--{flag}", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=1024, help="micro-batch token budget per GPU")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

    from megarl.testing.distributed import run_on_ranks
    from megarl.utils.tiny_models import TinyModelSpec, write_tiny_model

    layout = {"tp": args.tp, "pp": args.pp, "ep": args.ep, "cp": args.cp, "vpp": args.vpp}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_tiny_model(os.path.join(tmp, "tiny_moe"), TinyModelSpec(num_layers=args.layers))
        result = run_on_ranks(
            bench, args.world, args=(hf_dir, layout, args.steps, args.seqs, args.max_len, args.max_tokens, args.threads), timeout=900
        )[0]
    print(
        f"layout {layout} world {args.world}: {result['tokens']} tokens, {result['micro_batches']} micro-batches/rank\n"
        f"  megarl train_step            {result['megarl'] * 1e3:8.1f} ms (median of {args.steps})\n"
        f"  bare megatron fwd/bwd + step {result['bare'] * 1e3:8.1f} ms\n"
        f"  ratio megarl / bare          {result['megarl'] / result['bare']:8.3f}"
    )


if __name__ == "__main__":
    main()
