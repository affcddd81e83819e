"""Every built-in reward on literal inputs with the documented outputs."""

import math

import pytest

from megarl.rewards import get_reward, register_reward, registered_rewards
from megarl.rewards.length_rewards import cosine_scaled, ngram_repetition_fraction, overlong_penalty
from megarl.rewards.math_rewards import extract_gsm8k_answer, last_boxed_content


def call(name, solution, ground_truth="", data_source="test", extra_info=None, **kwargs):
    return get_reward(name).fn(data_source, solution, ground_truth, extra_info, **kwargs)


@pytest.mark.parametrize("solution, truth, expected", [
    ("The answer is \\boxed{12}", "12", 1.0),
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac12}", "\\dfrac{1}{2}", 1.0),
    ("x = \\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0),
    ("The answer is \\boxed{12}", "\\boxed{12}", 1.0),   # ground truth already boxed
    ("the answer is 12", "12", 1.0),                      # no box: the last expression
    ("\\boxed{13}", "12", 0.0),
    ("\\boxed{3} then 7", "7", 0.0),                      # a boxed answer wins over later numbers
    ("I do not know", "12", 0.0),
])
def test_math_accuracy(solution, truth, expected):
    assert call("math", solution, truth) == expected


@pytest.mark.parametrize("solution, truth, kwargs, expected", [
    ("She has 9 apples. #### 72", "72", {}, 1.0),
    ("#### 1,000", "1000", {}, 1.0),
    ("#### 72.0", "72", {}, 1.0),
    ("#### -3", "-3", {}, 1.0),
    ("#### 71", "72", {}, 0.0),
    ("#### 71", "72", {"format_score": 0.1}, 0.1),
    ("The answer is 72.", "72", {}, 0.0),                        # strict needs ####
    ("The answer is 72.", "72", {"method": "flexible"}, 1.0),
    ("#### 72" + " filler" * 60, "72", {}, 0.0),               # only the last 300 characters count
])
def test_gsm8k(solution, truth, kwargs, expected):
    assert call("gsm8k", solution, truth, **kwargs) == expected


def test_gsm8k_extraction():
    assert extract_gsm8k_answer("#### 5 and later #### $1,234") == "1234"
    assert extract_gsm8k_answer("no marker") is None
    assert extract_gsm8k_answer("x 3 then 4.", "flexible") == "4"


@pytest.mark.parametrize("solution, kwargs, expected", [
    ("<think>add them</think><answer>8</answer>", {}, 1.0),
    ("  <think>\nadd\n</think>\n<answer>\n8\n</answer>\n", {}, 1.0),
    ("<answer>8</answer>", {}, 0.0),                                   # missing think
    ("<think>add them</think> 8", {}, 0.0),                            # missing answer tags
    ("<answer>8</answer><think>x</think>", {}, 0.0),                   # wrong order
    ("<think>a</think><answer>8</answer><answer>9</answer>", {}, 0.0),  # duplicate tags
    ("<think>a</think><answer>  </answer>", {}, 0.0),                  # empty answer
    ("<think>a</think><answer>8</answer> trailing", {}, 0.0),          # text outside the tags
    ("add them</think><answer>8</answer>", {"think_in_prompt": True}, 1.0),
])
def test_think_answer_format(solution, kwargs, expected):
    assert call("format", solution, **kwargs) == expected


@pytest.mark.parametrize("solution, expected", [
    ("Thought: I should search.\nAction: search\nAction Input: capital of France", 1.0),
    ("Thought: I know it.\nFinal Answer: Paris", 1.0),
    ("Thought: both\nAction: search\nAction Input: x\nFinal Answer: Paris", 0.0),
    ("Action: search\nAction Input: x", 0.0),          # no Thought
    ("Thought: hmm\nAction: search", 0.0),              # Action without Action Input
    ("Thought:\nFinal Answer: Paris", 1.0),
    ("Thought: nothing else", 0.0),
])
def test_react_format(solution, expected):
    assert call("react_format", solution) == expected


def test_cosine_scaled_values():
    assert cosine_scaled(True, 0, 100) == pytest.approx(1.0)
    assert cosine_scaled(True, 50, 100) == pytest.approx(0.75)
    assert cosine_scaled(True, 100, 100) == pytest.approx(0.5)
    assert cosine_scaled(True, 400, 100) == pytest.approx(0.5)  # past max_length: clamped
    assert cosine_scaled(False, 0, 100) == pytest.approx(-1.0)
    assert cosine_scaled(False, 50, 100) == pytest.approx(-0.75)
    assert cosine_scaled(False, 100, 100) == pytest.approx(-0.5)
    # a quarter of the way: lo + (hi-lo) * (1 + cos(pi/4)) / 2
    assert cosine_scaled(True, 25, 100) == pytest.approx(0.5 + 0.5 * (1 + math.cos(math.pi / 4)) / 2)


