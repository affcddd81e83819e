"""vocab_parallel_logprobs_entropy: values and gradients vs torch.log_softmax, and TP2 vs TP1."""

import pytest
import torch

from megarl.models.vocab_parallel import vocab_parallel_logprobs_entropy
from megarl.testing.distributed import run_on_ranks

VOCAB, TEMPERATURE = 96, 0.7


def _problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(3, 5, VOCAB, generator=g, dtype=dtype)
    targets = torch.randint(0, VOCAB, (3, 5), generator=g)
    grad_logprob = torch.randn(3, 5, generator=g, dtype=dtype)
    grad_entropy = torch.randn(3, 5, generator=g, dtype=dtype)
    return logits, targets, grad_logprob, grad_entropy


def _reference(logits, targets, grad_logprob, grad_entropy, temperature):
    """torch.log_softmax over the full vocabulary, autograd gradients."""
    logits = logits.clone().requires_grad_(True)
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logprob = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (logprob * grad_logprob + entropy * grad_entropy).sum().backward()
    return logprob.detach(), entropy.detach(), logits.grad


def _ours(logits, targets, grad_logprob, grad_entropy, temperature, tp_group=None):
    logits = logits.clone().requires_grad_(True)
    logprob, entropy = vocab_parallel_logprobs_entropy(logits, targets, tp_group, temperature=temperature)
    (logprob * grad_logprob + entropy * grad_entropy).sum().backward()
    return logprob.detach(), entropy.detach(), logits.grad


def test_single_process_matches_log_softmax():
    logits, targets, g_lp, g_h = _problem(torch.float32)
    ref = _reference(logits.double(), targets, g_lp.double(), g_h.double(), TEMPERATURE)
    ours = _ours(logits, targets, g_lp, g_h, TEMPERATURE)
    for name, a, b in zip(("logprob", "entropy", "grad"), ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=2e-6, rtol=0, msg=name)
    # sanity on the reference numbers themselves: log-probs are negative, entropy in (0, log V]
    assert (ours[0] < 0).all() and (ours[1] > 0).all() and (ours[1] <= torch.log(torch.tensor(VOCAB.__float__())) + 1e-6).all()


def test_logprob_only_and_bf16_logits():
    logits, targets, g_lp, _ = _problem(torch.float32)
    logits_bf16 = logits.bfloat16().requires_grad_(True)
    logprob, entropy = vocab_parallel_logprobs_entropy(logits_bf16, targets, with_entropy=False)
    assert entropy is None
    (logprob * g_lp).sum().backward()
    assert logits_bf16.grad.dtype == torch.bfloat16
    ref_lp, _, ref_grad = _reference(logits_bf16.detach().double(), targets, g_lp.double(), torch.zeros_like(g_lp).double(), 1.0)
    torch.testing.assert_close(logprob.double(), ref_lp, atol=2e-6, rtol=0)
    torch.testing.assert_close(logits_bf16.grad.double(), ref_grad, atol=1e-2, rtol=1e-2)


def test_bad_inputs_are_rejected():
    logits, targets, _, _ = _problem(torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_entropy(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="target ids"):
        vocab_parallel_logprobs_entropy(logits, targets + VOCAB)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_logprobs_entropy(logits, targets[:, :2])


def _tp2_rank(dtype):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logits, targets, g_lp, g_h = _problem(dtype)
    shard = VOCAB // world
    local = logits[..., rank * shard : (rank + 1) * shard]
    logprob, entropy, grad = _ours(local, targets, g_lp, g_h, TEMPERATURE, tp_group=dist.group.WORLD)
    return logprob, entropy, grad


@pytest.mark.timeout(360)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_tp2_matches_tp1_values_and_gradients(dtype):
    logits, targets, g_lp, g_h = _problem(dtype)
    tp1 = _ours(logits, targets, g_lp, g_h, TEMPERATURE)
    ref = _reference(logits.double(), targets, g_lp.double(), g_h.double(), TEMPERATURE)
    ranks = run_on_ranks(_tp2_rank, world_size=2, args=(dtype,), timeout=300)
    for rank_logprob, rank_entropy, _ in ranks:  # identical on every TP rank
        torch.testing.assert_close(rank_logprob, tp1[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(rank_entropy, tp1[1], atol=1e-6, rtol=0)
    grad_tp2 = torch.cat([grad for _, _, grad in ranks], dim=-1)  # each rank's vocab slice
    torch.testing.assert_close(grad_tp2, tp1[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_tp2.double(), ref[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(tp1[0].double(), ref[0], atol=2e-6, rtol=0)
    torch.testing.assert_close(tp1[1].double(), ref[1], atol=2e-6, rtol=0)


def test_sum_squared_probs_matches_softmax_at_tp1_and_tp2():
    from megarl.models.vocab_parallel import vocab_parallel_sum_squared_probs

    logits, _, _, _ = _problem(torch.float64)
    reference = (torch.softmax(logits / TEMPERATURE, dim=-1) ** 2).sum(-1)
    torch.testing.assert_close(vocab_parallel_sum_squared_probs(logits, temperature=TEMPERATURE), reference,
                               atol=1e-12, rtol=0)
    assert bool(((reference > 1 / VOCAB) & (reference <= 1)).all())  # between uniform and one-hot
    for rank_value in run_on_ranks(_tp2_sum_squared, world_size=2, timeout=300):
        torch.testing.assert_close(rank_value, reference, atol=1e-12, rtol=0)


def _tp2_sum_squared():
    import torch.distributed as dist

    from megarl.models.vocab_parallel import vocab_parallel_sum_squared_probs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logits, _, _, _ = _problem(torch.float64)
    shard = VOCAB // world
    return vocab_parallel_sum_squared_probs(logits[..., rank * shard:(rank + 1) * shard], dist.group.WORLD, TEMPERATURE)
