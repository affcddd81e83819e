"""SFT end to end on the real stack (Megatron ranks as Ray actors over gloo, the tiny Qwen3-MoE):
the loss reads exactly the assistant tokens, the model learns an answer format that transformers'
greedy generation reproduces on held-out prompts, max_trained_count caps every sample, and a resumed
run continues with the very same losses."""

import json
import os
from collections import Counter

import pytest

from megarl.data.records import write_records
from megarl.data.synthetic import ANSWER_FORMAT, sft_arith_records
from megarl.trainer.metrics import read_tensorboard_scalars

CONVERSATION = [
    {"role": "system", "content": "Answer in tags."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "<answer>7</answer>"},
    {"role": "user", "content": "And 12 + 30?"},
    {"role": "assistant", "content": "The sum is <answer>42</answer>"},
]


def _config(model_dir, out_dir, train, val=None, **overrides):
    from megarl.config import load_config

    return load_config(None, {
        "trainer.type": "sft", "model.path": model_dir, "model.dtype": "fp32",
        "data.train_files": [train], "data.val_files": [val] if val else [], "data.train_batch_size": 16,
        "sft.max_length": 64, "actor.use_dynamic_bsz": True, "actor.max_token_len_per_gpu": 256,
        "optimizer.lr": 3e-3, "optimizer.min_lr": 3e-4, "optimizer.lr_warmup_steps": 2,
        "optimizer.lr_decay_style": "cosine", "optimizer.weight_decay": 0.0,
        "trainer.output_dir": out_dir, "trainer.logger": ["tensorboard"], "trainer.gpus_per_node": 1,
        "trainer.device": "cpu", "trainer.resume": "disable", **overrides,
    }, check_paths=False)


def _hf_assistant_nll(model_dir, samples) -> float:
    """Token-mean -log p over the samples' loss_mask tokens, by transformers (nats)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample.input_ids])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            token_logprobs = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(sample.loss_mask[1:], dtype=torch.float64)
            total -= float((token_logprobs * mask).sum())
            count += int(mask.sum())
    return total / count


def _run(cfg, export_to=None):
    from megarl.trainer.sft_trainer import SFTTrainer

    trainer = SFTTrainer(cfg)
    trainer.trained_batches = []  # record which samples each step trains
    try:
        history = trainer.fit()
        if export_to:
            trainer.save_hf(export_to)
        return trainer, history
    finally:
        trainer.close()


def test_loss_mask_is_exactly_the_assistant_tokens(tmp_path, tiny_moe_dir):
    """The batch the trainer builds marks exactly the assistant turns' tokens: each reply's content
    and the template's end of turn ("<|im_end|>\\n"), nothing of the system, user or headers."""
    from transformers import AutoTokenizer

    from megarl.data import SFTDataset, SFTDatasetConfig
    from megarl.trainer.sft_trainer import sft_batch

    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_dir)
    path = str(tmp_path / "conv.jsonl")
    write_records([{"messages": CONVERSATION}], path)
    sample = SFTDataset(SFTDatasetConfig(files=[path]), tokenizer)[0]
    batch = sft_batch([sample])
    mask = batch.fields["loss_mask"][0].bool()
    masked = batch.input_ids[0][mask].tolist()

    end_of_turn = [tokenizer.convert_tokens_to_ids("<|im_end|>")] + tokenizer.encode("\n", add_special_tokens=False)
    expected = []
    for message in CONVERSATION:
        if message["role"] == "assistant":
            expected += tokenizer.encode(message["content"], add_special_tokens=False) + end_of_turn
    assert masked == expected
    # and the unmasked tokens are the rest of the templated conversation, in order
    unmasked = tokenizer.decode(batch.input_ids[0][~mask].tolist())
    assert unmasked == ("<|im_start|>system\nAnswer in tags.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
                        "<|im_start|>assistant\n<|im_start|>user\nAnd 12 + 30?<|im_end|>\n<|im_start|>assistant\n")


