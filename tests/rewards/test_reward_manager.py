"""RewardManager: custom rewards, weighted terms, batch rewards, and faults that must not stop training."""

import os
import textwrap
import time

import pytest

from megarl.rewards import RewardConfig, RewardManager, RewardRequest, RewardTermConfig

FIXTURES = "tests.rewards.reward_fixtures"


def req(response, truth="ok", data_source="test", length=0, extra_info=None, messages=None):
    return RewardRequest(data_source, response, truth, extra_info, length, messages)


@pytest.fixture(scope="module")
def misbehaving_manager():
    config = RewardConfig(terms=[RewardTermConfig(f"{FIXTURES}:misbehaving_reward")], num_workers=2,
                          timeout_s=2.0, fallback_score=-1.0)
    with RewardManager(config) as manager:
        yield manager


def test_custom_reward_from_a_file_logs_its_extra_keys(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent("""
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            return {
                "score": 1.0 if solution_str.strip() == ground_truth else 0.0,
                "num_messages": len(extra_info.get("messages") or []),
                "tokens": extra_info["response_length"],
                "split_is_train": float(extra_info.get("split") == "train"),
                "pred": solution_str.strip(),   # not numeric: kept out of metrics
            }
    """))
    config = RewardConfig(terms=[RewardTermConfig(f"{path}:compute_score")], num_workers=1, timeout_s=10)
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "call calc"},
                    {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]
    with RewardManager(config) as manager:
        out = manager.score([req("4", "4", length=3, extra_info={"split": "train"}, messages=conversation),
                             req("5", "4", length=5)])
    assert out.scores == [1.0, 0.0]
    assert out.metrics["reward/num_messages/mean"] == 2.0    # (4 + 0) / 2: the trajectory reached the reward
    assert out.metrics["reward/tokens/mean"] == 4.0          # (3 + 5) / 2
    assert out.metrics["reward/split_is_train/mean"] == 0.5
    assert "reward/pred/mean" not in out.metrics
    assert out.metrics["reward/score/mean"] == 0.5
    assert out.details[0] == {"compute_score": 1.0, "num_messages": 4.0, "tokens": 3.0, "split_is_train": 1.0}


def test_sleeping_and_raising_rewards_fall_back_and_the_rest_is_scored(misbehaving_manager):
    requests = [req("ok"), req("sleep"), req("raise"), req("bad"), req("ok"), req("nan"), req("no score key")]
    start = time.monotonic()
    out = misbehaving_manager.score(requests)
    elapsed = time.monotonic() - start
    assert out.scores == [1.0, -1.0, -1.0, 0.0, 1.0, -1.0, -1.0]
    assert out.metrics["reward/timeouts"] == 1.0
    assert out.metrics["reward/errors"] == 3.0           # raise, nan, dict without score
    assert elapsed < 10.0                                 # the 60 s sleep was cut at the 2 s timeout
    # The killed worker was replaced: the next batch is scored normally, and totals accumulate.
    out = misbehaving_manager.score([req("ok"), req("sleep"), req("ok")])
    assert out.scores == [1.0, -1.0, 1.0]
    assert (misbehaving_manager.total_timeouts, misbehaving_manager.total_errors) == (2, 3)


def test_a_worker_that_dies_is_replaced(misbehaving_manager):
    out = misbehaving_manager.score([req("exit"), req("ok"), req("ok"), req("ok")])
    assert out.scores == [-1.0, 1.0, 1.0, 1.0]
    assert out.metrics["reward/errors"] == 1.0


def test_weighted_terms_sum_and_report_each_term():
    config = RewardConfig(terms=[
        RewardTermConfig("math", weight=1.0),
        RewardTermConfig("format", weight=0.5),
        RewardTermConfig("overlong", weight=1.0, kwargs={"max_response_length": 100, "overlong_buffer_len": 20}),
    ], num_workers=2)
    responses = [("<think>x</think><answer>\\boxed{12}</answer>", 10),   # 1 + 0.5 + 0
                 ("\\boxed{12}", 90),                                    # 1 + 0 - 0.5
                 ("<think>x</think><answer>\\boxed{7}</answer>", 100)]   # 0 + 0.5 - 1
    with RewardManager(config) as manager:
        out = manager.score([req(text, "12", length=n) for text, n in responses])
    assert out.scores == pytest.approx([1.5, 0.5, -0.5])
    assert out.metrics["reward/math/mean"] == pytest.approx(2 / 3)
    assert out.metrics["reward/format/mean"] == pytest.approx(2 / 3)
    assert out.metrics["reward/overlong/mean"] == pytest.approx(-0.5)
    assert out.metrics["reward/score/mean"] == pytest.approx(0.5)
    assert out.details[1] == pytest.approx({"math": 1.0, "format": 0.0, "overlong": -0.5})


