"""Reward-model scoring through the RewardManager equals a direct forward of the model."""

import pytest
import torch

from megarl.rewards import RewardConfig, RewardManager, RewardRequest, RewardTermConfig


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    from megarl.utils.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForSequenceClassification(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_reward_model_scores_equal_a_direct_forward(tiny_rm_dir):
    from transformers import AutoTokenizer, Qwen3ForSequenceClassification

    prompts = ["What is 3 + 5?", "What is 9 - 4? Answer:", "Hi"]
    responses = ["8", "The answer is 5 because nine minus four is five.", "Hello there, how can I help?"]
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                     for p, r in zip(prompts, responses)]
    config = RewardConfig(terms=[RewardTermConfig("reward_model", kwargs={"model_path": tiny_rm_dir, "batch_size": 2})],
                          num_workers=2)
    with RewardManager(config) as manager:
        out = manager.score([RewardRequest("chat", r, None, None, 4, c) for r, c in zip(responses, conversations)])

    tokenizer = AutoTokenizer.from_pretrained(tiny_rm_dir)
    model = Qwen3ForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    expected = []
    for conversation in conversations:
        ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False,
                        return_tensors="pt")["input_ids"]
        with torch.no_grad():  # one unpadded sequence: the score is the logit at its last token
            expected.append(model(input_ids=ids).logits[0, 0].item())
    assert len(set(round(e, 4) for e in expected)) == 3  # distinct scores, so the comparison means something
    assert out.scores == pytest.approx(expected, abs=1e-5)
    assert out.metrics["reward/errors"] == 0.0
