"""Reward functions for GRPO: the built-ins, finding the user's own, and scoring a batch of completions.

Every reward function has TRL's signature, so functions written for TRL work unchanged:

    def my_reward(prompts: list[list[dict]], completions: list[str], **columns) -> list[float]:

`prompts[i]` is the chat messages completion i answers; `columns` holds every other column of the data as a
list aligned with `completions` (e.g. `answer=[...]`); a function takes the columns it needs by name and
ignores the rest through `**columns`. It returns one finite number per completion.

Built-ins (by name):
    numeric_answer   1.0 when the completion's final number equals the reference in column `answer`
    answer_format    1.0 when the completion ends with a line `#### <number>` (GSM8K's layout)

Anything else is named "module:function" (a module on the Python path) or "path/to/file.py:function" (a
file, for instance one next to the config). The user names that code explicitly; it is imported, never
evaluated from a string.
"""

import copy
import difflib
import hashlib
import importlib
import importlib.util
import math
import numbers
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable

from .errors import ConfigError, LorafitError

RewardFunction = Callable[..., list]
ON_ERROR = ("stop", "skip")


class RewardError(LorafitError):
    """A reward function failed or returned something other than one finite number per completion: the
    message names the function, the completion and the data row."""


# ------------------------------------------------------------------------------------------ numbers in text

# A number as people and models write it: an optional minus sign, an optional "$", digits with optional
# thousands commas, an optional decimal part. A minus directly after a digit, letter or bracket is the
# operator of "9-3", not a sign; "7." at the end of a sentence is 7.
_NUMBER = re.compile(r"(?:(?<![\w)\]])(?P<sign>[-−]))?\$?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?")
_FORMAT_LINE = re.compile(r"\s*####\s*" + _NUMBER.pattern + r"\s*")


def final_number(text: str) -> Decimal | None:
    """The answer a text gives: the number right after its last "####" when it has one (GSM8K's layout; what
    follows that number is ignored), else its last number. None when there is no such number."""
    _, marker, tail = text.rpartition("####")
    if marker:
        match = _NUMBER.search(tail)
    else:
        match = None
        for match in _NUMBER.finditer(text):
            pass  # keep the last one
    if match is None:
        return None
    sign = "-" if match["sign"] else ""
    return Decimal(sign + match["int"].replace(",", "") + (match["frac"] or ""))


# ------------------------------------------------------------------------------------------ built-ins


def numeric_answer(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion's final number (see `final_number`) equals the reference, else 0.0. The
    reference is column `answer`: the number after "####" in a GSM8K solution, else the answer's own number
    ("7", or 7). Compared as numbers: 7 == 7.0, 1,000 == 1000."""
    if "answer" not in columns:
        have = ", ".join(columns) or "none"
        raise ValueError(f"numeric_answer needs the reference answer in a column named 'answer'; columns: {have}")
    rewards = []
    for completion, reference in zip(completions, columns["answer"], strict=True):
        expected = final_number(str(reference))
        if expected is None:
            raise ValueError(f"numeric_answer: the reference answer {str(reference)!r:.80} holds no number")
        rewards.append(1.0 if final_number(completion) == expected else 0.0)
    return rewards


def answer_format(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion's last non-empty line is `#### <number>` (GSM8K's layout), else 0.0."""
    rewards = []
    for completion in completions:
        lines = [line for line in completion.splitlines() if line.strip()]
        rewards.append(1.0 if lines and _FORMAT_LINE.fullmatch(lines[-1]) else 0.0)
    return rewards


BUILTIN_REWARDS: dict[str, RewardFunction] = {"numeric_answer": numeric_answer, "answer_format": answer_format}


# ------------------------------------------------------------------------------------------ finding functions


def resolve_reward_functions(specs: list[str], base_dir=None) -> list[tuple[str, RewardFunction]]:
    """-> [(name, function)] for specs such as "numeric_answer", "my_pkg.rewards:length_penalty" or
    "my_rewards.py:fn". A relative file path is taken from `base_dir` (the config's folder) when given, else
    from the working directory. The name is the built-in's or the function's name."""
    resolved, seen = [], {}
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"reward function {spec!r}: expected a built-in name or 'module:function'")
        spec = spec.strip()
        name, function = _resolve(spec, base_dir)
        if name in seen:
            raise ConfigError(f"reward functions {seen[name]!r} and {spec!r} share the name {name!r}: "
                              "list a function once (weights scale it) and give different functions different names")
        seen[name] = spec
        resolved.append((name, function))
    return resolved


