"""SFT training speed on CPU: lorafit vs transformers + PEFT + TRL's SFTTrainer, same everything.

    python benchmarks/sft_cpu.py [--steps 6] [--data PATH]

Same model (the default SmolLM2-135M-Instruct, float32), same data (the shipped identity set, chat
template, loss on the assistant's tokens only), same sequence length (256), micro-batch 2 x accumulation 4,
LoRA r=16 alpha=32 on all linear layers, AdamW lr 2e-4, no gradient checkpointing, no packing. Each tool
runs --steps optimizer steps, --repeats times, alternating with the other; the median step time counts
and each run's first step is left out (warm-up). tokens/s counts real
(non-padding) tokens: both tools see the same examples per step, so the dataset's mean tokens per example
times examples per second is compared. Needs `pip install trl`; appends to benchmarks/results.jsonl.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH, ACCUM, SEQ, R, ALPHA, LR = 2, 4, 256, 16, 32, 2e-4


def lorafit_step_times(model_dir, data, steps, out) -> list[float]:
    from lorafit import Config
    from lorafit.recipes.sft import run_sft
    from lorafit.training.metrics import read_metrics

    config = Config.from_dict({
        "model": {"source": str(model_dir), "dtype": "float32", "max_seq_length": SEQ},
        "finetune": {"r": R, "alpha": ALPHA},
        "data": {"path": str(data)},
        "train": {"max_steps": steps, "batch_size": BATCH, "grad_accum": ACCUM, "lr": LR, "save_every": 0,
                  "output_dir": str(out)},
    })
    run_sft(config, log=lambda *_: None, progress=False)
    return [r["elapsed_s"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def trl_step_times(model_dir, data, steps, out) -> list[float]:
    import json

    import datasets
    import transformers
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = json.loads(Path(data).read_text())
    # Prompt-completion form: TRL then computes the loss on the completion only, as lorafit does.
    messages = [{"prompt": [{"role": "user", "content": (r["instruction"] + "\n\n" + r["input"]).strip()}],
                 "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows]
    dataset = datasets.Dataset.from_list(messages)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    times = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=ACCUM, learning_rate=LR, weight_decay=0.01, warmup_steps=1,
                     lr_scheduler_type="linear", max_length=SEQ,
                     packing=False, gradient_checkpointing=False, use_cpu=True, bf16=False, fp16=False,
                     report_to=[], logging_steps=1, save_strategy="no", seed=3407, dataloader_num_workers=0)
    peft_config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[StepTimer()])
    start = time.perf_counter()
    trainer.train()
    return [t - start for t in times]


def mean_tokens_per_example(model_dir, data) -> float:
    import lorafit
    from lorafit.data import load_sft_dataset

    tokenizer = lorafit.models.loading.load_tokenizer(Path(model_dir))
    d = load_sft_dataset(data, tokenizer, SEQ)
    return d.stats.tokens / d.stats.examples


def main() -> None:
    from lorafit.data import demo_dataset_path
    from lorafit.models.default import default_model_directory

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each tool")
    p.add_argument("--data", default=str(demo_dataset_path()))
    args = p.parse_args()
    model_dir = default_model_directory()
    per_example = mean_tokens_per_example(model_dir, args.data)
    examples_per_step = BATCH * ACCUM
    systems = (("lorafit", lorafit_step_times), ("transformers+peft+trl", trl_step_times))
    intervals = {name: [] for name, _ in systems}
    with tempfile.TemporaryDirectory() as tmp:
        # Runs alternate (A B A B ...) so that a slow spell of the shared machine (seen: +-20% between
        # consecutive runs) hits both tools alike; each tool's first step is its warm-up and is left out.
        for repeat in range(args.repeats):
            for name, fn in systems:
                ends = fn(model_dir, args.data, args.steps, Path(tmp) / f"{name}-{repeat}")
                intervals[name] += [b - a for a, b in zip(ends, ends[1:])]
    rows = []
    for name, _ in systems:
        step_seconds = statistics.median(intervals[name])
        rows.append({"system": name, "s_per_step": round(step_seconds, 3),
                     "tokens_per_s": round(examples_per_step * per_example / step_seconds, 1)})
    ratio = round(rows[1]["s_per_step"] / rows[0]["s_per_step"], 2)
    print(f"{'system':<24} {'s/step':>8} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['system']:<24} {r['s_per_step']:>8} {r['tokens_per_s']:>9}")
    print(f"lorafit speed-up: {ratio}x")
    sys.path.insert(0, str(Path(__file__).parent))
    from _record import record

    record("sft_cpu", rows, ratio=ratio, steps=args.steps, repeats=args.repeats, seq=SEQ, batch=BATCH, accum=ACCUM, lora_r=R,
           tokens_per_example=round(per_example, 1))


if __name__ == "__main__":
    main()