def test_sft_learns_the_answer_format(tmp_path, tiny_moe_dir, ray_session):
    """40 steps on "What is a + b?" -> "<answer>N</answer>": the validation NLL falls, and the
    exported HF model's greedy replies to held-out prompts follow the format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_rows = sft_arith_records(160, seed=0)
    seen = {r["messages"][0]["content"] for r in train_rows}
    held_out = [r for r in sft_arith_records(200, seed=7) if r["messages"][0]["content"] not in seen][:16]
    assert len(held_out) == 16
    train, val = str(tmp_path / "train.parquet"), str(tmp_path / "val.parquet")
    write_records(train_rows, train)
    write_records(held_out, val)
    out, hf_dir = str(tmp_path / "run"), str(tmp_path / "hf")
    trainer, history = _run(_config(tiny_moe_dir, out, train, val, **{
        "trainer.total_steps": 40, "trainer.test_freq": 5, "trainer.save_freq": 0}), export_to=hf_dir)

    # step 1 ran the initial weights: its loss is the token-mean NLL of the batch's assistant tokens,
    # recomputed here with the HF model on the same conversations
    first_batch = [trainer.train_set[i] for i in trainer.trained_batches[0]]
    expected = _hf_assistant_nll(tiny_moe_dir, first_batch)
    print(f"step-1 loss {history[0]['train/loss']:.7f}, HF token-mean NLL {expected:.7f}; "
          f"{history[0]['train/micro_batches']:.0f} packed micro-batches")
    assert history[0]["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert history[0]["train/micro_batches"] > 1  # the 256-token budget packs 16 conversations into several

    val_losses = [h["val/loss"] for h in history if "val/loss" in h]
    print(f"val/loss first {val_losses[0]:.4f} last {val_losses[-1]:.4f}; train/loss first "
          f"{history[0]['train/loss']:.4f} last {history[-1]['train/loss']:.4f}")
    # Measured (last / first validation loss, steps 40 / 5; trainer.seed = data.seed = 1, 2, 3, load
    # average 37-43 on 2 cores): 0.303/2.682 = 0.113, 0.319/2.637 = 0.121, 0.326/2.702 = 0.120; min
    # 0.113, max 0.121. No sampling: on one machine a seed repeats exactly, across CPUs the sums
    # differ in the last digits. The bound is 4x the worst ratio; an untrained model stays near 1.
    assert len(val_losses) == 8 and val_losses[-1] < 0.5 * val_losses[0]
    scalars = read_tensorboard_scalars(os.path.join(out, "tensorboard"))
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/tokens", "val/loss", "timing_s/update"):
        assert key in scalars, key
    assert [s for s, _ in scalars["val/loss"]] == [5, 10, 15, 20, 25, 30, 35, 40]

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    replies = []
    for row in held_out:
        inputs = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        generated = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    matching = sum(bool(ANSWER_FORMAT.match(r)) for r in replies)
    print(f"{matching}/{len(replies)} held-out replies in the answer format, e.g. {replies[:4]}")
    assert matching >= 0.8 * len(replies)  # measured 16/16 at seeds 1, 2, 3


def test_max_trained_count_and_exact_resume(tmp_path, tiny_moe_dir, ray_session):
    """10 conversations, 4 per step, each trained at most twice: the run stops after 5 steps with
    every sample trained exactly twice. A second run resumed from the first one's step-3
    checkpoint trains the same samples in steps 4-5 with the same losses."""
    train = str(tmp_path / "train.jsonl")
    write_records(sft_arith_records(10, seed=3), train)
    common = {"data.train_batch_size": 4, "sft.max_trained_count": 2, "trainer.total_steps": 100,
              "trainer.save_freq": 3, "actor.use_dynamic_bsz": False, "actor.micro_batch_size": 2}
    straight, history = _run(_config(tiny_moe_dir, str(tmp_path / "straight"), train, **common))
    trained = Counter(i for batch in straight.trained_batches for i in batch)
    print(f"steps {len(history)}; times each sample was trained: {dict(sorted(trained.items()))}")
    assert len(history) == 5 and trained == Counter({i: 2 for i in range(10)})
    assert straight.stream.counts == [2] * 10
    checkpoints = sorted(os.listdir(os.path.join(str(tmp_path / "straight"), "checkpoints")))
    assert checkpoints == ["latest", "step_00000003", "step_00000005"]

    step3 = os.path.join(str(tmp_path / "straight"), "checkpoints", "step_00000003")
    resumed, rest = _run(_config(tiny_moe_dir, str(tmp_path / "resumed"), train, **common,
                                 **{"trainer.resume": step3}))
    assert resumed.trained_batches == straight.trained_batches[3:]
    assert resumed.stream.counts == [2] * 10
    for step, (a, b) in enumerate(zip(history[3:], rest), start=4):
        print(f"step {step}: loss straight {a['train/loss']:.8f} resumed {b['train/loss']:.8f}, "
              f"grad_norm {a['train/grad_norm']:.8f} / {b['train/grad_norm']:.8f}")
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-6)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], abs=1e-6)
        assert b["train/lr"] == a["train/lr"]
    with open(os.path.join(step3, "trainer_state.json")) as f:
        assert json.load(f)["data"]["counts"] == [Counter(i for b in straight.trained_batches[:3] for i in b)[i]
                                                  for i in range(10)]