def test_batch_reward_and_registered_user_reward_in_workers():
    config = RewardConfig(terms=[
        RewardTermConfig(f"{FIXTURES}:response_char_counts", batched=True, kwargs={"scale": 0.5}),
        RewardTermConfig("test_fixture_length", weight=2.0),
    ], num_workers=2)
    import tests.rewards.reward_fixtures  # noqa: F401 - registers test_fixture_length here too

    truth = str(os.getpid())
    with RewardManager(config) as manager:
        out = manager.score([req("abcd", truth, length=3), req("ab", truth, length=7)])
    assert out.scores == pytest.approx([0.5 * 4 + 2 * 3, 0.5 * 2 + 2 * 7])
    assert out.metrics["reward/test_fixture_length/pid_is_worker/mean"] == 1.0  # ran in a worker process


def test_inline_mode_also_falls_back_on_errors():
    config = RewardConfig(terms=[RewardTermConfig(f"{FIXTURES}:misbehaving_reward")], num_workers=0)
    with RewardManager(config) as manager:
        out = manager.score([req("raise"), req("ok")])
    assert out.scores == [0.0, 1.0]
    assert out.metrics["reward/errors"] == 1.0


def test_score_batch_column_form(misbehaving_manager):
    out = misbehaving_manager.score_batch(["a", "b"], ["ok", "no"], ["ok", "ok"], [None, {"x": 1}], [1, 2])
    assert out.scores == [1.0, 0.0]
    with pytest.raises(ValueError, match="ground_truths has 1 entries"):
        misbehaving_manager.score_batch(["a", "b"], ["ok", "no"], ["ok"], [None, None], [1, 2])


@pytest.mark.parametrize("term, message", [
    (RewardTermConfig("no_such_reward"), "registered: "),
    (RewardTermConfig("/nonexistent/reward.py:compute_score"), "does not exist"),
    (RewardTermConfig(f"{FIXTURES}:no_such_function"), "has no attribute 'no_such_function'"),
    (RewardTermConfig("no_such_module_xyz:fn"), "cannot import module"),
    (RewardTermConfig("overlong"), "max_response_length"),              # required kwargs missing
    (RewardTermConfig("math", kwargs={"tolerance": 0.1}), "tolerance"),  # unknown kwarg
])
def test_bad_terms_fail_at_construction(term, message):
    with pytest.raises((KeyError, ValueError), match=message):
        RewardManager(RewardConfig(terms=[term], num_workers=0))


def test_bad_config_values():
    with pytest.raises(ValueError, match="timeout_s"):
        RewardManager(RewardConfig(timeout_s=0))
    with pytest.raises(ValueError, match="label"):
        RewardManager(RewardConfig(terms=[RewardTermConfig("math"), RewardTermConfig("math")], num_workers=0))


def test_per_term_timeout_overrides_the_default():
    config = RewardConfig(terms=[RewardTermConfig(f"{FIXTURES}:misbehaving_reward", timeout_s=0.5)], num_workers=1,
                          timeout_s=30.0)
    with RewardManager(config) as manager:
        start = time.monotonic()
        out = manager.score([req("sleep"), req("ok")])
    assert time.monotonic() - start < 4.0
    assert out.scores == [0.0, 1.0] and out.metrics["reward/timeouts"] == 1.0


def test_check_data_sources_fails_early_for_unknown_sources():
    with RewardManager(RewardConfig(num_workers=0)) as manager:
        manager.check_data_sources(["openai/gsm8k", "synthetic/arith", "aime24"])
        with pytest.raises(ValueError, match="does not know data_source 'my/qa'"):
            manager.check_data_sources(["openai/gsm8k", "my/qa"])


def test_loading_a_slow_module_does_not_count_against_the_call_timeout(tmp_path):
    path = tmp_path / "slow_import.py"
    path.write_text("import time\ntime.sleep(2.0)\n\ndef compute_score(data_source, solution_str, ground_truth, "
                    "extra_info=None):\n    return 1.0\n")
    config = RewardConfig(terms=[RewardTermConfig(f"{path}:compute_score")], num_workers=1, timeout_s=1.0)
    with RewardManager(config) as manager:
        out = manager.score([req("a"), req("b")])
    assert out.scores == [1.0, 1.0] and out.metrics["reward/timeouts"] == 0.0


def test_rewards_are_called_by_keyword_like_verl():
    config = RewardConfig(terms=[RewardTermConfig(f"{FIXTURES}:keyword_order_reward", kwargs={"bonus": 0.25})],
                          num_workers=1)
    with RewardManager(config) as manager:
        assert manager.score([req("ok"), req("no")]).scores == [1.25, 0.25]
