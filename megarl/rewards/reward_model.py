"""Scoring with a HuggingFace sequence-classification reward model, behind the reward interface.

The model runs in the trainer's process (``in_process=True``: it is loaded once and cached, never
copied into the reward worker pool). Conversations are formatted with the reward model's own chat
template, so the policy's template does not leak into the reward model's input.
"""

from __future__ import annotations

from functools import lru_cache

from megarl.rewards.registry import register_reward


class RewardModelScorer:
    """Batched scalar scores from ``AutoModelForSequenceClassification`` (label 0's logit).

    max_length truncates from the left (the response end is what is being judged).
    """

    def __init__(self, model_path: str, batch_size: int = 8, max_length: int | None = None, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            # HF pools the last non-pad token of each row, which needs the pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def format_conversation(self, messages: list[dict]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(m["content"] for m in messages)

    def score_texts(self, texts: list[str]) -> list[float]:
        """One float per text: the model's logit for label 0 at the text's last token."""
        import torch

        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False,
                                 truncation=self.max_length is not None, max_length=self.max_length)
            with torch.no_grad():
                logits = self.model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device)).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


@lru_cache(maxsize=4)
def _scorer(model_path: str, batch_size: int, max_length: int | None, device: str) -> RewardModelScorer:
    return RewardModelScorer(model_path, batch_size, max_length, device)


@register_reward("reward_model", batched=True, in_process=True)
def reward_model_scores(data_sources, solution_strs, ground_truths, extra_infos, *, model_path, batch_size=8,
                        max_length=None, device="cpu"):
    """Scores each response with the reward model at ``model_path``.

    Input per sample: ``extra_info["messages"]`` (the whole conversation, response included) formatted
    with the reward model's chat template when present, else the bare response text.
    """
    scorer = _scorer(model_path, batch_size, max_length, device)
    texts = []
    for response, extra_info in zip(solution_strs, extra_infos):
        messages = (extra_info or {}).get("messages")
        texts.append(scorer.format_conversation(messages) if messages else response)
    return scorer.score_texts(texts)
