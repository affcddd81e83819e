"""Deterministic toy environments for the multi-turn tests (loaded by path, like a user's file)."""

from megarl.rollout.multi_turn import ContinueScheduler, NewTurnScheduler


class CountingFeedbackEnv(NewTurnScheduler):
    """Replies "Turn {turn} seen {n} tokens." to every assistant message; every max_tokens chunk
    counts as a turn (the random tiny model rarely says eos), max_turns ends the episode."""

    def check_finished(self, request, result, turn):
        return turn + 1 >= self.max_turns

    def feedback(self, messages, result, turn):
        return f"Turn {turn} seen {len(result.token_ids)} tokens."


class ToolOutputEnv(ContinueScheduler):
    """Inserts a fake tool output inside the assistant message after every chunk."""

    def check_finished(self, request, result, turn):
        return turn + 1 >= self.max_turns

    def insertion(self, messages, result, turn):
        return f"\n<output>{turn * 7}</output>\n"


class RewritesHistoryEnv(NewTurnScheduler):
    """Breaks the append-only rule: drops the first prompt token."""

    def check_finished(self, request, result, turn):
        return False

    def feedback(self, messages, result, turn):
        return "again"

    def step(self, request, result, turn):
        following = super().step(request, result, turn)
        following.prompt_token_ids = following.prompt_token_ids[1:]
        return following
