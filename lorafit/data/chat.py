"""Tokenisation through the chat template, with labels on the assistant's turns only.

Which characters belong to an assistant turn is learned from the template itself, never by searching for
marker strings. For the assistant message at index i:

    before  = render(messages[:i], add_generation_prompt=True)    # ... up to the opened assistant turn
    through = render(messages[:i + 1])                            # ... including that turn
    full    = render(messages)

and the turn is the text full[len(before):len(through)]: its content, the template's end-of-turn token and
whatever the template writes after it. That only holds if `before` is a prefix of `through` and `through`
of `full` (the "prefix property"); templates that rewrite earlier turns (for instance dropping reasoning
from past answers) break it, and get an error naming the template rather than silently wrong labels.

The full text is then tokenised ONCE, with offsets, so labelled tokens are exactly the tokens the model
trains on; a token is labelled when its characters overlap an assistant span. The end-of-turn token lies
inside the span and so is always learned, whatever the pad token is (padding is masked by position, later).
"""

import warnings

import torch

from ..errors import DataError
from .formats import Sample

IGNORE = -100  # the label that cross-entropy skips (PyTorch's ignore_index default)

# For tokenizers without a chat template (base models): a plain, readable layout, with EOS closing every
# assistant turn so that generation learns to stop. BOS leads, as most base models saw it in pre-training.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

# Texts per tokenizer call: enough for the Rust tokenizer to batch well, small enough to keep memory flat.
TOKENIZE_CHUNK = 1024


class ChatTemplate:
    """A tokenizer's chat template (or the fallback), rendered to text with assistant spans."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if getattr(tokenizer, "chat_template", None):
            self.template, self.name = None, f"the chat template of {name}"  # None: the tokenizer's own
        else:
            if tokenizer.eos_token is None:
                raise DataError(f"tokenizer {name} has neither a chat template nor an EOS token: give it a template")
            warnings.warn(
                f"tokenizer {name} has no chat template: using lorafit's fallback '### User: / ### Assistant:' "
                "template (EOS after each answer); save the tokenizer with it so that inference matches",
                stacklevel=3,
            )
            self.template, self.name = FALLBACK_CHAT_TEMPLATE, "lorafit's fallback chat template"

    def render(self, messages, where: str, add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # templates raise their own errors (jinja's raise_exception, TypeErrors, ...)
            raise DataError(f"{where}: {self.name} cannot render this conversation: {e}") from None

    def render_with_spans(self, messages, where: str) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans [start, end) of every assistant message."""
        full = self.render(messages, where)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], where, add_generation_prompt=True)
            through = self.render(messages[: i + 1], where)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(
                    f"{where}: {self.name} does not render conversations prefix by prefix (message {i + 1} renders "
                    "differently once later turns follow), so lorafit cannot tell the assistant's tokens apart; "
                    "use another template or train_on_responses_only=False"
                )
            if len(through) == len(before):
                raise DataError(f"{where}: {self.name} renders assistant message {i + 1} as no text at all")
            spans.append((len(before), len(through)))
        return full, spans


def tokenize_samples(tokenizer, samples: list[Sample], train_on_responses_only: bool = True):
    """-> one (input_ids, labels) pair of int lists per sample, in order.

    Chat samples go through the chat template (which carries any BOS itself, so the tokenizer adds no
    special tokens); text samples are tokenised as the tokenizer does by default, plus EOS, all labelled.
    The first label is always IGNORE: no token predicts it, and in a packed row it keeps the previous
    document's last token from being trained to predict this one's first.
    """
    results: list[tuple[list[int], list[int]] | None] = [None] * len(samples)
    chats = [k for k, s in enumerate(samples) if s.messages is not None]
    texts = [k for k, s in enumerate(samples) if s.messages is None]

    if chats and train_on_responses_only:
        if not getattr(tokenizer, "is_fast", False):
            name = type(tokenizer).__name__
            raise DataError(f"tokenizer {name} is not a fast (Rust) tokenizer; lorafit needs its offset mappings")
        template = ChatTemplate(tokenizer)
        for chunk in _chunks(chats):
            rendered = [template.render_with_spans(samples[k].messages, samples[k].where) for k in chunk]
            encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
            for k, (_, spans), ids, offsets in zip(chunk, rendered, encoded["input_ids"], encoded["offset_mapping"]):
                results[k] = (ids, _without_first(_span_labels(ids, offsets, spans)))
    elif chats:  # every token is learned: the spans (and the prefix property) are not needed
        template = ChatTemplate(tokenizer)
        for chunk in _chunks(chats):
            rendered = [template.render(samples[k].messages, samples[k].where) for k in chunk]
            for k, ids in zip(chunk, tokenizer(rendered, add_special_tokens=False)["input_ids"]):
                results[k] = (ids, _without_first(ids))

    if texts:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("text rows need an EOS token to close each document, and this tokenizer has none")
        for chunk in _chunks(texts):
            encoded = tokenizer([samples[k].text for k in chunk])
            for k, ids in zip(chunk, encoded["input_ids"]):
                ids = list(ids) if ids and ids[-1] == eos else [*ids, eos]  # some tokenizers add EOS themselves
                results[k] = (ids, _without_first(ids))
    return results


def _span_labels(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Labels = ids where a token's characters overlap an assistant span, IGNORE elsewhere. Tokens and spans
    are both in text order, so one pass over each suffices."""
    labels = [IGNORE] * len(ids)
    s = 0
    for j, (start, end) in enumerate(offsets):
        while s < len(spans) and spans[s][1] <= start:
            s += 1  # this span ends before the token: move on
        if s == len(spans):
            break
        span_start, span_end = spans[s]
        # A zero-width token (some tokenizers give special tokens no characters) counts where it stands.
        inside = end > span_start if end > start else start >= span_start
        if inside:  # (start < span_end holds: spans ending at or before `start` were skipped)
            labels[j] = ids[j]
    return labels


def _without_first(labels: list[int]) -> list[int]:
    return [IGNORE, *labels[1:]] if labels else labels


def _chunks(indices: list[int]):
    for i in range(0, len(indices), TOKENIZE_CHUNK):
        yield indices[i : i + TOKENIZE_CHUNK]


def labelled_spans(ids, labels) -> list[list[int]]:
    """The runs of consecutive labelled tokens (useful to show or check what a model will learn)."""
    runs, current = [], []
    for token, label in zip(torch.as_tensor(ids).tolist(), torch.as_tensor(labels).tolist()):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs
