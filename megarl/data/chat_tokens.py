"""Chat conversations → token ids with a mask of the assistant's tokens (for SFT and DPO)."""

from __future__ import annotations

from megarl.data.records import DataFormatError, render_chat


def _check_prefix(prefix: str, text: str, where: str) -> None:
    if not text.startswith(prefix):
        raise DataFormatError(
            f"{where}: the chat template renders a conversation's prefix differently from the whole "
            "conversation (e.g. it rewrites earlier turns), so assistant tokens cannot be located")


def tokenize_conversation(tokenizer, messages: list[dict], chat_template_kwargs: dict,
                          where: str) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask): the templated conversation and 1 on every token an assistant
    message contributes (its content and end-of-turn marker), 0 on the rest (system, user, tool turns
    and each assistant header, i.e. the generation prompt).

    Each segment is tokenised on its own, exactly as a rollout sees a prompt followed by generated tokens.
    """
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""

    def append(text: str, value: int) -> None:
        if text:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            mask.extend([value] * len(piece))

    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataFormatError(f"{where}: the conversation starts with an assistant message; nothing prompts it")
        prompt_text = render_chat(tokenizer, messages[:i], True, chat_template_kwargs)
        full_text = render_chat(tokenizer, messages[:i + 1], False, chat_template_kwargs)
        _check_prefix(rendered, prompt_text, where)
        _check_prefix(prompt_text, full_text, where)
        append(prompt_text[len(rendered):], 0)
        append(full_text[len(prompt_text):], 1)
        rendered = full_text
    whole = render_chat(tokenizer, messages, False, chat_template_kwargs)
    _check_prefix(rendered, whole, where)
    append(whole[len(rendered):], 0)
    return ids, mask


def tokenize_response(tokenizer, prompt_messages: list[dict], response: str, chat_template_kwargs: dict,
                      where: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids): the templated prompt with the generation prompt, and the tokens the
    assistant's ``response`` adds after it (end-of-turn marker included)."""
    prompt_text = render_chat(tokenizer, prompt_messages, True, chat_template_kwargs)
    full_text = render_chat(tokenizer, prompt_messages + [{"role": "assistant", "content": response}], False,
                            chat_template_kwargs)
    _check_prefix(prompt_text, full_text, where)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids
