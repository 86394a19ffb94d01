"""Generation on the real SmolLM2-135M-Instruct: same greedy tokens as transformers, batching, stopping."""

import pytest
import torch
import transformers

import lorafit
from lorafit.generate import Sampling, encode_prompt, end_of_turn_id, generate_ids, sample, stop_token_ids

PROMPTS = [
    "The capital of France is",
    [{"role": "user", "content": "What is the capital of France?"}],
    "def fibonacci(n):",
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a primary colour."}],
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_real_weights_logits_match_transformers(smollm2, hf_smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[1])])
    with torch.no_grad():
        diff = (model(ids).logits - hf_smollm2(ids).logits).abs().max().item()
    # The same operations in the same order as transformers' Llama: 0.0 on the build machines (2026-11-30);
    # 1e-5 leaves room for a BLAS that orders its sums differently.
    assert diff <= 1e-5


@pytest.mark.parametrize("prompt", PROMPTS[:3], ids=["plain", "chat", "code"])
def test_greedy_tokens_equal_transformers(smollm2, hf_smollm2, prompt):
    model, tokenizer = smollm2
    ids = encode_prompt(tokenizer, prompt)
    ours = generate_ids(model, [ids], 32, stop_ids=())[0]  # no early stop: compare all 32 tokens
    with torch.no_grad():
        theirs = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                     eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    assert ours == theirs[0, len(ids):].tolist()


def test_batch_of_different_lengths_equals_one_by_one(smollm2):
    model, tokenizer = smollm2
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths: left padding is exercised
    stop = stop_token_ids(model, tokenizer)
    batched = generate_ids(model, prompts, 24, stop_ids=stop, pad_id=tokenizer.pad_token_id)
    alone = [generate_ids(model, [p], 24, stop_ids=stop)[0] for p in prompts]
    assert batched == alone


def test_chat_answer_stops_at_end_of_turn(smollm2):
    model, tokenizer = smollm2
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == im_end
    assert im_end in stop_token_ids(model, tokenizer)
    out = generate_ids(model, [encode_prompt(tokenizer, PROMPTS[1])], 64, stop_ids=stop_token_ids(model, tokenizer))[0]
    assert out[-1] == im_end and len(out) < 64
    answer = lorafit.generate(model, tokenizer, PROMPTS[1], max_new_tokens=64)
    assert "Paris" in answer and "<|im_end|>" not in answer


def test_generate_accepts_a_batch_and_returns_a_list(smollm2):
    model, tokenizer = smollm2
    answers = lorafit.generate(model, tokenizer, [PROMPTS[0], PROMPTS[1]], max_new_tokens=8)
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_sampling_is_seeded_and_limits_work(smollm2):
    model, tokenizer = smollm2
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50)
    a = lorafit.generate(model, tokenizer, "Once upon a time", seed=7, **kwargs)
    b = lorafit.generate(model, tokenizer, "Once upon a time", seed=7, **kwargs)
    assert a == b
    greedy = lorafit.generate(model, tokenizer, "Once upon a time", max_new_tokens=16)
    assert lorafit.generate(model, tokenizer, "Once upon a time", max_new_tokens=16, temperature=1.0, top_k=1, seed=3) == greedy


def test_sample_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, Sampling(temperature=1.0, top_k=2), g).tolist()) == {0, 1}
    # softmax of [4, 3, 2, ...]: token 0 holds 0.64, 0 and 1 together 0.87, so top_p 0.8 keeps exactly {0, 1}.
    assert set(sample(logits, Sampling(temperature=1.0, top_p=0.8), g).tolist()) == {0, 1}
    assert set(sample(logits, Sampling(temperature=1.0, top_p=0.5), g).tolist()) == {0}
    with pytest.raises(ValueError):
        Sampling(temperature=-1)


def test_sampled_tokens_follow_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    logits = probs.log().repeat(20000, 1)
    tokens = sample(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)  # 20k draws: std of a share <= 0.0035
    assert freq[1] == 0  # probability 0 is never drawn


def test_repeated_prompts_are_read_once_and_continue_independently(smollm2):
    """GRPO's batches: the same prompt G times. Its cache is computed once and copied; greedy continuations
    equal those of a batch without repeats, and sampled ones differ between the copies."""
    model, tokenizer = smollm2
    a, b = encode_prompt(tokenizer, "Once upon a time"), encode_prompt(tokenizer, "The capital of France is")
    greedy = generate_ids(model, [a, b], 12)
    assert generate_ids(model, [a, a, b, a, b], 12) == [greedy[0], greedy[0], greedy[1], greedy[0], greedy[1]]
    sampled = generate_ids(model, [a] * 4, 12, Sampling(temperature=1.0), generator=torch.Generator().manual_seed(0))
    assert len({tuple(s) for s in sampled}) > 1
