"""The PPO critic inside the training rank (real Megatron over gloo, no Ray or vLLM): the first
value update is on-policy (no value clipping), value steps lower the value loss, the critic is saved
in the checkpoint next to the actor, resumes exactly at another layout, and converts to an HF
*ForTokenClassification model whose values equal Megatron's."""

import dataclasses

import pytest
import torch

from megarl.testing.distributed import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _config(model_dir, **parallel):
    from tests.trainer.test_train_worker import _config as worker_config

    return worker_config(model_dir, overrides={
        "algorithm.name": "ppo", "critic.optimizer.lr": 1e-2, "critic.optimizer.weight_decay": 0.0,
        "critic.cliprange_value": 0.2, **{f"parallel.{k}": v for k, v in parallel.items()},
    })


def _batch():
    """8 sequences; the last 3-5 tokens are the response, with returns in [0, 1]."""
    from megarl.models.batch import SequenceBatch

    g = torch.Generator().manual_seed(0)
    seqs, masks, returns = [], [], []
    for i in range(8):
        n, resp = 9 + (i * 3) % 7, 3 + i % 3
        seqs.append(torch.randint(3, 400, (n,), generator=g).tolist())
        masks.append([0.0] * (n - resp) + [1.0] * resp)
        returns.append([0.0] * (n - resp) + [float(i % 2)] * resp)
    return SequenceBatch.from_sequences(seqs, loss_mask=masks, returns=returns)


def _shared(value):
    """Rank 0's return value on every rank (worker methods return results on rank 0 only)."""
    holder = [value]
    torch.distributed.broadcast_object_list(holder, 0)
    return holder[0]


def _train_save(model_dir, root):
    from megarl.checkpoint.store import CheckpointStore
    from megarl.trainer.train_worker import MegatronTrainWorker

    cfg = _config(model_dir)  # DP2
    worker = MegatronTrainWorker(cfg, total_optimizer_steps=4, critic_optimizer_steps=4)
    batch, minis = _batch(), [[0, 1, 2, 3], [4, 5, 6, 7]]
    values = _shared(worker.compute_values(batch, minis))
    metrics = _shared(worker.update_critic(batch.with_fields(values=values), minis))
    store = CheckpointStore(root)
    pending = _shared(store.begin(1) if torch.distributed.get_rank() == 0 else None)
    worker.save_checkpoint(pending.path)
    step_dir = _shared(store.commit(pending, {"config": dataclasses.asdict(cfg)}) if torch.distributed.get_rank() == 0
                       else None)
    after = _shared(worker.compute_values(batch))
    second = _shared(worker.update_critic(batch.with_fields(values=after), minis))
    return {"values": values, "metrics": metrics, "after": after, "second": second, "step_dir": step_dir}


def _resume(model_dir, step_dir):
    from megarl.trainer.train_worker import MegatronTrainWorker

    worker = MegatronTrainWorker(_config(model_dir, tp=2), total_optimizer_steps=4, critic_optimizer_steps=4)
    worker.load_checkpoint(step_dir)
    batch, minis = _batch(), [[0, 1, 2, 3], [4, 5, 6, 7]]
    after = _shared(worker.compute_values(batch))
    second = _shared(worker.update_critic(batch.with_fields(values=after), minis))
    return {"after": after, "second": second}


def test_critic_updates_saves_resumes_and_converts(tiny_moe_dir, tmp_path):
    from transformers import AutoModelForTokenClassification

    from megarl.checkpoint.convert import McoreToHfOptions, mcore_to_hf

    first = run_on_ranks(_train_save, 2, args=(tiny_moe_dir, str(tmp_path / "ckpt")), timeout=400)[0]
    mask = _batch().fields["loss_mask"].bool()
    m1, m2 = first["metrics"]
    print(f"vf_loss per step: {[m['critic/vf_loss'] for m in first['metrics'] + first['second']]}")
    assert m1["critic/vf_clipfrac"] == 0.0  # on-policy: new values == old values at the first step
    assert m1["critic/vf_loss"] > 0.05 and m2["critic/vf_loss"] > 0
    assert (first["after"] - first["values"])[mask].abs().max() > 1e-2  # the steps moved the values
    assert first["second"][0]["critic/vf_loss"] < m1["critic/vf_loss"]  # ... towards the returns

    # resume at TP2 (DP1): the critic continues exactly (model + optimizer state). EP stays 1: megatron
    # chains a separate expert optimizer only when EP > 1, so optimizer state does not move across that.
    resumed = run_on_ranks(_resume, 2, args=(tiny_moe_dir, first["step_dir"]), timeout=400)[0]
    value_diff = (resumed["after"] - first["after"]).abs().max().item()
    loss_diff = max(abs(a["critic/vf_loss"] - b["critic/vf_loss"]) for a, b in zip(resumed["second"], first["second"]))
    print(f"resumed at TP2: values {value_diff:.2e}, vf_loss {loss_diff:.2e}")
    assert value_diff <= 1e-5 and loss_diff <= 1e-6

    # the critic converts to HF: transformers' token-classification outputs = Megatron's values
    out = str(tmp_path / "critic_hf")
    mcore_to_hf(first["step_dir"], out, McoreToHfOptions(model="critic", progress=False, verify=True))
    model = AutoModelForTokenClassification.from_pretrained(out, dtype=torch.float32).eval()
    batch = _batch()
    hf = torch.zeros(batch.input_ids.shape)
    with torch.no_grad():
        for i, n in enumerate(batch.lengths.tolist()):
            hf[i, 1:n] = model(batch.input_ids[i, :n][None]).logits[0, :-1, 0]
    diff = (hf - first["after"]).abs().max().item()
    print(f"HF ForTokenClassification vs Megatron critic values: {diff:.2e}")
    assert type(model).__name__ == "Qwen3MoeForTokenClassification"
    assert diff <= 1e-5
