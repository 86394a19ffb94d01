"""Dataset formats: each row becomes a chat (a list of {"role", "content"} messages) or a plain text.

Formats, told apart by their keys (the first row decides for the whole file, so that a later row that
lacks its fields gets an error naming the format it was expected to have):

- alpaca:   instruction, input (optional), output, system (optional), history (optional list of
            [user, assistant] pairs that came before). Self-instruct's files (instruction + a list of
            `instances`, each an input and an output) are alpaca too: one example per instance.
- sharegpt: conversations, a list of {"from", "value"} with from = human / user, gpt / assistant, system;
            an optional top-level `system`.
- messages: messages, a list of {"role", "content"} with role = system, user, assistant.
- qa:       question, answer (GSM8K's layout): one user turn and one assistant turn.
- text:     text, trained on in full.

Rows with `chosen` and `rejected` are preference data and are refused with a pointer to DPO.
An assistant turn with empty content is an error, not a skipped row: it is nearly always a data bug, and
training on the other rows silently would hide it (DESIGN §4: bad input gets a clear error).
"""

from dataclasses import dataclass

from ..errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "qa", "text")
FIELDS = {
    "alpaca": "instruction, input, output",
    "sharegpt": "conversations",
    "messages": "messages",
    "qa": "question, answer",
    "text": "text",
}
EXPECTED = "; ".join(f"{name} ({fields})" for name, fields in FIELDS.items())

# Role names seen in the wild -> the three roles chat templates know.
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Sample:
    """One training example before tokenisation: exactly one of `messages` and `text` is set."""

    where: str
    messages: tuple[dict, ...] | None = None
    text: str | None = None


def detect_format(row: dict) -> str | None:
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and ("output" in row or "instances" in row):
        return "alpaca"
    if "question" in row and "answer" in row:
        return "qa"
    if "text" in row:
        return "text"
    return None


def to_samples(rows: list[tuple[str, dict]], format: str = "auto") -> tuple[list[Sample], str]:
    """Normalises rows of one file; returns the samples and the format used."""
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; choose auto, {', '.join(FORMATS)}")
    if not rows:
        return [], format
    if format == "auto":
        where, first = rows[0]
        format = detect_format(first)
        if format == "preference":
            raise DataError(f"{where}: a preference row (chosen / rejected): train on it with the DPO recipe, not SFT")
        if format is None:
            raise DataError(f"{where}: no usable fields (keys: {_keys(first)}); expected one of: {EXPECTED}")
    convert = CONVERTERS[format]
    samples: list[Sample] = []
    for where, row in rows:
        samples.extend(convert(where, row))
    return samples, format


def _alpaca(where: str, row: dict) -> list[Sample]:
    instances = row.get("instances")
    if instances is not None and "output" not in row:  # self-instruct
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{where}: 'instances' must be a non-empty list of {{input, output}} objects")
        samples = []
        for k, instance in enumerate(instances, start=1):
            if not isinstance(instance, dict):
                raise DataError(f"{where}: instance {k} must be an object with input and output")
            place = where if len(instances) == 1 else f"{where} instance {k}"
            samples.extend(_alpaca(place, {**row, **instance, "instances": None}))
        return samples
    _require(where, row, "alpaca", ("instruction", "output"))
    instruction = _text(where, row, "instruction")
    extra = _text(where, row, "input")
    prompt = "\n\n".join(part for part in (instruction, extra) if part)  # the instruction, then its input
    if not prompt.strip():
        raise DataError(f"{where}: instruction and input are both empty")
    messages = []
    system = _text(where, row, "system")
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: 'history' must be a list of [user, assistant] pairs")
    for k, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{where}: history entry {k} must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(where, row, "output")}]
    return [_chat(where, messages)]


def _sharegpt(where: str, row: dict) -> list[Sample]:
    _require(where, row, "sharegpt", ("conversations",))
    messages = []
    system = _text(where, row, "system")
    if system:
        messages.append({"role": "system", "content": system})
    messages += _turns(where, row["conversations"], "conversations")
    return [_chat(where, messages)]


def _messages(where: str, row: dict) -> list[Sample]:
    _require(where, row, "messages", ("messages",))
    return [_chat(where, _turns(where, row["messages"], "messages"))]


def _qa(where: str, row: dict) -> list[Sample]:
    _require(where, row, "qa", ("question", "answer"))
    messages = [{"role": "user", "content": _text(where, row, "question")},
                {"role": "assistant", "content": _text(where, row, "answer")}]
    return [_chat(where, messages)]


def _text_row(where: str, row: dict) -> list[Sample]:
    _require(where, row, "text", ("text",))
    text = _text(where, row, "text")
    if not text.strip():
        raise DataError(f"{where}: 'text' is empty")
    return [Sample(where, text=text)]


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages, "qa": _qa, "text": _text_row}


def _turns(where: str, turns, key: str) -> list[dict]:
    """A list of {role, content} or {from, value} turns (either spelling in either format)."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{key}' must be a non-empty list of turns")
    messages = []
    for k, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {key} turn {k} must be an object, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise DataError(f"{where}: {key} turn {k} has role {role!r}; supported: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key} turn {k} needs text content (a string), got {type(content).__name__}")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def _chat(where: str, messages: list[dict]) -> Sample:
    turns = [k for k, m in enumerate(messages, start=1) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{where}: no assistant turn, so nothing to learn; SFT needs at least one")
    for k in turns:
        if not messages[k - 1]["content"].strip():
            raise DataError(f"{where}: the assistant turn (message {k}) is empty; fill it in or remove the row")
    return Sample(where, messages=tuple(messages))


def _require(where: str, row: dict, format: str, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if row.get(k) is None]
    if missing:
        raise DataError(
            f"{where}: missing {', '.join(missing)} for the {format} format ({FIELDS[format]}); keys here: {_keys(row)}"
        )


def _text(where: str, row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:  # absent, or a null cell in CSV / Parquet: an optional field left empty
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be text, got {type(value).__name__}")
    return value


def _keys(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"
