"""The Megatron critic (value head) against HF transformers' *ForTokenClassification, and its
parallel layouts against each other.

Reference: Qwen3MoeForTokenClassification (num_labels=1) on the tiny MoE, fp32, one sequence at a
time; one clipped value-loss step with grad clipping and AdamW. Every layout must give the same
values, value loss and weights after the step (exported under HF names, `score.*` included).
"""

from __future__ import annotations

import gc
import io
import os

import pytest
import torch

from megarl.models.batch import SequenceBatch
from megarl.testing.distributed import run_on_ranks

LENGTHS = (5, 17, 9, 23, 12, 7, 14, 20)
PROMPT_LEN = 3
LR, ADAM_EPS, CLIP, CLIPRANGE = 1e-3, 1e-6, 1.0, 0.2
LAYOUTS = {"tp1_dp2": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}, "cp2": {"cp": 2}, "ep2": {"ep": 2},
           "tp1_dp2_offload": {}}
# the critic's own optimizer options: half its Adam states on the host must give the same step
OPTIMIZER = {"tp1_dp2_offload": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}}


def make_batch() -> SequenceBatch:
    """Returns in [0, 1] on the response tokens; old values shifted so that value clipping bites."""
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in LENGTHS]
    loss_mask = [[0.0] * PROMPT_LEN + [1.0] * (n - PROMPT_LEN) for n in LENGTHS]
    returns = [torch.rand(n, generator=gen).tolist() for n in LENGTHS]
    old_shift = [(torch.rand(n, generator=gen) - 0.5).tolist() for n in LENGTHS]
    return SequenceBatch.from_sequences(seqs, loss_mask=loss_mask, returns=returns, old_shift=old_shift)


def hf_values(model, batch: SequenceBatch) -> torch.Tensor:
    """Token-aligned `[B, S]`: position t holds the head's output at position t-1."""
    values = torch.zeros(batch.input_ids.shape)
    for i, n in enumerate(batch.lengths.tolist()):
        values[i, 1:n] = model(batch.input_ids[i, :n][None]).logits[0, :-1, 0].float()
    return values


def value_step_inputs(batch: SequenceBatch, values: torch.Tensor) -> SequenceBatch:
    """old_values = the current values shifted by a fixed amount (masked positions only)."""
    mask = batch.fields["loss_mask"]
    return batch.with_fields(old_values=(values.detach() + batch.fields["old_shift"]) * mask)


