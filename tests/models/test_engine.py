"""MegatronEngine against HF transformers, at many parallel layouts (real megatron-core, gloo).

One gloo world per world size runs every layout of that size (`reset_model_parallel()` between
them). The reference is HF transformers in fp32 in this process: log-probs, entropy and one
optimizer step (AdamW + grad-norm clipping, the same loss) on the same tokens. A layout passes when
its log-probs (padded and packed, with and without temperature) are within 1e-4 of HF's, and its
training step gives the same loss (1e-5) and the same exported weights (1e-5).
"""

from __future__ import annotations

import gc
import io
import os
from typing import NamedTuple

import pytest
import torch

from megarl.models.batch import SequenceBatch
from megarl.testing.distributed import run_on_ranks

LENGTHS = (5, 17, 9, 23, 12, 7, 14, 20)
PROMPT_LEN = 3
TEMPERATURE = 0.7
LR, ADAM_EPS, CLIP = 1e-3, 1e-6, 1.0
ENTROPY_COEF, SEQ_COEF = 0.01, 0.1

# The reference step is torch AdamW without weight decay on one replica: pin what the run config's
# defaults (weight_decay 0.01, distributed optimizer) would otherwise change.
PLAIN_ADAMW = {"weight_decay": 0.0, "use_distributed_optimizer": False}
OFFLOAD_HALF = {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}
OFFLOAD_ALL_OVERLAP = {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 1.0, "overlap_cpu_optimizer_d2h_h2d": True}

class Case(NamedTuple):
    name: str
    model: str  # "2l": the tiny_moe_dir model; "4l": a 4-layer variant (VPP needs layers % (PP*VPP) == 0)
    layout: dict  # ParallelLayout kwargs
    train_packed: bool = True  # training step: THD-packed, 32-token budget (else padded, 2 sequences each)
    optimizer: dict = {}  # OptimizerOptions overrides
    build: dict = {}  # build_megatron_model kwargs


LAYOUTS_WORLD2 = [
    Case("tp1_dp2", "2l", {}),
    Case("tp2", "2l", {"tp": 2}, train_packed=False),
    Case("pp2", "2l", {"pp": 2}),
    Case("ep2", "2l", {"ep": 2}, train_packed=False),
    Case("cp2", "2l", {"cp": 2}),
    Case("pp2_vpp2", "4l", {"pp": 2, "vpp": 2}),
    Case("tp1_dp2_offload", "2l", {}, optimizer=OFFLOAD_HALF),
    Case("ep2_distopt", "2l", {"ep": 2}, train_packed=False, optimizer={"use_distributed_optimizer": True}),
    # vocab 512 padded to 768: TP rank 1 holds columns 384..767, of which 512.. are not tokens
    Case("tp2_vocab_pad", "2l", {"tp": 2}, build={"make_vocab_size_divisible_by": 384}),
]
LAYOUTS_WORLD4 = [
    Case("tp2_ep2", "2l", {"tp": 2, "ep": 2}),
    Case("tp2_pp2", "2l", {"tp": 2, "pp": 2}, train_packed=False),
    Case("pp2_ep2", "2l", {"pp": 2, "ep": 2}),
    Case("tp2_ep2_offload", "2l", {"tp": 2, "ep": 2}, optimizer=OFFLOAD_ALL_OVERLAP),
    Case("tp2_cp2", "2l", {"tp": 2, "cp": 2}),  # sequences padded to 2*CP*TP under SP
]
# an offloaded optimizer step must equal the plain one
SAME_AS = {"tp1_dp2_offload": "tp1_dp2", "ep2_distopt": "ep2", "tp2_ep2_offload": "tp2_ep2"}


def make_batch() -> SequenceBatch:
    """Unequal lengths; loss on tokens after a 3-token prompt; one advantage per sequence."""
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in LENGTHS]
    advantages = torch.randn(len(seqs), generator=gen)
    loss_mask = [[0.0] * PROMPT_LEN + [1.0] * (n - PROMPT_LEN) for n in LENGTHS]
    adv = [[float(advantages[i])] * n for i, n in enumerate(LENGTHS)]
    return SequenceBatch.from_sequences(seqs, loss_mask=loss_mask, advantages=adv)


