"""Reward functions: the built-ins on real GSM8K and reasoning-gym rows, finding the user's own, and the
checks that turn a broken reward into a clear error (or, on request, into skipped completions)."""

import json
import math
from pathlib import Path

import pytest

from lorafit.data.prompts import PromptItem
from lorafit.errors import ConfigError, LorafitError
from lorafit.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    answer_format,
    final_number,
    numeric_answer,
    resolve_reward_functions,
    score_completions,
)

DATA = Path(__file__).resolve().parent.parent / "data"


def _rows(name: str, n: int) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _items(answers, where="train.jsonl") -> list[PromptItem]:
    return [PromptItem([1, 2], [{"role": "user", "content": f"q{i}"}], {"answer": a}, f"{where}:{i + 1}")
            for i, a in enumerate(answers)]


# ------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("text, number", [
    ("3 + 4 = 7", "7"),
    ("The answer is 7.", "7"),
    ("7", "7"),
    ("It costs $1,000.", "1000"),
    ("She paid $12.50 in all", "12.5"),
    ("2 - 9 = -7", "-7"),
    ("9-3", "3"),  # the minus of an operation is no sign
    ("first 12, then 3, 4", "4"),
    ("#### 72", "72"),
    ("So 24 + 48 = 72 clips.\n#### 72\n\nNext question: 15 apples", "72"),  # the number right after ####
    ("#### 1,080", "1080"),
    ("####-3", "-3"),
    ("0.50", "0.5"),
])
def test_final_number(text, number):
    from decimal import Decimal

    assert final_number(text) == Decimal(number)


def test_final_number_without_a_number():
    assert final_number("I don't know.") is None
    assert final_number("#### I don't know") is None  # committed to ####, gave no number: no answer


def test_numeric_answer_compares_numbers_not_text():
    completions = ["3 + 4 = 7", "The answer is 7.", "7.0", "7,000", "#### 7", "no idea", "8", "-7"]
    assert numeric_answer(None, completions, answer=["7"] * 8) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert numeric_answer(None, ["1,000 dollars", "$1000"], answer=["#### 1,000", "1000"]) == [1.0, 1.0]
    assert numeric_answer(None, ["7", "-3"], answer=[7, -3]) == [1.0, 1.0]  # non-string references: str()


def test_gsm8k_solutions_score_one_against_their_own_answer():
    rows = _rows("gsm8k_train_1k.jsonl", 50)
    solutions = [row["answer"] for row in rows]
    assert numeric_answer(None, solutions, answer=solutions) == [1.0] * 50
    assert answer_format(None, solutions) == [1.0] * 50
    # ... and a solution scored against the next row's answer is wrong (the answers of rows 1 and 2 differ).
    assert numeric_answer(None, solutions[:1], answer=solutions[1:2]) == [0.0]
    first = rows[0]  # Natalia's clips: "...#### 72"
    assert final_number(first["answer"]) == 72
    assert numeric_answer(None, ["She sold 72 clips."], answer=[first["answer"]]) == [1.0]


def test_chain_sum_references():
    rows = _rows("chain_sum.jsonl", 200)
    assert rows[0] == {"question": "State the final answer to the following arithmetic problem: 2 + 5 =", "answer": "7"}
    for row in rows:
        expression = row["question"].split(": ", 1)[1].rstrip(" =")
        a, op, b = expression.split()
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert any(int(row["answer"]) < 0 for row in rows)  # negative references exist, and are matched:
    completions = [f"{row['question'].split(': ', 1)[1]} {row['answer']}" for row in rows]  # "2 + 5 = 7"
    assert numeric_answer(None, completions, answer=[row["answer"] for row in rows]) == [1.0] * len(rows)


def test_numeric_answer_errors_name_the_column_and_the_reference():
    with pytest.raises(ValueError, match=r"numeric_answer needs .* column named 'answer'; columns: solution"):
        numeric_answer(None, ["7"], solution=["7"])
    with pytest.raises(ValueError, match=r"reference answer 'seven' holds no number"):
        numeric_answer(None, ["7"], answer=["seven"])


def test_answer_format():
    completions = [
        "2 + 5 = 7\n#### 7", "#### 7\n\n", "  ####   -1,000.5  ", "#### 7 apples", "The answer is 7", "#### 7\nok",
        "", "####",
    ]
    assert answer_format(None, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------ resolving


def test_builtins_resolve_by_name():
    assert resolve_reward_functions(["numeric_answer", "answer_format"]) == list(BUILTIN_REWARDS.items())


def test_unknown_builtin_lists_the_builtins_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown reward function 'numeric_answr'; did you mean 'numeric_answer'\? "
                                          r"built-ins: numeric_answer, answer_format"):
        resolve_reward_functions(["numeric_answr"])


def test_user_function_from_a_file(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, **columns):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n"
        "NOT_A_FUNCTION = 3\n"
    )
    [(name, fn)] = resolve_reward_functions([f"{tmp_path / 'my_rewards.py'}:brevity"])
    assert name == "brevity" and fn(None, ["abc", ""]) == [0.25, 1.0]
    [(name, same)] = resolve_reward_functions(["my_rewards.py:brevity"], base_dir=tmp_path)  # next to a config
    assert same(None, ["abc"]) == [0.25]
    with pytest.raises(ConfigError, match=r"my_rewards.py has no 'lenght'; it defines brevity"):
        resolve_reward_functions(["my_rewards.py:lenght"], base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"'NOT_A_FUNCTION' in file my_rewards.py is not a function \(.* int\)"):
        resolve_reward_functions(["my_rewards.py:NOT_A_FUNCTION"], base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"no such file .*missing.py"):
        resolve_reward_functions(["missing.py:fn"], base_dir=tmp_path)


