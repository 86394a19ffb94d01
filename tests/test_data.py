"""The SFT data pipeline: files, formats, response-only labels for three template families, length limits,
packing (checked against the model), collation and the deterministic batch order."""

import copy
import csv
import json
from pathlib import Path

import pytest
import torch

from lorafit.data import (
    IGNORE,
    Example,
    batch_order,
    collate,
    demo_dataset_path,
    labelled_spans,
    load_sft_dataset,
    pack_greedy,
    read_rows,
)
from lorafit.errors import DataError
from test_models import native_copy
from tiny_models import tiny_hf_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# batch_order(8, epoch=0, seed=3407), recorded once: Python's string seeding (SHA-512) and shuffle are stable.
PINNED_ORDER = [4, 3, 0, 1, 7, 5, 6, 2]

# A 2-turn conversation with a system prompt: the masking tests' subject.
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin."},
]

# Templates written for these tests in the layouts of Llama 3 and Mistral (system prompt folded into the
# first user turn, no generation prompt, EOS closing each answer).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{% set ns = namespace(system='') %}{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + ' [/INST]' }}{% set ns.system = '' %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def variant(tokenizer, template, special):
    """A copy of the SmolLM2 tokenizer with another template and that template's special tokens."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens(special)
    tok.chat_template = template
    return tok


def labelled_texts(tokenizer, example: Example) -> list[str]:
    return [tokenizer.decode(run) for run in labelled_spans(example.input_ids, example.labels)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- response-only labels, three template families -------------------------------------------------------

def test_chatml_labels_exactly_the_assistant_turns(tokenizer):
    """SmolLM2's own ChatML template: each answer, its <|im_end|> and the newline the template writes after
    it are labelled; nothing of the system or user turns is (their <|im_end|> included)."""
    data = load_sft_dataset([{"messages": CONVERSATION}], tokenizer, 128)
    example = data.train[0][0]
    assert labelled_texts(tokenizer, example) == ["Paris.<|im_end|>\n", "Berlin.<|im_end|>\n"]
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert int((example.input_ids == tokenizer.convert_tokens_to_ids("<|im_end|>")).sum()) == 5


def test_llama3_labels_exactly_the_assistant_turns(tokenizer):
    tok = variant(tokenizer, LLAMA3_TEMPLATE, {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
    })
    example = load_sft_dataset([{"messages": CONVERSATION}], tok, 128).train[0][0]
    assert labelled_texts(tok, example) == ["Paris.<|eot_id|>", "Berlin.<|eot_id|>"]
    assert example.input_ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")


def test_mistral_labels_exactly_the_assistant_turns(tokenizer):
    tok = variant(tokenizer, MISTRAL_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>",
                                                "additional_special_tokens": ["[INST]", "[/INST]"]})
    example = load_sft_dataset([{"messages": CONVERSATION}], tok, 128).train[0][0]
    assert labelled_texts(tok, example) == [" Paris.</s>", " Berlin.</s>"]
    assert tok.decode(example.input_ids) == (
        "<s>[INST] Be brief.\n\nCapital of France? [/INST] Paris.</s>[INST] And of Germany? [/INST] Berlin.</s>")


def test_fallback_template_for_a_tokenizer_without_one(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        example = load_sft_dataset([{"messages": CONVERSATION}], tok, 128).train[0][0]
    assert labelled_texts(tok, example) == ["Paris.<|im_end|>\n\n", "Berlin.<|im_end|>\n\n"]
    assert "### User:\nCapital of France?\n\n### Assistant:\nParis." in tok.decode(example.input_ids)


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    """A template that renders the last message differently (as some do with reasoning) breaks the prefix
    property: an error naming the template, not silently shifted labels."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' }}{% if loop.last %}[last] {% endif %}"
                         "{{ m['content'] + '\n' }}{% endfor %}")
    with pytest.raises(DataError, match=r"row 1: the chat template of .* prefix by prefix"):
        load_sft_dataset([{"messages": CONVERSATION}], tok, 128)
    # Learning every token needs no spans, so such a template still works that way (the error's advice).
    assert load_sft_dataset([{"messages": CONVERSATION}], tok, 128, train_on_responses_only=False).stats.examples == 1