def make_loss_fn(batch: SequenceBatch):
    """A policy-gradient token loss with an entropy bonus, plus a sequence-level term (square of
    each sequence's mean log-prob) that is only right if loss_fn sees whole sequences (CP).
    Normalised by global counts, as the engine's contract requires."""
    num_loss_tokens = float(batch.fields["loss_mask"].sum())
    num_sequences = float(len(batch))

    def loss_fn(logprobs, entropy, mb: SequenceBatch):
        mask, adv = mb.fields["loss_mask"], mb.fields["advantages"]
        token_loss = (mask * (-adv * logprobs - ENTROPY_COEF * entropy)).sum() / num_loss_tokens
        seq_mean = (mask * logprobs).sum(1) / mask.sum(1)
        seq_loss = SEQ_COEF * (seq_mean**2).sum() / num_sequences
        return token_loss + seq_loss, {"loss_tokens": mask.sum(), "seq_loss": seq_loss.detach()}

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Reference: HF transformers, fp32, one sequence at a time (no padding at all).


def hf_token_scores(model, batch: SequenceBatch, temperature: float = 1.0):
    """Token-aligned log-probs and entropy `[B, S]`, like the engine's."""
    logprobs = torch.zeros(batch.input_ids.shape)
    entropy = torch.zeros(batch.input_ids.shape)
    for i, n in enumerate(batch.lengths.tolist()):
        ids = batch.input_ids[i, :n]
        logits = model(ids[None]).logits[0, :-1].float() / temperature
        log_softmax = torch.log_softmax(logits, dim=-1)
        logprobs[i, 1:n] = log_softmax.gather(-1, ids[1:, None])[:, 0]
        entropy[i, 1:n] = -(log_softmax.exp() * log_softmax).sum(-1)
    return logprobs, entropy


@pytest.fixture(scope="module")
def model_dirs(tiny_moe_dir, tmp_path_factory):
    from megarl.utils.tiny_models import TinyModelSpec, write_tiny_model

    four_layers = write_tiny_model(str(tmp_path_factory.mktemp("tiny_moe_4l")), TinyModelSpec(num_layers=4))
    return {"2l": tiny_moe_dir, "4l": four_layers}


@pytest.fixture(scope="module")
def hf_reference(model_dirs, tmp_path_factory):
    return {key: hf_reference_for(path, tmp_path_factory) for key, path in model_dirs.items()}


def hf_reference_for(tiny_moe_dir, tmp_path_factory):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    batch = make_batch()
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32)
    with torch.no_grad():
        logprobs_t, _ = hf_token_scores(model, batch, TEMPERATURE)
    logprobs, entropy = hf_token_scores(model, batch)
    loss, metrics = make_loss_fn(batch)(logprobs, entropy, batch)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.0).step()
    out = str(tmp_path_factory.mktemp("hf_after_step"))
    model.save_pretrained(out)  # on-disk (hub) names, as export_hf_weights yields them
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    weights = {k: v for f in files for k, v in load_file(os.path.join(out, f)).items()}
    before = {k: v for f in os.listdir(tiny_moe_dir) if f.endswith(".safetensors")
              for k, v in load_file(os.path.join(tiny_moe_dir, f)).items()}
    return {
        "logprobs": logprobs.detach(), "entropy": entropy.detach(), "logprobs_t": logprobs_t,
        "loss": float(loss), "grad_norm": float(grad_norm), "metrics": {k: float(v) for k, v in metrics.items()},
        "weights": weights, "weights_before": before,
    }


# ---------------------------------------------------------------------------------------------
# Ranks: every layout of one world size in one launch.