@pytest.fixture(scope="module")
def critic_dir(tiny_moe_dir, tmp_path_factory):
    """An HF critic folder: the tiny MoE backbone plus a `score` head with O(1) outputs."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tiny_moe_dir, num_labels=1, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=gen) * 0.3)
        model.score.bias.fill_(0.25)
    out = str(tmp_path_factory.mktemp("tiny_moe_critic"))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_reference(critic_dir, tmp_path_factory):
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification

    from megarl.algorithms import compute_loss_normalisers, value_loss_fn

    model = AutoModelForTokenClassification.from_pretrained(critic_dir, dtype=torch.float32)
    model.eval()  # no dropout in the head
    batch = make_batch()
    values = hf_values(model, batch)
    step_batch = value_step_inputs(batch, values)
    normalisers = compute_loss_normalisers(batch.fields["loss_mask"])
    loss, metrics = value_loss_fn(normalisers, cliprange_value=CLIPRANGE)(values, None, step_batch)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.0).step()
    out = str(tmp_path_factory.mktemp("hf_critic_after_step"))
    model.save_pretrained(out)
    weights = {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in load_file(os.path.join(out, f)).items()}
    with torch.no_grad():
        after = hf_values(model, batch)
    return {"values": values.detach(), "loss": float(loss), "grad_norm": float(grad_norm), "weights": weights,
            "values_after": after, "clipfrac": float(metrics["vf_clipfrac"])}


def run_critic_layouts(critic_dir: str, actor_dir: str, layouts: dict, export_dir: str) -> bytes:
    from megarl.algorithms import compute_loss_normalisers, value_loss_fn
    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed, reset_model_parallel
    from megarl.models.builder import build_megatron_model
    from megarl.models.engine import EngineOptions, MegatronEngine, MicroBatchOptions
    from megarl.models.optimizer import OptimizerOptions, offloaded_fraction

    batch = make_batch()
    normalisers = compute_loss_normalisers(batch.fields["loss_mask"])
    results = {}
    for name, kwargs in layouts.items():
        layout = ParallelLayout(**kwargs)
        init_distributed(layout)
        engine = MegatronEngine(
            build_megatron_model(critic_dir, layout, value_head=True),
            EngineOptions(micro_batches=MicroBatchOptions(max_tokens_per_gpu=32),
                          optimizer=OptimizerOptions(lr=LR, adam_eps=ADAM_EPS, clip_grad=CLIP, weight_decay=0.0,
                                                     use_distributed_optimizer=False,
                                                     **OPTIMIZER.get(name, {}))),
        )
        values = engine.forward_values(batch)
        step = engine.train_step(value_step_inputs(batch, values),
                                 value_loss_fn(normalisers, cliprange_value=CLIPRANGE))
        after = engine.forward_values(batch)
        weights = {k: v.clone() for k, v in engine.export_hf_weights()}
        if name == "pp2":  # the live critic saved as an HF folder (value head broadcast from the last stage)
            from megarl.models.export import save_hf_checkpoint

            save_hf_checkpoint(engine.handle, export_dir)
        results[name] = {"values": values, "step": step, "values_after": after,
                         "weights": weights if torch.distributed.get_rank() == 0 else None,
                         "offloaded": offloaded_fraction(engine.optimizer)}
        del engine
        gc.collect()
        reset_model_parallel()
    # A critic started from the actor's language model: a fresh head, identical at every layout.
    layout = ParallelLayout(**next(iter(layouts.values())))
    init_distributed(layout)
    fresh = MegatronEngine(build_megatron_model(actor_dir, layout, value_head=True, trainable=False),
                           EngineOptions(optimizer=None))
    results["_fresh_values"] = fresh.forward_values(batch)
    reset_model_parallel()
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


@pytest.mark.timeout(400)
def test_critic_layouts_match_hf_token_classification(critic_dir, tiny_moe_dir, hf_reference, tmp_path):
    from transformers import AutoModelForTokenClassification

    export_dir = str(tmp_path / "pp2_critic_hf")
    per_rank = [torch.load(io.BytesIO(b), weights_only=False) for b in run_on_ranks(
        run_critic_layouts, 2, args=(critic_dir, tiny_moe_dir, LAYOUTS, export_dir), timeout=360)]
    ref = hf_reference
    assert ref["clipfrac"] > 0.1  # value clipping is exercised
    assert ref["grad_norm"] > CLIP  # gradient clipping too
    assert set(per_rank[0]["tp1_dp2"]["weights"]) == set(ref["weights"])  # score.* included, no lm_head
    base = per_rank[0]["tp1_dp2"]
    for name in LAYOUTS:
        got = per_rank[0][name]
        assert torch.equal(per_rank[1][name]["values"], got["values"]), name  # same on every rank
        diffs = {
            "values": (got["values"] - ref["values"]).abs().max().item(),
            "loss": abs(got["step"].loss - ref["loss"]),
            "vs_tp1_values": (got["values"] - base["values"]).abs().max().item(),
            "vs_tp1_loss": abs(got["step"].loss - base["step"].loss),
            "grad_norm": abs(got["step"].grad_norm - ref["grad_norm"]),
            "weights": max((got["weights"][k] - ref["weights"][k]).abs().max().item() for k in ref["weights"]),
            "values_after": (got["values_after"] - ref["values_after"]).abs().max().item(),
        }
        print(f"{name:8} " + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
        # values after the step carry the step's weight differences through the network: 3e-5
        assert diffs.pop("values_after") <= 3e-5, (name, diffs)
        assert all(v <= 1e-5 for v in diffs.values()), (name, diffs)
        assert abs(got["step"].metrics["vf_clipfrac"] - ref["clipfrac"]) <= 1e-6
    # the PP2 critic saved with save_hf_checkpoint loads in transformers and gives its values
    exported = AutoModelForTokenClassification.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        exported_diff = (hf_values(exported, make_batch()) - per_rank[0]["pp2"]["values_after"]).abs().max().item()
    print(f"save_hf_checkpoint of the PP2 critic vs its values: {exported_diff:.2e}")
    assert exported_diff <= 1e-5
    # the step is large against the tolerance
    assert (ref["values_after"] - ref["values"]).abs().max().item() > 1e-2
    offloaded, plain = per_rank[0]["tp1_dp2_offload"], per_rank[0]["tp1_dp2"]
    assert 0.5 <= offloaded["offloaded"] < 0.85 and plain["offloaded"] == 0.0
    assert max((offloaded["weights"][k] - plain["weights"][k]).abs().max().item() for k in plain["weights"]) <= 1e-6
    fresh = per_rank[0]["_fresh_values"]
    mask = make_batch().fields["loss_mask"].bool()
    assert torch.equal(per_rank[1]["_fresh_values"], fresh)
    assert 0 < fresh[mask].abs().max().item() < 1.0  # small random head, bias 0


def test_value_model_config(tiny_moe_dir, tmp_path):
    import json

    from transformers import AutoConfig

    from megarl.models.value_head import hf_value_head_tensors, value_model_config

    with open(os.path.join(tiny_moe_dir, "config.json")) as f:
        config = value_model_config(json.load(f))
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoConfig.from_pretrained(str(tmp_path))
    assert loaded.architectures == ["Qwen3MoeForTokenClassification"] and loaded.num_labels == 1
    assert hf_value_head_tensors(tiny_moe_dir) is None  # a language model has no value head
