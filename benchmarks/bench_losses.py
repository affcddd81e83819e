"""Loss + backward time of megarl's compute_policy_loss against a naive plain-PyTorch reference.

One step = 64k token positions ([64, 1024], ~3/4 of them loss tokens): PPO with clip-higher and dual
clip, k3 KL loss, entropy bonus, token-level truncated IS, token-mean over global normalisers. The
reference computes the same loss row by row with Python loops (the way one first writes it); both
results are checked equal before timing. Then every registered policy loss (aliases once) is timed
on the same inputs with the same KL / entropy / TIS terms (bypass_mode uses its own IS weight; the
Clip-Cov / KL-Cov mini-batch selection is timed with the loss, it runs once per mini-batch).
Run: `.venv/bin/python benchmarks/bench_losses.py`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from megarl.algorithms import (
    POLICY_LOSSES,
    PolicyLossOptions,
    RolloutCorrectionOptions,
    compute_loss_normalisers,
    compute_policy_loss,
    policy_loss_needs,
    prepare_policy_loss_inputs,
)

BATCH, SEQ, PROMPT = 64, 1024, 256
OPTIONS = PolicyLossOptions(
    policy_loss="ppo", clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, use_kl_loss=True,
    kl_loss_type="low_var_kl", kl_loss_coef=0.001, entropy_coeff=0.001,
    rollout_correction=RolloutCorrectionOptions(level="token", is_cap=2.0),
)


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(SEQ // 2, SEQ - PROMPT + 1, (BATCH,), generator=g)
    mask = torch.zeros(BATCH, SEQ)
    for row, length in enumerate(lengths.tolist()):
        mask[row, PROMPT : PROMPT + length] = 1
    old = -torch.rand(BATCH, SEQ, generator=g) * 3
    return dict(
        mask=mask,
        old=old,
        log_prob=old + 0.2 * torch.randn(BATCH, SEQ, generator=g),
        ref=old + 0.2 * torch.randn(BATCH, SEQ, generator=g),
        rollout=old + 0.1 * torch.randn(BATCH, SEQ, generator=g),
        adv=torch.randn(BATCH, 1, generator=g).expand(BATCH, SEQ).contiguous(),
        entropy=torch.rand(BATCH, SEQ, generator=g) * 2,
    )


def naive_reference_loss(log_prob, entropy, x):
    """The same objective, token by token within each row, in the most direct plain-PyTorch form."""
    total_tokens = x["mask"].sum()
    pg, ent, kl = 0.0, 0.0, 0.0
    for b in range(log_prob.shape[0]):
        idx = x["mask"][b].nonzero().squeeze(-1)
        lp, old, adv = log_prob[b, idx], x["old"][b, idx], x["adv"][b, idx]
        ratio = torch.exp(torch.clamp(lp - old, -20, 20))
        surrogate = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.28))
        dual = torch.min(surrogate, -adv * 3.0)
        loss_tokens = torch.where(adv < 0, dual, surrogate)
        is_weight = torch.clamp(torch.exp(torch.clamp(old - x["rollout"][b, idx], -20, 20)), max=2.0)
        pg = pg + (loss_tokens * is_weight).sum()
        ent = ent + entropy[b, idx].sum()
        d = torch.clamp(x["ref"][b, idx] - lp, -20, 20)
        kl = kl + torch.clamp(torch.exp(d) - d - 1, -10, 10).sum()
    return pg / total_tokens - 0.001 * ent / total_tokens + 0.001 * kl / total_tokens


def megarl_loss(log_prob, entropy, x, norm):
    loss, _ = compute_policy_loss(
        log_prob, x["old"], x["adv"], x["mask"], norm, OPTIONS,
        ref_log_prob=x["ref"], rollout_log_prob=x["rollout"], entropy=entropy,
    )
    return loss


def loss_and_backward(fn, x) -> tuple[float, torch.Tensor, torch.Tensor]:
    log_prob = x["log_prob"].clone().requires_grad_(True)
    entropy = x["entropy"].clone().requires_grad_(True)
    start = time.perf_counter()
    loss = fn(log_prob, entropy)
    loss.backward()
    return time.perf_counter() - start, loss.detach(), log_prob.grad


def main(repeats: int = 10, warmup: int = 2, threads: int = 1):
    # One thread: on shared cores an elementwise op split over 2 threads waits for the slower one.
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = make_inputs()
    norm = compute_loss_normalisers(x["mask"], max_response_length=SEQ - PROMPT)
    ours, ref = [], []
    # Interleaved, so a neighbour's load on the shared cores hits both sides alike.
    for i in range(warmup + repeats):
        t_ours, loss_ours, grad_ours = loss_and_backward(lambda lp, e: megarl_loss(lp, e, x, norm), x)
        t_ref, loss_ref, grad_ref = loss_and_backward(lambda lp, e: naive_reference_loss(lp, e, x), x)
        if i >= warmup:
            ours.append(t_ours)
            ref.append(t_ref)
    t_ours, t_ref = statistics.median(ours), statistics.median(ref)
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-8)
    print(f"loss+backward, {BATCH}x{SEQ} = {BATCH * SEQ} token positions, {int(norm.num_tokens)} loss tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} interleaved")
    print(f"{'implementation':<34}{'ms/step':>10}")
    print(f"{'megarl compute_policy_loss':<34}{t_ours * 1e3:>10.2f}")
    print(f"{'naive plain-PyTorch reference':<34}{t_ref * 1e3:>10.2f}")
    print(f"ratio megarl / naive = {t_ours / t_ref:.2f}  (same loss and gradient, checked)")
    every_loss(x, norm, repeats, warmup)


def loss_options(name: str) -> PolicyLossOptions:
    """OPTIONS with policy_loss=name (bypass_mode: no TIS weight on top of its own)."""
    if policy_loss_needs(name).rollout_log_prob:  # bypass_mode
        return dataclasses.replace(OPTIONS, policy_loss=name, rollout_correction=RolloutCorrectionOptions())
    return dataclasses.replace(OPTIONS, policy_loss=name)


def every_loss(x, norm, repeats: int, warmup: int) -> None:
    by_function: dict[int, list[str]] = {}
    for name in POLICY_LOSSES.names():
        by_function.setdefault(id(POLICY_LOSSES.get(name)), []).append(name)
    rows = []
    for names in by_function.values():
        name = names[0]
        options = loss_options(name)

        def step(lp, e, options=options):
            inputs = prepare_policy_loss_inputs(options, x["old"], x["adv"], x["mask"])
            loss, _ = compute_policy_loss(lp, x["old"], x["adv"], x["mask"], norm, options, ref_log_prob=x["ref"],
                                          rollout_log_prob=x["rollout"], entropy=e, mini_batch_inputs=inputs)
            return loss

        times = []
        for i in range(warmup + repeats):
            t, loss, grad = loss_and_backward(step, x)
            if i >= warmup:
                times.append(t)
        if not (torch.isfinite(loss) and torch.isfinite(grad).all()):
            raise RuntimeError(f"{name}: non-finite loss or gradient")
        rows.append((" / ".join(names), statistics.median(times)))
    base = dict(rows)["ppo / vanilla"]
    print(f"\nevery registered policy loss (+ k3 KL, entropy, TIS), median of {repeats}")
    print(f"{'policy_loss':<34}{'ms/step':>10}{'x ppo':>8}")
    for name, t in rows:
        print(f"{name:<34}{t * 1e3:>10.2f}{t / base:>8.2f}")


if __name__ == "__main__":
    main()
