"""MegatronEngine.forward_sum_pi_squared (the optimal token baseline's input) against HF transformers:
sum_v p_v^2 of each next-token distribution at a temperature, at TP2 (vocab shards, megatron's padded
vocabulary) on two real megatron-core ranks over gloo."""

import pytest
import torch

from megarl.testing.distributed import run_on_ranks

pytestmark = pytest.mark.distributed

TEMPERATURE = 0.8
LENGTHS = [7, 4, 9]


def _batch():
    from megarl.models.batch import SequenceBatch

    g = torch.Generator().manual_seed(3)
    return SequenceBatch.from_sequences([torch.randint(3, 500, (n,), generator=g).tolist() for n in LENGTHS])


def _rank(model_dir):
    from megarl.distributed import ParallelLayout
    from megarl.distributed.init import init_distributed
    from megarl.models.builder import build_megatron_model
    from megarl.models.engine import EngineOptions, MegatronEngine

    layout = ParallelLayout(tp=2)
    init_distributed(layout)
    engine = MegatronEngine(build_megatron_model(model_dir, layout), EngineOptions())
    return engine.forward_sum_pi_squared(_batch(), temperature=TEMPERATURE).tolist()


@pytest.mark.timeout(600)
def test_tp2_sum_pi_squared_matches_hf_softmax(tiny_moe_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32)
    batch = _batch()
    expected = torch.zeros(batch.input_ids.shape)
    with torch.no_grad():
        for i, n in enumerate(LENGTHS):
            logits = model(batch.input_ids[i, :n][None]).logits[0, :-1].float() / TEMPERATURE
            expected[i, 1:n] = (torch.softmax(logits, dim=-1) ** 2).sum(-1)
    for per_rank in run_on_ranks(_rank, 2, args=(tiny_moe_dir,), timeout=540):
        torch.testing.assert_close(torch.tensor(per_rank), expected, atol=1e-5, rtol=1e-4)
    assert all(bool((expected[i, 1:n] > 1e-4).all()) for i, n in enumerate(LENGTHS))  # not trivially 0