def test_cosine_reward_uses_correctness_and_length():
    assert call("cosine", "\\boxed{12}", "12", extra_info={"response_length": 50}, max_length=100) == \
        pytest.approx({"score": 0.75, "acc": 1.0})
    assert call("cosine", "\\boxed{11}", "12", extra_info={"response_length": 50}, max_length=100) == \
        pytest.approx({"score": -0.75, "acc": 0.0})
    with pytest.raises(ValueError, match="response_length"):
        call("cosine", "\\boxed{12}", "12", max_length=100)


def test_repetition_penalty():
    assert ngram_repetition_fraction("a b a b a b", 2) == pytest.approx(0.6)  # 5 bigrams, 2 unique
    assert call("repetition", "a b a b a b", ngram_size=2) == pytest.approx(-0.6)
    assert call("repetition", "A b a B a b", ngram_size=2, max_penalty=-0.5) == pytest.approx(-0.3)
    assert call("repetition", "one two three four", ngram_size=2) == 0.0
    assert call("repetition", "too short", ngram_size=3) == 0.0
    with pytest.raises(ValueError, match="max_penalty"):
        call("repetition", "a a a", max_penalty=1.0)


@pytest.mark.parametrize("length, factor, expected", [
    (50, 1.0, 0.0), (80, 1.0, 0.0), (81, 1.0, -0.05), (90, 1.0, -0.5), (100, 1.0, -1.0), (90, 0.5, -0.25),
])
def test_overlong_penalty(length, factor, expected):
    # max_response_length 100, buffer 20: free up to 80 tokens, then -factor * (length - 80) / 20
    assert overlong_penalty(length, 100, 20, factor) == pytest.approx(expected)
    assert call("overlong", "", extra_info={"response_length": length}, max_response_length=100,
                overlong_buffer_len=20, penalty_factor=factor) == pytest.approx(expected)


def test_overlong_rejects_bad_buffer():
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty(10, 100, 0)


@pytest.mark.parametrize("solution, kwargs, expected", [
    ("8", {}, {"score": 1.0, "acc": 1.0}),
    ("8 is the answer, not 9", {}, {"score": 1.0, "acc": 1.0}),
    ("9 or maybe 8", {}, {"score": 0.25, "acc": 0.0}),               # first number 9: 0.5 * (1 - 1/2)
    ("9 or maybe 8", {"near_miss_credit": 0.0}, {"score": 0.0, "acc": 0.0}),
    ("9 or maybe 8", {"which": "last"}, {"score": 1.0, "acc": 1.0}),
    ("7", {}, {"score": 0.25, "acc": 0.0}),                         # 0.5 * (1 - 1/2)
    ("6", {}, {"score": 0.0, "acc": 0.0}),                          # 0.5 * max(0, 1 - 2/2)
    ("6", {"near_miss_credit": 1.0, "near_miss_range": 4}, {"score": 0.5, "acc": 0.0}),
    ("30", {}, {"score": 0.0, "acc": 0.0}),                         # too far for credit
    ("no digits", {}, {"score": 0.0, "acc": 0.0}),
])
def test_synthetic_arith(solution, kwargs, expected):
    assert call("synthetic_arith", solution, "8", **kwargs) == pytest.approx(expected)


def test_default_dispatches_on_data_source():
    assert call("default", "#### 72", "72", data_source="openai/gsm8k") == 1.0
    assert call("default", "\\boxed{\\frac{1}{2}}", "0.5", data_source="DigitalLearningGmbH/MATH-lighteval") == 1.0
    assert call("default", "\\boxed{5}", "5", data_source="aime_2024") == 1.0
    assert call("default", "3", "3", data_source="synthetic/arith") == {"score": 1.0, "acc": 1.0}
    with pytest.raises(ValueError, match="openai/gsm8k"):
        call("default", "x", "y", data_source="my/unknown")


def test_registry_lists_names_and_rejects_conflicts():
    assert {"math", "gsm8k", "format", "react_format", "cosine", "repetition", "overlong", "synthetic_arith",
            "default", "reward_model"} <= set(registered_rewards())
    with pytest.raises(KeyError, match="registered: .*gsm8k"):
        get_reward("gsm8kk")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(lambda *a: 0.0)


def test_last_boxed_content():
    assert last_boxed_content("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed_content("\\boxed{{a}+{b}}") == "{a}+{b}"
    assert last_boxed_content("\\boxed 5$") == "5"
    assert last_boxed_content("\\boxed{unclosed") is None
    assert last_boxed_content("nothing") is None


def test_math_reward_works_off_the_main_thread():
    # math-verify's own timeout uses signal.alarm (main thread only); elsewhere it must be switched off.
    import threading

    results = []
    thread = threading.Thread(target=lambda: results.append(call("math", "\\boxed{\\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join(timeout=60)
    assert results == [1.0]