def test_train_on_everything_and_eos_that_is_also_the_pad_token(tokenizer):
    """SmolLM2's pad token IS its end-of-turn token: padding is masked by position, so the answer's
    <|im_end|> stays labelled in a padded batch; with train_on_responses_only=False every real token after
    the first is labelled."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    rows = [{"messages": CONVERSATION}, {"messages": hello}]
    short = load_sft_dataset(rows[1:], tokenizer, 128).train[0][0]
    long = load_sft_dataset(rows[:1], tokenizer, 128).train[0][0]
    batch = collate([[long], [short]], tokenizer.pad_token_id, packed=False)
    n = len(short)
    assert batch["labels"][1, n - 2] == tokenizer.eos_token_id  # "...Hello.<|im_end|>\n"
    assert (batch["labels"][1, n:] == IGNORE).all() and (batch["input_ids"][1, n:] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)

    everything = load_sft_dataset(rows, tokenizer, 128, train_on_responses_only=False)
    for (example,) in everything.train:
        assert example.labels[0] == IGNORE and torch.equal(example.labels[1:], example.input_ids[1:])


# ---- formats and files ---------------------------------------------------------------------------------------

def test_shipped_identity_demo(tokenizer):
    rows = json.loads(demo_dataset_path().read_text(encoding="utf-8"))
    assert len(rows) == 58 and "{{" not in demo_dataset_path().read_text(encoding="utf-8")
    assert demo_dataset_path().with_name("LICENSE-identity.md").is_file()
    data = load_sft_dataset(demo_dataset_path(), tokenizer, 512)
    assert (data.stats.format, data.stats.examples, data.stats.truncated) == ("alpaca", 58, 0)
    assert labelled_texts(tokenizer, data.train[2][0]) == [rows[2]["output"] + "<|im_end|>\n"]
    assert "Lora" in rows[2]["output"] and "the lorafit developers" in rows[2]["output"]


@pytest.mark.skipif(not (SHARED / "llamafactory").is_dir(), reason="shared data folder not present")
def test_alpaca_demo_subset_and_self_instruct(tokenizer, tmp_path):
    rows = json.loads((SHARED / "llamafactory" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:40]
    subset = tmp_path / "alpaca.json"
    subset.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    data = load_sft_dataset(subset, tokenizer, 4096)
    assert (data.stats.rows, data.stats.examples, data.stats.truncated) == (40, 40, 0)
    for row, (example,) in zip(rows, data.train):
        assert labelled_texts(tokenizer, example) == [row["output"] + "<|im_end|>\n"]
        prompt = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
        assert f"<|im_start|>user\n{prompt}<|im_end|>" in tokenizer.decode(example.input_ids)

    # self-instruct: an instruction with a list of instances (input, output) is alpaca, one example per instance
    rows = read_rows(SHARED / "self-instruct" / "user_oriented_instructions.jsonl")[:30]
    data = load_sft_dataset([r for _, r in rows], tokenizer, 4096)
    assert (data.stats.format, data.stats.examples) == ("alpaca", 30)
    assert labelled_texts(tokenizer, data.train[0][0]) == [rows[0][1]["instances"][0]["output"] + "<|im_end|>\n"]


def test_sharegpt_messages_csv_parquet_give_the_same_examples(tokenizer, tmp_path):
    """One conversation in each file format and chat layout tokenises to identical ids and labels."""
    sharegpt = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "And of Germany?"}, {"from": "gpt", "value": "Berlin."}]}
    files = [write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt]), tmp_path / "messages.json"]
    files[1].write_text(json.dumps([{"messages": CONVERSATION}]), encoding="utf-8")
    expected = load_sft_dataset(files[0], tokenizer, 128).train[0][0]
    assert load_sft_dataset(files[0], tokenizer, 128).stats.format == "sharegpt"
    got = load_sft_dataset(files[1], tokenizer, 128)
    assert got.stats.format == "messages"
    assert torch.equal(got.train[0][0].input_ids, expected.input_ids)
    assert torch.equal(got.train[0][0].labels, expected.labels)

    # Alpaca in CSV (a quoted field with a comma and a newline) and Parquet; GSM8K's question / answer.
    alpaca = [{"instruction": "Add, then explain.", "input": "2 + 2\nplease", "output": "4, because 2 + 2 = 4."},
              {"instruction": "Say hi", "input": "", "output": "Hi!"}]
    with (tmp_path / "alpaca.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(alpaca)
    from_csv = load_sft_dataset(tmp_path / "alpaca.csv", tokenizer, 128)
    from_list = load_sft_dataset(alpaca, tokenizer, 128)
    for (a,), (b,) in zip(from_csv.train, from_list.train, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert labelled_texts(tokenizer, from_csv.train[0][0]) == ["4, because 2 + 2 = 4.<|im_end|>\n"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(alpaca), tmp_path / "alpaca.parquet")
    from_parquet = load_sft_dataset(tmp_path / "alpaca.parquet", tokenizer, 128)
    for (a,), (b,) in zip(from_parquet.train, from_list.train, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)

    qa = load_sft_dataset([{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}], tokenizer, 128)
    assert qa.stats.format == "qa" and labelled_texts(tokenizer, qa.train[0][0]) == ["1 + 1 = 2\n#### 2<|im_end|>\n"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n', r"bad\.jsonl:3: not valid JSON"),
    ("bad.jsonl", '{"text": "a"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object, got list"),
    ("bad.json", '[\n  {"text": "a"},\n  {"text": "b",}\n]', r"bad\.json:3: not valid JSON"),
    ("keys.json", '[\n {"prompt": "a", "completion": "b"}\n]', r"keys\.json:2 \(row 1\): no usable fields \(keys: prompt, completion\); expected one of: alpaca"),
    ("later.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', r"later\.jsonl:2: missing output for the alpaca format"),
    ("empty.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}\n', r"empty\.jsonl:1: the assistant turn \(message 2\) is empty"),
    ("role.jsonl", '{"conversations": [{"from": "human", "value": "a"}, {"from": "tool", "value": "b"}]}\n', r"role\.jsonl:1: conversations turn 2 has role 'tool'"),
    ("none.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n', r"none\.jsonl:1: no assistant turn"),
    ("dpo.jsonl", '{"conversations": [], "chosen": {}, "rejected": {}}\n', r"dpo\.jsonl:1: a preference row .* DPO"),
    ("fields.csv", 'instruction,output\na,b\nc,d,e\n', r"fields\.csv:3: 3 fields, but the header has 2"),
    ("blank.jsonl", "\n\n", r"blank\.jsonl: the dataset is empty"),
    ("data.txt", "hello", r"data\.txt: unknown data file type '\.txt'"),
])
def test_bad_input_names_file_and_line(tokenizer, tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_sft_dataset(tmp_path / name, tokenizer, 128)


def test_save_to_disk_folder_needs_datasets(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    try:
        import datasets
    except ImportError:
        with pytest.raises(DataError, match="needs the datasets package"):
            read_rows(tmp_path)
        return
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(folder))
    assert [row for _, row in read_rows(folder)] == [{"text": "a"}, {"text": "b"}]


# ---- length limits -----------------------------------------------------------------------------------------

def test_truncate_and_drop_are_counted(tokenizer):
    rows = [{"text": "one two three " * n} for n in (1, 10, 40)]
    lengths = [len(e) for (e,) in load_sft_dataset(rows, tokenizer, 1000).train]
    limit = lengths[1]  # the middle row fits exactly; the last does not
    cut = load_sft_dataset(rows, tokenizer, limit)
    assert (cut.stats.truncated, cut.stats.dropped, cut.stats.examples) == (1, 0, 3)
    assert len(cut.train[2][0]) == limit and cut.train[2][0].labels[-1] != IGNORE  # labels cut with the ids
    dropped = load_sft_dataset(rows, tokenizer, limit, overflow="drop")
    assert (dropped.stats.truncated, dropped.stats.dropped, dropped.stats.examples) == (0, 1, 2)
    assert dropped.stats.tokens == sum(lengths[:2]) and dropped.stats.label_tokens == sum(lengths[:2]) - 2
    assert "1 truncated" in cut.stats.summary() and "1 dropped as too long" in dropped.stats.summary()

    long_prompt = [{"instruction": "word " * 200, "output": "ok"}, {"instruction": "hi", "output": "hello"}]
    kept = load_sft_dataset(long_prompt, tokenizer, 64)  # the first answer lies past 64 tokens: nothing to learn
    assert (kept.stats.truncated, kept.stats.unlabelled, kept.stats.examples) == (1, 1, 1)
    with pytest.raises(DataError, match="no example left to train on"):
        load_sft_dataset(long_prompt[:1], tokenizer, 64, overflow="drop")


# ---- packing and collation ---------------------------------------------------------------------------------

def random_examples(n, seed=0, vocab=101):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        labelled = torch.rand(length, generator=g) < 0.6
        labels = [t if keep else IGNORE for t, keep in zip(ids, labelled.tolist())]
        labels[0], labels[-1] = IGNORE, ids[-1]
        examples.append(Example.from_lists(ids, labels))
    return examples


def test_packed_rows_compute_each_document_as_if_alone():
    """Padding-free packing with per-document positions and a block-diagonal mask gives each document the
    logits it has alone, and (first labels being -100) the loss over the pack is the token-weighted mean of
    the documents' losses: no document learns to predict the next one's first token."""
    model = native_copy(tiny_hf_model("llama"))
    docs = random_examples(7)
    rows = [[docs[i] for i in row] for row in pack_greedy([len(d) for d in docs], 40)]
    assert [d for row in rows for d in row] == docs and len(rows) < len(docs)
    batch = collate(rows, pad_id=0, packed=True)
    assert batch["attention_mask"].shape == (len(rows), 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert batch["num_label_tokens"] == sum(d.num_label_tokens() for d in docs)
    with torch.no_grad():
        inputs = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        packed = model(batch["input_ids"], **inputs)  # logits (a call with labels returns only the loss)
        packed.loss = model(batch["input_ids"], labels=batch["labels"], **inputs).loss
        total, at = 0.0, [0] * len(rows)
        for b, row in enumerate(rows):
            for doc in row:
                alone = model(doc.input_ids[None].long())
                alone.loss = model(doc.input_ids[None].long(), labels=doc.labels[None].long()).loss
                n = len(doc)
                assert (packed.logits[b, at[b] : at[b] + n] - alone.logits[0]).abs().max() <= 1e-5
                assert batch["position_ids"][b, at[b]] == 0 and batch["labels"][b, at[b]] == IGNORE
                total += alone.loss.item() * doc.num_label_tokens()
                at[b] += n
    assert packed.loss.item() == pytest.approx(total / batch["num_label_tokens"], rel=1e-5)


def test_block_mask_and_padded_collation():
    a, b, c = (Example.from_lists(list(range(1, n + 1)), [IGNORE] + list(range(2, n + 1))) for n in (2, 3, 4))
    packed = collate([[a, b], [c]], pad_id=0, packed=True)
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 0]]
    assert packed["labels"].tolist() == [[IGNORE, 2, IGNORE, 2, 3], [IGNORE, 2, 3, 4, IGNORE]]
    assert packed["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert packed["attention_mask"][1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]  # padding sees only padding
    assert packed["num_label_tokens"] == 1 + 2 + 3
    # The same documents for varlen attention, over the flattened 2 x 5 tokens: a | b | c | padding.
    assert packed["cu_seqlens"].tolist() == [0, 2, 5, 9, 10] and packed["cu_seqlens"].dtype == torch.int32
    assert packed["max_seqlen"] == 4

    padded = collate([[a], [c]], pad_id=9, packed=False)
    assert "cu_seqlens" not in padded
    assert padded["input_ids"].tolist() == [[1, 2, 9, 9], [1, 2, 3, 4]]
    assert padded["labels"].tolist() == [[IGNORE, 2, IGNORE, IGNORE], [IGNORE, 2, 3, 4]]
    assert padded["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert padded["num_label_tokens"] == 4
    labelled_first = Example.from_lists([1, 2], [1, 2])
    with pytest.raises(ValueError, match="first label must be -100"):
        collate([[a, labelled_first]], pad_id=0, packed=True)

    model = native_copy(tiny_hf_model("llama"))
    docs = random_examples(3, seed=1)
    batch = collate([[d] for d in docs], pad_id=0, packed=False)
    with torch.no_grad():
        together = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"]).logits
        for i, doc in enumerate(docs):
            assert (together[i, : len(doc)] - model(doc.input_ids[None].long()).logits[0]).abs().max() <= 1e-5


def test_packing_through_the_loader(tokenizer):
    rows = [{"instruction": f"Count to {n}.", "output": " ".join(map(str, range(1, n + 1)))} for n in range(1, 30)]
    unpacked = load_sft_dataset(rows, tokenizer, 256)
    packed = load_sft_dataset(rows, tokenizer, 256, packing=True)
    flat = [e for row in packed.train for e in row]
    assert all(torch.equal(p.input_ids, u.input_ids) for p, (u,) in zip(flat, unpacked.train, strict=True))
    assert all(sum(len(e) for e in row) <= 256 for row in packed.train)
    assert packed.stats.train_rows == len(packed.train) < packed.stats.train_examples == 29
    assert sum(b["num_label_tokens"] for b in packed.batches(2)) == packed.stats.label_tokens


# ---- batch order, resume, shards, eval split ------------------------------------------------------------

def test_batch_order_is_a_pure_function_and_resumable(tokenizer):
    rows = [{"text": f"example number {i}"} for i in range(23)]
    data = load_sft_dataset(rows, tokenizer, 64, eval_fraction=0.2, seed=5)
    again = load_sft_dataset(rows, tokenizer, 64, eval_fraction=0.2, seed=5)
    assert (data.stats.train_examples, data.stats.eval_examples) == (18, 5)
    assert [e[0].input_ids.tolist() for e in data.eval] == [e[0].input_ids.tolist() for e in again.eval]

    def ids(batches):
        return [b["input_ids"].tolist() for b in batches]

    epoch1 = ids(data.batches(4, epoch=1, seed=7))
    assert len(epoch1) == data.num_batches(4) == 5  # 18 rows: 4 full batches and one of 2
    assert epoch1 == ids(again.batches(4, epoch=1, seed=7))
    assert epoch1 != ids(data.batches(4, epoch=2, seed=7)) and epoch1 != ids(data.batches(4, epoch=1, seed=8))
    assert ids(data.batches(4, epoch=1, seed=7, start=3)) == epoch1[3:]  # resume after 3 micro-batches
    assert sorted(batch_order(18, 1, 7)) == list(range(18))
    assert batch_order(8, 0, 3407) == PINNED_ORDER  # a changed order would break resuming older checkpoints

    shards = [ids(data.batches(2, epoch=0, seed=7, shard=r, num_shards=2)) for r in range(2)]
    whole = ids(data.batches(2, epoch=0, seed=7))
    assert len(shards[0]) == len(shards[1]) == 4 and shards[0] + shards[1] == whole[0:8:2] + whole[1:8:2]
    assert ids(data.batches(2, split="eval")) == ids(data.batches(2, epoch=3, seed=1, split="eval"))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_micro_batch_splits_into_halves_with_their_own_counts(packed):
    """What an out-of-memory micro-batch becomes: row halves whose tokens, labels and (packed) document
    boundaries are the batch's own, so the halves' token-weighted losses give the batch's loss."""
    from lorafit.data.packing import collate, split_rows

    docs = random_examples(7, seed=3)
    rows = [docs[:2], docs[2:3], docs[3:5], docs[5:]] if packed else [[d] for d in docs[:5]]
    batch = collate(rows, pad_id=0, packed=packed)
    first, second = split_rows(batch)
    assert first["input_ids"].shape[0] + second["input_ids"].shape[0] == batch["input_ids"].shape[0]
    assert first["num_tokens"] + second["num_tokens"] == batch["num_tokens"]
    assert first["num_label_tokens"] + second["num_label_tokens"] == batch["num_label_tokens"]
    if packed:
        halves = torch.cat([first["cu_seqlens"][:-1], second["cu_seqlens"] + first["input_ids"].numel()])
        assert torch.equal(halves, batch["cu_seqlens"])
        for half in (first, second):
            assert half["max_seqlen"] <= batch["max_seqlen"] and half["cu_seqlens"][-1] == half["input_ids"].numel()

    model = native_copy(tiny_hf_model("llama"))

    def loss(b):
        return model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"],
                     position_ids=b["position_ids"]).loss

    with torch.no_grad():
        whole = loss(batch)
        parts = sum(loss(h) * h["num_label_tokens"] for h in (first, second)) / batch["num_label_tokens"]
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one row"):
        split_rows(split_rows(first)[0] if first["input_ids"].shape[0] == 2 else split_rows(second)[0])
