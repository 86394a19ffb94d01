"""Prompt data for GRPO: both layouts through SmolLM2's real chat template, the system prompt, skipped rows
with their counts, the held-out split, deterministic batches that resume, and the errors."""

import copy
import json
from pathlib import Path

import pytest

from lorafit.data.prompts import load_prompt_dataset
from lorafit.errors import DataError
from lorafit.generate import encode_prompt

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_question_answer_layout_on_chain_sum(tokenizer):
    data = load_prompt_dataset(DATA / "chain_sum.jsonl", tokenizer, max_prompt_length=256)
    assert len(data.train) == 1000 and data.eval == []
    first = data.train[0]
    question = "State the final answer to the following arithmetic problem: 2 + 5 ="
    assert first.prompt == [{"role": "user", "content": question}]
    assert first.columns == {"answer": "7"} and first.where.endswith("chain_sum.jsonl:1")
    assert first.prompt_ids == encode_prompt(tokenizer, first.prompt)  # exactly what generation renders
    text = tokenizer.decode(first.prompt_ids)
    assert text.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert data.summary() == "prompt data: 1000 training prompts, 0 held out"


def test_prompt_layout_with_text_and_messages_keeps_other_columns(tokenizer, tmp_path):
    conversation = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}]
    path = _write(tmp_path / "trl.jsonl", [
        {"prompt": "Say hi.", "tests": ["hi"], "difficulty": 1},
        {"prompt": conversation, "solution": "Blue"},
    ])
    data = load_prompt_dataset(path, tokenizer, 128)
    text, chat = data.train
    assert text.prompt == [{"role": "user", "content": "Say hi."}]
    assert text.columns == {"tests": ["hi"], "difficulty": 1}
    assert chat.prompt == conversation and chat.columns == {"solution": "Blue"}
    assert tokenizer.decode(chat.prompt_ids).startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")


def test_system_prompt_is_added_unless_the_row_has_one(tokenizer, tmp_path):
    own = [{"role": "system", "content": "Own."}, {"role": "user", "content": "2+2?"}]
    path = _write(tmp_path / "p.jsonl", [{"question": "1+1?", "answer": "2"}, {"prompt": own}])
    data = load_prompt_dataset(path, tokenizer, 128, system_prompt="Think, then answer after ####.")
    added, kept = data.train
    assert added.prompt == [{"role": "system", "content": "Think, then answer after ####."},
                            {"role": "user", "content": "1+1?"}]
    assert tokenizer.decode(added.prompt_ids).startswith("<|im_start|>system\nThink, then answer after ####.<|im_end|>")
    assert kept.prompt == own
    # Without one, SmolLM2's template writes its own default system message.
    plain = load_prompt_dataset(path, tokenizer, 128).train[0]
    assert plain.prompt == [{"role": "user", "content": "1+1?"}] and "SmolLM" in tokenizer.decode(plain.prompt_ids)


def test_long_prompts_and_rows_without_prompt_are_skipped_and_counted(tokenizer, tmp_path):
    long_question = "Add these numbers: " + " + ".join(["7"] * 200)
    rows = [{"question": "1+1?", "answer": "2"}, {"question": long_question, "answer": "1400"},
            {"text": "no prompt here"}, {"question": "  ", "answer": "0"},
            {"question": "What is two plus two?", "answer": "4"},
            {"question": long_question, "answer": "1400"}]
    data = load_prompt_dataset(_write(tmp_path / "mixed.jsonl", rows), tokenizer, max_prompt_length=100)
    assert [item.columns["answer"] for item in data.train] == ["2", "4"]
    assert data.skipped == {"rows without a prompt or question": 2,
                            "prompts longer than max_prompt_length (100 tokens)": 2}
    assert data.summary() == ("prompt data: 2 training prompts, 0 held out; skipped 2 rows without a prompt or "
                              "question, 2 prompts longer than max_prompt_length (100 tokens)")
    # The limit counts the whole rendered prompt (template included): a prompt of exactly the limit is kept.
    n = len(data.train[0].prompt_ids)
    assert len(data.train[1].prompt_ids) > n  # "What is two plus two?" is longer than "1+1?"
    at_limit = load_prompt_dataset(tmp_path / "mixed.jsonl", tokenizer, max_prompt_length=n)
    assert [item.columns["answer"] for item in at_limit.train] == ["2"]


