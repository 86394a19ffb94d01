"""GRPO step time on CPU: lorafit vs TRL's GRPOTrainer (+ PEFT), same everything.

    python benchmarks/grpo_cpu.py [--steps 5] [--repeats 2]

Same model (the default SmolLM2-135M-Instruct, float32), same prompts (data/chain_sum.jsonl, chat
template, no system prompt), same reward (lorafit's numeric_answer, which TRL calls through a wrapper), 2
prompts x 8 completions per optimizer step (micro-batch 2 x accumulation 8, TRL's generation batch = that
step), at most 64 new tokens, temperature 1, LoRA r=16 alpha=32 on all linear layers, AdamW lr 1e-5, beta 0
(no reference model), one pass per rollout, token-level loss (TRL's "dapo", lorafit's "token"). Each tool
runs --steps optimizer steps, --repeats times, alternating with the other; the first step of each run is
left out (warm-up) and the median step time counts. Completion lengths are sampled, not forced: the table
shows each tool's mean length, and generation tokens/s, so that a difference in lengths can be seen.
Needs `pip install trl`; appends to benchmarks/results.jsonl.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH, ACCUM, G, MAX_NEW, R, ALPHA, LR = 2, 8, 8, 64, 16, 32, 1e-5
DATA = Path(__file__).parent.parent / "data" / "chain_sum.jsonl"


def lorafit_run(model_dir, steps, out) -> dict:
    from lorafit import Config
    from lorafit.recipes.grpo import run_grpo
    from lorafit.training.metrics import read_metrics

    config = Config.from_dict({
        "model": {"source": str(model_dir), "dtype": "float32"},
        "finetune": {"r": R, "alpha": ALPHA},
        "data": {"path": str(DATA)},
        "train": {"recipe": "grpo", "max_steps": steps, "batch_size": BATCH, "grad_accum": ACCUM, "lr": LR,
                  "save_every": 0, "output_dir": str(out)},
        "grpo": {"num_generations": G, "max_completion_length": MAX_NEW, "rewards": ["numeric_answer"]},
    })
    run_grpo(config, log=lambda *_: None, progress=False)
    rows = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r][1:]  # first step: warm-up
    return {"step_s": [r["step_s"] for r in rows],
            "generation_s": [r["generation_s"] for r in rows],
            "completion_length": [r["completion_length"] for r in rows]}


def trl_run(model_dir, steps, out) -> dict:
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from lorafit.data.files import read_rows
    from lorafit.rewards import numeric_answer

    rows = [row for _, row in read_rows(DATA)]
    dataset = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["question"]}], "answer": str(r["answer"])} for r in rows])

    def reward(prompts, completions, answer, **_):  # TRL passes conversational completions as messages
        return numeric_answer(prompts, [c[-1]["content"] for c in completions], answer=answer)

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ends, lengths = [], []

    class Recorder(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    args = GRPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH,
                      gradient_accumulation_steps=ACCUM, num_generations=G, max_completion_length=MAX_NEW,
                      temperature=1.0, learning_rate=LR, weight_decay=0.01, warmup_steps=1, beta=0.0,
                      loss_type="dapo", num_iterations=1,
                      # TRL's GRPOConfig turns gradient checkpointing on by default; lorafit does not recompute.
                      gradient_checkpointing=False, use_cpu=True, bf16=False, fp16=False, report_to=[],
                      logging_steps=1, save_strategy="no", seed=3407, dataloader_num_workers=0)
    peft_config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Recorder()])
    start = time.perf_counter()
    trainer.train()
    ends = [start] + ends
    return {"step_s": [b - a for a, b in zip(ends, ends[1:])][1:], "generation_s": [],
            "completion_length": lengths[1:]}


def main() -> None:
    from lorafit.models.default import default_model_directory

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each tool")
    args = p.parse_args()
    model_dir = default_model_directory()
    systems = (("lorafit", lorafit_run), ("transformers+peft+trl", trl_run))
    runs = {name: {"step_s": [], "generation_s": [], "completion_length": []} for name, _ in systems}
    with tempfile.TemporaryDirectory() as tmp:
        # Alternating runs (A B A B): a slow spell of the shared machine hits both tools alike.
        for repeat in range(args.repeats):
            for name, fn in systems:
                for key, values in fn(model_dir, args.steps, Path(tmp) / f"{name}-{repeat}").items():
                    runs[name][key] += values
    rows = []
    for name, _ in systems:
        r = runs[name]
        length = statistics.mean(r["completion_length"]) if r["completion_length"] else None
        row = {"system": name, "s_per_step": round(statistics.median(r["step_s"]), 3),
               "mean_completion_length": round(length, 1) if length else None}
        if r["generation_s"]:
            row["generation_tokens_per_s"] = round(BATCH * ACCUM * length / statistics.median(r["generation_s"]), 1)
        rows.append(row)
    ratio = round(rows[1]["s_per_step"] / rows[0]["s_per_step"], 2)
    print(f"{'system':<24} {'s/step':>8} {'mean completion':>16} {'generation tok/s':>17}")
    for r in rows:
        print(f"{r['system']:<24} {r['s_per_step']:>8} {str(r['mean_completion_length']):>16} "
              f"{str(r.get('generation_tokens_per_s', '-')):>17}")
    print(f"lorafit speed-up: {ratio}x")
    sys.path.insert(0, str(Path(__file__).parent))
    from _record import record

    import peft
    import trl

    record("grpo_cpu", rows, ratio=ratio, steps=args.steps, repeats=args.repeats, batch=BATCH, accum=ACCUM,
           num_generations=G, max_completion_length=MAX_NEW, lora_r=R, trl=trl.__version__, peft=peft.__version__)


if __name__ == "__main__":
    main()