def _resolve(spec: str, base_dir) -> tuple[str, RewardFunction]:
    if ":" not in spec:
        if spec in BUILTIN_REWARDS:
            return spec, BUILTIN_REWARDS[spec]
        close = difflib.get_close_matches(spec, BUILTIN_REWARDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown reward function {spec!r}; {hint}built-ins: {', '.join(BUILTIN_REWARDS)}; "
                          "or name your own as 'module:function' or 'path/to/file.py:function'")
    source, _, attribute = spec.rpartition(":")  # the last colon: a Windows path has one of its own
    if not source or not attribute.isidentifier():
        raise ConfigError(f"reward function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if source.endswith(".py") or "/" in source or "\\" in source:
        module, place = _load_file(spec, Path(base_dir or ".") / source), f"file {source}"
    else:
        module, place = _import_module(spec, source), f"module {source}"
    if not hasattr(module, attribute):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(f"reward function {spec!r}: {place} has no {attribute!r}; "
                          f"it defines {', '.join(defined) or 'no public functions'}")
    function = getattr(module, attribute)
    if not callable(function):
        raise ConfigError(f"reward function {spec!r}: {attribute!r} in {place} is not a function "
                          f"(its type is {type(function).__name__})")
    return attribute, function


def _import_module(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(f"reward function {spec!r}: no module named {name!r} on the Python path "
                              f"(for a file, give its path: {name.replace('.', '/')}.py:...)") from None
        raise ConfigError(f"reward function {spec!r}: importing {name} failed: {e}") from e
    except Exception as e:  # the user's module raised while it was imported
        raise ConfigError(f"reward function {spec!r}: importing {name} failed: {type(e).__name__}: {e}") from e


def _load_file(spec: str, path: Path):
    if not path.is_file():
        raise ConfigError(f"reward function {spec!r}: no such file {path}")
    path = path.resolve()
    # A module name of its own per file (two users' files may both be called rewards.py). It goes into
    # sys.modules before the code runs, as `import` does: dataclasses and pickle look modules up there.
    name = f"lorafit_user_rewards_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file raised (or has a syntax error) while it was loaded
        del sys.modules[name]
        raise ConfigError(f"reward function {spec!r}: loading {path} failed: {type(e).__name__}: {e}") from e
    return module


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class RewardScores:
    per_function: dict[str, list[float]]  # name -> one value per completion (NaN where invalid)
    total: list[float]  # weighted sum per completion (NaN where any function failed)
    invalid: list[int]  # completion indices with a failed reward
    problems: list[str]  # what went wrong, for the log


def score_completions(functions, weights, items, completions: list[str], on_error: str = "stop") -> RewardScores:
    """Scores completions[i], an answer to items[i] (a PromptItem; the caller repeats each item once per
    completion), with every function, each called once on the whole batch.

    A function that raises, or returns NaN, inf or None for a completion, stops training with a RewardError
    (on_error="stop") or marks those completions invalid and records the problem (on_error="skip"). A wrong
    number of values, or a value that is not a number, always stops: that is a bug in the function.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    weights = [1.0] * len(functions) if weights is None else list(weights)
    if len(weights) != len(functions):
        raise ValueError(f"{len(weights)} reward weights for {len(functions)} reward functions")
    if len(items) != len(completions):
        raise ValueError(f"{len(items)} prompt items for {len(completions)} completions")

    n = len(completions)
    column_names = list(dict.fromkeys(k for item in items for k in item.columns))  # first-seen order
    per_function, problems, invalid = {}, [], set()
    for name, function in functions:
        # Copies: a function that edits its arguments must not change what the next function sees.
        prompts = [copy.deepcopy(item.prompt) for item in items]
        columns = {k: [copy.deepcopy(item.columns.get(k)) for item in items] for k in column_names}
        try:
            values = function(prompts, list(completions), **columns)
        except Exception as e:
            where = items[0].where if items else "no prompts"
            message = f"reward {name} raised {type(e).__name__}: {e} (batch from prompt {where})"
            if on_error == "stop":
                raise RewardError(message) from e
            problems.append(message + f"; its {n} completions count as invalid")
            per_function[name] = [math.nan] * n
            invalid.update(range(n))
            continue
        values = _checked_list(name, values, n)
        scores = []
        for i, value in enumerate(values):
            if value is None or not math.isfinite(value):
                message = f"reward {name} returned {value} for completion {i} (prompt {items[i].where})"
                if on_error == "stop":
                    raise RewardError(message)
                problems.append(message)
                invalid.add(i)
                scores.append(math.nan)
            else:
                scores.append(float(value))
        per_function[name] = scores

    total = [
        math.nan if i in invalid else sum(w * per_function[name][i] for w, (name, _) in zip(weights, functions))
        for i in range(n)
    ]
    return RewardScores(per_function, total, sorted(invalid), problems)


def _checked_list(name: str, values, expected: int) -> list:
    """The function's values as a list of numbers or None, or a RewardError: shape and type errors are bugs
    in the function, whatever on_error says."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # a NumPy array or a torch tensor
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward {name} returned a {type(values).__name__}; expected a list of {expected} numbers "
                          "(one per completion)")
    if len(values) != expected:
        raise RewardError(f"reward {name} returned {len(values)} values for {expected} completions; expected "
                          f"{expected} (one per completion)")
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, numbers.Real):
            raise RewardError(f"reward {name} returned a {type(value).__name__} ({value!r:.40}) for completion {i}; "
                              "rewards must be numbers")
    return list(values)