def test_user_file_that_fails_to_load(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(ConfigError, match=r"loading .*broken.py failed: RuntimeError: no GPU here"):
        resolve_reward_functions(["broken.py:fn"], base_dir=tmp_path)


def test_user_function_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text(
        "def always_one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    [(name, fn)] = resolve_reward_functions(["team_rewards:always_one"])
    assert name == "always_one" and fn(None, ["a", "b"]) == [1.0, 1.0]
    with pytest.raises(ConfigError, match=r"no module named 'no_such_rewards_module' on the Python path"):
        resolve_reward_functions(["no_such_rewards_module:fn"])
    with pytest.raises(ConfigError, match=r"module json has no 'nope'"):
        resolve_reward_functions(["json:nope"])


def test_bad_specs():
    with pytest.raises(ConfigError, match=r"expected 'module:function'"):
        resolve_reward_functions(["json:"])
    with pytest.raises(ConfigError, match=r"share the name 'numeric_answer'"):
        resolve_reward_functions(["numeric_answer", "numeric_answer"])


# ------------------------------------------------------------------------------------------ scoring


def test_scores_are_weighted_and_columns_aligned():
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, columns=columns)
        return [0.5] * len(completions)

    items = _items(["7", "7", "5", "5"])
    functions = [("numeric_answer", numeric_answer), ("spy", spy)]
    scores = score_completions(functions, [2.0, 1.0], items, ["7", "6", "5", "#### 5"])
    assert scores.per_function == {"numeric_answer": [1.0, 0.0, 1.0, 1.0], "spy": [0.5] * 4}
    assert scores.total == [2.5, 0.5, 2.5, 2.5] and scores.invalid == [] and scores.problems == []
    assert seen["columns"] == {"answer": ["7", "7", "5", "5"]}
    assert seen["prompts"][2] == [{"role": "user", "content": "q2"}] and seen["completions"][3] == "#### 5"
    assert score_completions(functions, None, items, ["7"] * 4).total == [1.5, 1.5, 0.5, 0.5]  # weights 1.0


def test_a_function_that_raises_stops_or_is_skipped():
    def crash(prompts, completions, **columns):
        raise KeyError("solution")

    items = _items(["7", "8"], where="gsm8k.jsonl")
    functions = [("numeric_answer", numeric_answer), ("crash", crash)]
    expected = r"reward crash raised KeyError: 'solution' \(batch from prompt gsm8k.jsonl:1\)"
    with pytest.raises(RewardError, match=expected):
        score_completions(functions, None, items, ["7", "8"])
    scores = score_completions(functions, None, items, ["7", "8"], on_error="skip")
    assert scores.invalid == [0, 1] and all(math.isnan(t) for t in scores.total)
    assert scores.per_function["numeric_answer"] == [1.0, 1.0] and all(map(math.isnan, scores.per_function["crash"]))
    [problem] = scores.problems
    assert "reward crash raised KeyError" in problem and "2 completions count as invalid" in problem
    assert issubclass(RewardError, LorafitError)


def test_nan_inf_none_stop_or_mark_the_completion_invalid():
    def flaky(prompts, completions, **columns):
        return [1.0, math.nan, None, math.inf]

    items = _items(["1", "2", "3", "4"])
    with pytest.raises(RewardError, match=r"reward flaky returned nan for completion 1 \(prompt train.jsonl:2\)"):
        score_completions([("flaky", flaky)], None, items, ["a"] * 4)
    scores = score_completions([("flaky", flaky), ("numeric_answer", numeric_answer)], None, items,
                               ["1", "2", "3", "4"], on_error="skip")
    assert scores.invalid == [1, 2, 3] and scores.total[0] == 2.0 and all(map(math.isnan, scores.total[1:]))
    assert scores.per_function["numeric_answer"] == [1.0] * 4  # other functions keep their values
    assert scores.problems == [
        "reward flaky returned nan for completion 1 (prompt train.jsonl:2)",
        "reward flaky returned None for completion 2 (prompt train.jsonl:3)",
        "reward flaky returned inf for completion 3 (prompt train.jsonl:4)",
    ]


@pytest.mark.parametrize("on_error", ["stop", "skip"])
def test_wrong_count_or_type_always_stops(on_error):
    items = _items(["1", "2"])
    too_few = [("short", lambda prompts, completions, **c: [1.0])]
    with pytest.raises(RewardError, match=r"reward short returned 1 values for 2 completions; expected 2"):
        score_completions(too_few, None, items, ["a", "b"], on_error=on_error)
    text = [("text", lambda prompts, completions, **c: [1.0, "1.0"])]
    with pytest.raises(RewardError, match=r"reward text returned a str \('1.0'\) for completion 1; rewards must be"):
        score_completions(text, None, items, ["a", "b"], on_error=on_error)
    scalar = [("scalar", lambda prompts, completions, **c: 1.0)]
    with pytest.raises(RewardError, match=r"reward scalar returned a float; expected a list of 2 numbers"):
        score_completions(scalar, None, items, ["a", "b"], on_error=on_error)


def test_argument_errors():
    functions = [("numeric_answer", numeric_answer)]
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        score_completions(functions, [1.0, 2.0], _items(["1"]), ["1"])
    with pytest.raises(ValueError, match="1 prompt items for 2 completions"):
        score_completions(functions, None, _items(["1"]), ["1", "2"])
    with pytest.raises(ValueError, match="on_error must be one of stop, skip"):
        score_completions(functions, None, _items(["1"]), ["1"], on_error="ignore")