def run_layouts(model_dirs: dict, layouts: list, extra_checks: bool = False, router_runs=None) -> bytes:
    """Per-layout results, torch.save'd: tensors sent through the rank queue as they are would be
    shared-memory handles that die with the rank process. `extra_checks` adds, at TP1/DP2: the
    learning rates of 5 steps with warmup + cosine decay ("_schedule"), and two bf16 steps with the
    distributed optimizer, without and with half the optimizer offloaded ("_bf16_offload")."""
    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.models.builder import build_megatron_model
    from megarl.models.engine import EngineOptions, MegatronEngine, MicroBatchOptions
    from megarl.models.optimizer import OptimizerOptions, offloaded_fraction

    batch = make_batch()
    results = {}
    for case in layouts:
        name = case.name
        layout = ParallelLayout(**case.layout)
        init_distributed(layout)
        engine = MegatronEngine(
            build_megatron_model(model_dirs[case.model], layout, **case.build),
            EngineOptions(
                micro_batches=MicroBatchOptions(max_tokens_per_gpu=32),
                optimizer=OptimizerOptions(**{**PLAIN_ADAMW, "lr": LR, "adam_eps": ADAM_EPS, "clip_grad": CLIP, **case.optimizer}),
            ),
        )
        logprobs, entropy = engine.forward_logprobs(batch, with_entropy=True)
        padded, _ = engine.forward_logprobs(batch, micro_batches=MicroBatchOptions(micro_batch_size=2, packed=False))
        logprobs_t, _ = engine.forward_logprobs(batch, temperature=TEMPERATURE)
        step = engine.train_step(
            batch, make_loss_fn(batch), with_entropy=True,
            micro_batches=(
                MicroBatchOptions(max_tokens_per_gpu=32) if case.train_packed
                else MicroBatchOptions(micro_batch_size=2, packed=False)
            ),
        )
        weights = {k: v.clone() for k, v in engine.export_hf_weights()}
        results[name] = {
            "logprobs": logprobs, "entropy": entropy, "padded": padded, "logprobs_t": logprobs_t,
            "step": step, "weights": weights if torch.distributed.get_rank() == 0 else None,
            "offloaded": offloaded_fraction(engine.optimizer),
            "model_vocab": engine.handle.unwrapped_chunks()[0].vocab_size,
        }
        del engine
        gc.collect()
        reset_model_parallel()
    if extra_checks:
        layout = ParallelLayout()
        init_distributed(layout)
        schedule = OptimizerOptions(lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=4, lr_decay_style="cosine",
                                    **PLAIN_ADAMW)
        engine = MegatronEngine(build_megatron_model(model_dirs["2l"], layout), EngineOptions(optimizer=schedule))
        small = batch.select([0, 1])
        results["_schedule"] = [engine.train_step(small, make_loss_fn(small), with_entropy=True).lr for _ in range(5)]
        del engine
        results["_bf16_offload"] = {}
        for offload in (False, True):
            options = OptimizerOptions(lr=LR, adam_eps=ADAM_EPS, bf16=True, use_distributed_optimizer=True, weight_decay=0.0,
                                       optimizer_cpu_offload=offload, optimizer_offload_fraction=0.5)
            handle = build_megatron_model(model_dirs["2l"], layout, dtype=torch.bfloat16)
            engine = MegatronEngine(handle, EngineOptions(micro_batches=MicroBatchOptions(max_tokens_per_gpu=32), optimizer=options))
            losses = [engine.train_step(batch, make_loss_fn(batch), with_entropy=True).loss for _ in range(2)]
            results["_bf16_offload"][offload] = {
                "losses": losses, "offloaded": offloaded_fraction(engine.optimizer),
                "weights": {k: v.float().clone() for k, v in engine.export_hf_weights()},
            }
            del engine, handle
        reset_model_parallel()
        results["_router_losses"] = router_loss_grad_norms(model_dirs["2l"])
    if router_runs:
        aux_only = {**ROUTER_LOSSES, "moe_z_loss_coeff": None}
        results["_router_losses"] = router_loss_grad_norms(model_dirs["2l"], router_runs, aux_only)
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


