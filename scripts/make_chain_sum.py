"""Writes data/chain_sum.jsonl: 1,000 two-term, one-digit sums from reasoning-gym, for GRPO demos and tests.

reasoning-gym (PyPI `reasoning-gym`, Apache-2.0, https://github.com/open-thought/reasoning-gym) generates
each item from `random.Random(seed + index)`, so the file is reproducible from the settings below. SmolLM2-135M-
Instruct answers 30% of the 64 held out by configs/grpo-chain-sum.yaml right before training (greedy), and
its sampled answers disagree within a group: a reward that is neither always 0 nor always 1.

Rows keep reasoning-gym's `question` and `answer` as it writes them (the answer is a string such as "7" or
"-3"); its `metadata` is left out. lorafit does not depend on reasoning-gym: install it in a throwaway
environment to run this script,

    python3 -m venv /tmp/rgym && /tmp/rgym/bin/pip install reasoning-gym
    /tmp/rgym/bin/python scripts/make_chain_sum.py
"""

import json
from pathlib import Path

import reasoning_gym

SETTINGS = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, seed=3407, size=1000)
OUTPUT = Path(__file__).resolve().parent.parent / "data" / "chain_sum.jsonl"


def main() -> None:
    dataset = reasoning_gym.create_dataset("chain_sum", **SETTINGS)
    lines = [json.dumps({"question": item["question"], "answer": item["answer"]}) for item in dataset]
    OUTPUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} rows to {OUTPUT}")


if __name__ == "__main__":
    main()