def test_gsm8k_with_held_out_split(tokenizer):
    data = load_prompt_dataset(DATA / "gsm8k_train_1k.jsonl", tokenizer, 512, eval_fraction=0.05, seed=3407)
    assert (len(data.train), len(data.eval)) == (950, 50)
    assert data.summary() == "prompt data: 950 training prompts, 50 held out"
    train_rows = {item.where for item in data.train}
    assert not train_rows & {item.where for item in data.eval}
    assert all("####" in item.columns["answer"] for item in data.train + data.eval)  # the reward's reference
    again = load_prompt_dataset(DATA / "gsm8k_train_1k.jsonl", tokenizer, 512, eval_fraction=0.05, seed=3407)
    assert [item.where for item in again.eval] == [item.where for item in data.eval]  # the seed fixes the split
    other = load_prompt_dataset(DATA / "gsm8k_train_1k.jsonl", tokenizer, 512, eval_fraction=0.05, seed=1)
    assert [item.where for item in other.eval] != [item.where for item in data.eval]
    tiny = load_prompt_dataset(DATA / "gsm8k_train_1k.jsonl", tokenizer, 512, eval_fraction=0.0001)
    assert len(tiny.eval) == 1  # at least one held out when a fraction is asked for


def test_batches_are_deterministic_drop_the_last_partial_batch_and_resume(tokenizer, tmp_path):
    rows = [{"question": f"{i} + 1 =", "answer": str(i + 1)} for i in range(10)]
    data = load_prompt_dataset(_write(tmp_path / "ten.jsonl", rows), tokenizer, 64)
    assert data.num_batches(3) == 3  # 10 prompts: 3 full batches of 3, the tenth prompt waits for the next epoch

    def answers(batches):
        return [[item.columns["answer"] for item in batch] for batch in batches]

    epoch0 = answers(data.batches(3, epoch=0, seed=7))
    assert len(epoch0) == 3 and all(len(b) == 3 for b in epoch0)
    assert len({a for b in epoch0 for a in b}) == 9  # no prompt twice in an epoch
    assert epoch0 == answers(data.batches(3, epoch=0, seed=7))
    assert epoch0 != answers(data.batches(3, epoch=1, seed=7)) and epoch0 != answers(data.batches(3, epoch=0, seed=8))
    assert answers(data.batches(3, epoch=0, seed=7, start=1)) == epoch0[1:]  # resume at batch 1
    assert list(data.batches(3, epoch=0, seed=7, start=3)) == []


def test_too_few_prompts_and_batch_size_errors(tokenizer, tmp_path):
    data = load_prompt_dataset(_write(tmp_path / "two.jsonl", [{"prompt": "a"}, {"prompt": "b"}]), tokenizer, 64)
    assert data.num_batches(3) == 0 and list(data.batches(3)) == []  # fewer prompts than one batch
    with pytest.raises(ValueError, match="prompts_per_step must be a positive integer, got 0"):
        data.num_batches(0)


def test_no_usable_row_names_the_file_its_keys_and_the_layouts(tokenizer, tmp_path):
    path = _write(tmp_path / "sft.jsonl", [{"instruction": "Say hi.", "output": "Hi!"}] * 3)
    with pytest.raises(DataError, match=r"sft.jsonl: no row has a prompt; its first row has instruction, output; "
                                        r"accepted layouts: \{\"prompt\".*\{\"question\""):
        load_prompt_dataset(path, tokenizer, 64)
    path = _write(tmp_path / "long.jsonl", [{"prompt": "word " * 100}])
    with pytest.raises(DataError, match=r"long.jsonl: no usable prompt \(1 prompts longer than max_prompt_length "
                                        r"\(16 tokens\), 0 rows without a prompt or question\); "
                                        r"raise max_prompt_length"):
        load_prompt_dataset(path, tokenizer, 16)


def test_bad_files_and_rows(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: the dataset is empty"):
        load_prompt_dataset(tmp_path / "empty.jsonl", tokenizer, 64)
    with pytest.raises(DataError, match=r"few.jsonl: 1 usable prompts are too few to hold out eval_fraction=0.5"):
        load_prompt_dataset(_write(tmp_path / "few.jsonl", [{"prompt": "a"}]), tokenizer, 64, eval_fraction=0.5)
    with pytest.raises(DataError, match=r"msgs.jsonl:2: each message of 'prompt' needs a role"):
        load_prompt_dataset(_write(tmp_path / "msgs.jsonl", [{"prompt": "ok"}, {"prompt": [{"text": "hi"}]}]),
                            tokenizer, 64)
    with pytest.raises(DataError, match=r"num.jsonl:1: 'question' must be text, got int"):
        load_prompt_dataset(_write(tmp_path / "num.jsonl", [{"question": 7, "answer": "7"}]), tokenizer, 64)
    with pytest.raises(DataError, match=r"clash.jsonl:1: a column may not be named 'completions'"):
        load_prompt_dataset(_write(tmp_path / "clash.jsonl", [{"prompt": "a", "completions": []}]), tokenizer, 64)
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\), got 1.0"):
        load_prompt_dataset(tmp_path / "few.jsonl", tokenizer, 64, eval_fraction=1.0)


def test_a_tokenizer_without_chat_template_gets_the_fallback(tokenizer, tmp_path):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        data = load_prompt_dataset(_write(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?"}]), bare, 64)
    assert bare.decode(data.train[0].prompt_ids).endswith("### User:\nWhat is 2 + 3?\n\n### Assistant:\n")