ROUTER_LOSSES = {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1.0, "moe_z_loss_coeff": 0.1}


def router_loss_grad_norms(hf_dir: str, runs=None, overrides=ROUTER_LOSSES) -> dict:
    """Grad norms of one step with large MoE aux and z losses on copies of the same two sequences:
    PP2 (DP1) with [A, B] in one micro-batch, DP2 with [A, B] x 2 (one micro-batch per rank) and
    DP2 with [A, B] x 4 (two per rank). The main loss is globally normalised, so all three are equal
    exactly when the router losses are averaged over micro-batches and DP ranks (megatron's scale).
    (Not TP: under sequence parallelism megatron's z-loss averages per TP rank, which is exact only
    when the ranks hold equally many real tokens.)"""
    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.models.builder import build_megatron_model
    from megarl.models.engine import EngineOptions, MegatronEngine, MicroBatchOptions
    from megarl.models.optimizer import OptimizerOptions

    pair = make_batch().select([1, 4])
    norms = {}
    runs = runs or (("pp2_x1", {"pp": 2}, 1), ("dp2_x2", {}, 2), ("dp2_x4", {}, 4))
    for name, layout_kwargs, copies in runs:
        layout = ParallelLayout(**layout_kwargs)
        init_distributed(layout)
        engine = MegatronEngine(
            build_megatron_model(hf_dir, layout, config_overrides=overrides),
            EngineOptions(micro_batches=MicroBatchOptions(micro_batch_size=2, packed=False), optimizer=OptimizerOptions(lr=LR, **PLAIN_ADAMW)),
        )
        batch = pair.select([0, 1] * copies)
        num_tokens = float(batch.num_tokens)
        step = engine.train_step(batch, lambda lp, ent, mb: (-lp.sum() / num_tokens, {}))
        norms[name] = (step.grad_norm, step.num_micro_batches)
        del engine
        reset_model_parallel()
    return norms


def load_results(per_rank: list[bytes]) -> list[dict]:
    return [torch.load(io.BytesIO(blob), weights_only=False) for blob in per_rank]


def check_layouts(per_rank: list[dict], refs: dict, layouts: list) -> None:
    rows = []
    for case in layouts:
        name, ref = case.name, refs[case.model]
        got = per_rank[0][name]
        for other in per_rank[1:]:  # results are identical on every rank
            assert torch.equal(other[name]["logprobs"], got["logprobs"]), name
            assert other[name]["step"].loss == got["step"].loss, name
        diffs = {
            "logprobs": (got["logprobs"] - ref["logprobs"]).abs().max().item(),
            "padded": (got["padded"] - ref["logprobs"]).abs().max().item(),
            "temperature": (got["logprobs_t"] - ref["logprobs_t"]).abs().max().item(),
            "entropy": (got["entropy"] - ref["entropy"]).abs().max().item(),
            "loss": abs(got["step"].loss - ref["loss"]),
            "grad_norm": abs(got["step"].grad_norm - ref["grad_norm"]),
            "weights": max((got["weights"][k] - ref["weights"][k]).abs().max().item() for k in ref["weights"]),
        }
        rows.append((name, diffs, got))
        print(f"{name:8} " + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    for name, plain in SAME_AS.items():
        if name in per_rank[0]:
            a, b = per_rank[0][name], per_rank[0][plain]
            diff = max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"])
            print(f"{name} vs {plain}: weights {diff:.2e} loss {abs(a['step'].loss - b['step'].loss):.2e}")
            assert diff <= 1e-6 and abs(a["step"].loss - b["step"].loss) <= 1e-6, (name, diff)
    for case in layouts:
        name, optimizer_kwargs = case.name, case.optimizer
        fraction = optimizer_kwargs.get("optimizer_offload_fraction", 0.0) if optimizer_kwargs.get("optimizer_cpu_offload") else 0.0
        offloaded = [r[name]["offloaded"] for r in per_rank]
        # megatron offloads whole parameters until the fraction is reached
        assert all(fraction <= o < fraction + 0.35 if fraction else o == 0.0 for o in offloaded), (name, offloaded)
    for (name, diffs, got), case in zip(rows, layouts):
        ref = refs[case.model]
        assert set(got["weights"]) == set(ref["weights"]), name
        for key in ("logprobs", "padded", "temperature", "entropy"):
            assert diffs[key] <= 1e-4, (name, key, diffs[key])
        assert diffs["loss"] <= 1e-5 and diffs["weights"] <= 1e-5, (name, diffs)
        assert diffs["grad_norm"] <= 1e-4 * max(1.0, ref["grad_norm"]), (name, diffs)
        assert got["step"].metrics["loss_tokens"] == ref["metrics"]["loss_tokens"]
        assert abs(got["step"].metrics["seq_loss"] - ref["metrics"]["seq_loss"]) <= 1e-6
        assert got["step"].lr == LR and got["step"].update_successful
        assert got["step"].num_micro_batches >= 2  # gradient accumulation is exercised
        assert got["model_vocab"] == (768 if "make_vocab_size_divisible_by" in case.build else 512)


def test_reference_step_moves_weights(hf_reference):
    """Guard for the tolerance: the step changes weights by far more than 1e-5."""
    for ref in hf_reference.values():
        moved = max((ref["weights"][k] - v).abs().max().item() for k, v in ref["weights_before"].items())
        assert moved > 5e-4
        assert ref["grad_norm"] > CLIP  # clipping is exercised


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_layouts_world2_match_hf(model_dirs, hf_reference):
    per_rank = load_results(run_on_ranks(run_layouts, 2, args=(model_dirs, LAYOUTS_WORLD2, True), timeout=360))
    check_layouts(per_rank, hf_reference, LAYOUTS_WORLD2)
    # megatron's OptimizerParamScheduler: linear warmup from 0 over 2 steps, cosine to min_lr at step 4
    assert per_rank[0]["_schedule"] == pytest.approx([0.0, 5e-4, 1e-3, 5.5e-4, 1e-4], abs=1e-12)
    # bf16 + distributed optimizer (the usual GPU setting): offloading half the update to host
    # memory gives the same steps
    plain, offloaded = per_rank[0]["_bf16_offload"][False], per_rank[0]["_bf16_offload"][True]
    diff = max((plain["weights"][k] - offloaded["weights"][k]).abs().max().item() for k in plain["weights"])
    print(f"bf16 distopt offload vs plain: weights {diff:.2e} losses {plain['losses']} {offloaded['losses']}")
    assert plain["offloaded"] == 0.0 and 0.5 <= offloaded["offloaded"] < 0.85
    assert diff <= 1e-6 and offloaded["losses"] == pytest.approx(plain["losses"], abs=1e-6)
    norms = per_rank[0]["_router_losses"]
    print(f"grad norms with MoE aux + z losses: {norms}")
    assert [n[1] for n in norms.values()] == [1, 1, 2]
    reference = norms["pp2_x1"][0]
    assert all(abs(n[0] - reference) <= 1e-5 * reference for n in norms.values()), norms


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_layouts_world4_match_hf(model_dirs, hf_reference):
    # aux loss with TP + SP + PP: the padding mask reaches the second stage split like the hidden
    # states; [A, B] x 2 is one micro-batch per DP rank at PP2 and two micro-batches at TP2 x PP2.
    router_runs = (("pp2_dp2", {"pp": 2}, 2), ("tp2_pp2", {"tp": 2, "pp": 2}, 2))
    per_rank = load_results(run_on_ranks(run_layouts, 4, args=(model_dirs, LAYOUTS_WORLD4, False, router_runs), timeout=360))
    check_layouts(per_rank, hf_reference, LAYOUTS_WORLD4)
    norms = per_rank[0]["_router_losses"]
    print(f"grad norms with MoE aux loss: {norms}")
    assert abs(norms["tp2_pp2"][0] - norms["pp2_dp2"][0]) <= 1e-5 * norms["pp2_dp2"][0], norms
