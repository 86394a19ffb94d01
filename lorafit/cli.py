"""The `lorafit` command. The only place that reads environment variables and prints errors for people."""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .errors import LorafitError


def main(argv=None) -> int:
    # Before CUDA starts: GPU memory grows in place instead of in separate blocks, so a CUDA graph's pool holds
    # less beside what it uses (Llama-3.2-1B, every layer offloaded: 0.67 GiB against 0.86, device call 27).
    # Unsloth sets the same. Whoever set the allocator's options keeps them. torch is imported by now (lorafit's
    # package imports it); the allocator reads this when CUDA starts (H200, device call 32: the first segment
    # was expandable).
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    parser = argparse.ArgumentParser(prog="lorafit", description="Fine-tune open LLMs with LoRA and friends.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_args(p):
        p.add_argument("--model", default="default", help='HF directory, .gguf file, cached hub id, or "default"')
        p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)

    g = sub.add_parser("generate", help="continue or answer one prompt")
    add_model_args(g)
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    c = sub.add_parser("chat", help="talk to a model (empty line or Ctrl-D quits, /reset clears history)")
    add_model_args(c)
    c.add_argument("--system", default=None, help="a system message")
    a = sub.add_parser("advise", help="check a config against the hyperparameter guide (DESIGN §1)")
    a.add_argument("config", help="a YAML config file (see configs/)")
    a.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=10 finetune.r=32")
    a.add_argument("--world-size", type=int, default=1, help="data-parallel ranks the run will use")
    a.add_argument("--json", action="store_true", help="print the config, plan and advice as JSON")
    e = sub.add_parser("estimate", help="peak GPU memory and time of a config's training, before loading a weight")
    e.add_argument("config", help="a YAML config file (see configs/)")
    e.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.batch_size=4")
    where = e.add_mutually_exclusive_group()
    where.add_argument("--gpu", default=None, help="a card of lorafit.estimate.DEVICES, e.g. H100 (default: this one)")
    where.add_argument("--memory", type=float, default=None, help="GiB available on the card (no time estimate)")
    t = sub.add_parser("train", help="fine-tune; with no config, the demo: the default model learns a new identity")
    t.add_argument("config", nargs="?", default=None, help="a YAML config file (see configs/); none: the demo")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=10 finetune.r=32")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this machine (one per GPU): runs itself under torchrun")

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model: a Hugging Face directory")
    m.add_argument("--adapter", required=True, help="a PEFT adapter directory (lorafit train's adapter/)")
    m.add_argument("--out", required=True, help="the directory to write")
    m.add_argument("--model", default=None, help="the base model (default: the adapter's base_model_name_or_path)")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: the base checkpoint's)")
    x = sub.add_parser("export", help="write a model or adapter for llama.cpp / Ollama")
    formats = x.add_subparsers(dest="format", required=True)
    eg = formats.add_parser("gguf", help="a model GGUF (and an Ollama Modelfile beside it)")
    eg.add_argument("--model", default=None, help="HF directory, .gguf, cached hub id or \"default\"; with --adapter: "
                                                  "the base (default: the adapter's base_model_name_or_path)")
    eg.add_argument("--adapter", default=None, help="a PEFT adapter directory: loaded on its base and merged")
    eg.add_argument("--out", required=True, help="the .gguf file to write")
    eg.add_argument("--qtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"])
    eg.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile beside the GGUF")
    ea = formats.add_parser("gguf-adapter", help="a LoRA adapter GGUF for llama.cpp (--lora), rsLoRA folded in")
    ea.add_argument("--adapter", required=True, help="a PEFT adapter directory")
    ea.add_argument("--model", default=None, help="the base (default: the adapter's base_model_name_or_path)")
    ea.add_argument("--out", required=True, help="the .gguf file to write")
    ea.add_argument("--qtype", default="f16", choices=["f32", "f16"])

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return {"generate": cmd_generate, "chat": cmd_chat, "advise": cmd_advise, "estimate": cmd_estimate,
                "train": cmd_train, "merge": cmd_merge, "export": cmd_export}[args.command](args)
    except LorafitError as e:
        print(f"lorafit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _cache_dir():
    return os.environ.get("LORAFIT_CACHE_DIR")  # where the default model's converted copy lives


def _load(args):
    from .models.loading import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=_cache_dir())


def _sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def cmd_generate(args) -> int:
    from .generate import generate

    model, tokenizer = _load(args)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) and not args.raw
    prompt = [{"role": "user", "content": args.prompt}] if use_chat else args.prompt
    print(generate(model, tokenizer, prompt, **_sampling_kwargs(args)))
    return 0


def cmd_chat(args) -> int:
    from .generate import generate

    model, tokenizer = _load(args)
    if not getattr(tokenizer, "chat_template", None):
        raise LorafitError(f"{args.model}: the tokenizer has no chat template; use `lorafit generate --raw`")
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print("lorafit chat: empty line or Ctrl-D quits, /reset clears the history")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            return 0
        if line == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": line})
        answer = generate(model, tokenizer, history, **_sampling_kwargs(args))
        history.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}")


def cmd_advise(args) -> int:
    """Prints the guide's view of a config. Advice never fails the command: only an invalid config does."""
    from .advisor import advise, count_parameters_without_weights, format_advice, training_plan
    from .config import Config

    if args.world_size < 1:
        raise LorafitError(f"--world-size must be at least 1, got {args.world_size}")
    config = Config.from_yaml(args.config, args.overrides)
    data_path = config.data.resolved_path()
    rows = _count_rows(data_path)
    num_examples = None
    if rows:
        # An estimate of the training split; the data loader's own split decides the real number.
        num_examples = max(1, rows - int(rows * config.data.eval_fraction))
    trainable = total = None
    try:
        trainable, total = count_parameters_without_weights(config, _model_hf_config(config.model.source))
        counted = f"{total:,} parameters, {trainable:,} of them trainable"
    except (LorafitError, ValueError, KeyError) as e:
        counted = f"parameters unknown ({e})"
    plan = training_plan(config, num_examples, args.world_size, trainable, total)
    advice = advise(config, plan)
    if args.json:
        print(json.dumps({"config": config.to_dict(), "plan": plan.to_dict(),
                          "advice": [a.to_dict() for a in advice]}, indent=2))
        return 0
    shown_rows = "unknown number of rows" if rows is None else f"{rows} rows"
    if rows and num_examples != rows:
        shown_rows += f", about {num_examples} for training after eval_fraction {config.data.eval_fraction:g}"
    if rows and config.data.packing:
        shown_rows += "; packing joins examples, so the step counts are upper bounds"
    print(f"config: {args.config}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    print(f"model:  {config.model.source}, {counted}")
    print(f"data:   {data_path} ({shown_rows})")
    print()
    print(format_advice(advice))
    return 0


def cmd_estimate(args) -> int:
    """Prints the peak-memory breakdown, the checkpointing plan, what fits, and the time per step and run."""
    from .advisor import training_plan
    from .config import Config
    import torch

    from .estimate import DEVICES, build_meta_model, estimate, largest_fitting, plan_training
    from .memory import GiB, describe_modes, mlp_tile_chunk
    from .training.cuda_graphs import can_graph
    from .training.batch_size import choose_micro_batch

    config = Config.from_yaml(args.config, args.overrides)
    model = build_meta_model(config, _model_hf_config(config.model.source))
    card, device, budget = _estimate_device(args, DEVICES)
    if config.train.memory_budget_gib is not None and args.memory is None:  # what training plans for on any card
        budget = int(config.train.memory_budget_gib * GiB)  # (memory.device_budget_bytes)
        card = (card if device is not None else "memory only") + " within train.memory_budget_gib"
    micro, batch_choice = None, ""
    if config.train.batch_size == "auto":
        micro, batch_choice = 1, "micro-batch auto: shown at 1; name a card (--gpu or --memory) to see what it picks"
        if budget is not None:
            micro, batch_choice = choose_micro_batch(config, model, budget)
    config = config.with_batch(micro_batch=micro)  # integers for batch_size and grad_accum
    t, seq = config.train, config.model.max_seq_length
    per_sequence = 2 if t.recipe == "dpo" else 1  # DPO's micro-batch holds each pair's two answers
    n = model.config.num_layers

    model.disable_kernels(t.disable_kernels)

    def plan_for(tokens: int) -> tuple[list[str], bool]:
        """(modes, graphed) as training on this card would choose them (training/loop.py)."""
        try:
            return plan_training(model, tokens, seq, t.activation_checkpointing, budget, config.finetune.method,
                                 lambda modes: t.recipe == "sft" and can_graph(model, torch.device("cuda"), False,
                                                                             modes), device)
        except LorafitError:
            return ["offload"] * n, False

    tokens = t.batch_size * seq * per_sequence
    modes, graphed = plan_for(tokens)
    result = estimate(config, model, tokens, seq, modes, budget, device, graphed=graphed)
    print(f"config: {args.config}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    print(f"model:  {config.model.source}, {config.finetune.method}"
          + (f" r={config.finetune.r}" if config.finetune.method != "full" else "")
          + f"; micro-batch {t.batch_size} x {seq} tokens" + (" x 2 answers" if per_sequence == 2 else ""))
    print(f"card:   {card}" + (f", {budget / GiB:.1f} GiB usable" if budget else ""))
    if batch_choice:
        print(batch_choice)
    print()
    print(f"peak memory  {result.memory.summary()}")
    chunk = mlp_tile_chunk(model, tokens)
    print(f"checkpointing {describe_modes(result.modes)} (train.activation_checkpointing: {t.activation_checkpointing})"
          + (f"; the MLPs {chunk:,} tokens at a time" if chunk else "")
          + ("; micro-batches replayed from a CUDA graph" if graphed else ""))
    offloaded = result.modes.count("offload") * tokens * model.config.hidden_size * 2  # bf16 layer inputs
    if offloaded:
        print(f"host memory  {offloaded / GiB:.2f} GiB of pinned CPU memory for the offloaded layer inputs")
    if budget is not None:
        print(f"verdict      {'fits' if result.fits else 'does NOT fit'} in {budget / GiB:.1f} GiB")

        def fits(modes_of, micro, length):
            toks = micro * length * per_sequence
            return estimate(config, model, toks, length, modes_of(toks), budget, None).fits

        for label, modes_of in (("without checkpointing", lambda _: ["none"] * n),
                                ("every layer offloaded", lambda _: ["offload"] * n)):
            micro = largest_fitting(lambda b: fits(modes_of, b, seq), t.batch_size, 4096)
            longest = largest_fitting(lambda s: fits(modes_of, 1, s), seq, 2**22)
            print(f"fits {label}: micro-batch up to {micro} at {seq} tokens; at micro-batch 1, up to "
                  f"{longest:,} tokens" + (" (GPU memory only: the CPU must hold the offloaded inputs)"
                                           if "offloaded" in label else ""))
        if not result.fits:
            print("to fit: lower train.batch_size (and raise train.grad_accum to keep the effective batch), "
                  "lower model.max_seq_length, use activation_checkpointing: auto or offload, or a 4-bit base "
                  "(finetune.method: qlora)")
    if result.step_seconds is not None:
        seconds, where = result.step_seconds, "at full length"
        lengths = _train_row_lengths(config) if t.recipe == "sft" else None
        if lengths:
            from .estimate import micro_batch_seconds, padded_micro_batches

            tokens, length = padded_micro_batches(lengths, t.batch_size * per_sequence, t.seed)
            seconds = t.grad_accum * micro_batch_seconds(model, tokens, length, result.modes,
                                                         config.finetune.method, device)
            where = (f"at the data's lengths (micro-batches padded to {tokens:,.0f} tokens on average; "
                     f"{result.step_seconds:.2f} s at full length)")
        plan = training_plan(config, len(lengths) if lengths else _count_rows(config.data.resolved_path()))
        run = seconds * (plan.total_steps or 0)
        total = (f"; {plan.total_steps} steps: about " + (f"{run / 60:.0f} min" if run >= 120 else f"{run:.0f} s")
                 if plan.total_steps else "")
        print(f"time         about {seconds:.2f} s per optimizer step of {t.grad_accum} micro-batches "
              f"{where}{total} (lorafit/estimate.py)")
    return 0


def _train_row_lengths(config) -> list[int] | None:
    """The tokens of each training row (packed rows when packing), as the SFT data loader makes them with the
    model's tokenizer; None, with a note, when the data or the tokenizer cannot be read."""
    from .data import load_sft_dataset
    from .models.loading import open_checkpoint, resolve_source

    try:
        tokenizer = open_checkpoint(resolve_source(config.model.source, _cache_dir())).tokenizer()
        d = config.data
        data = load_sft_dataset(d.resolved_path(), tokenizer, config.model.max_seq_length, format=d.format,
                                train_on_responses_only=d.train_on_responses_only, packing=d.packing,
                                eval_fraction=d.eval_fraction, seed=config.train.seed)
    except (LorafitError, OSError, ValueError) as e:
        print(f"data         not read ({str(e).splitlines()[0][:120]}): the time is given at full length")
        return None
    return [sum(len(example) for example in row) for row in data.train]


def _estimate_device(args, devices):
    """(name, its lorafit.estimate.Device or None, usable bytes or None) from --gpu, --memory, or the GPU
    present."""
    import torch

    from .estimate import card_named

    from .memory import GiB

    if args.memory is not None:
        if args.memory <= 0:
            raise LorafitError(f"--memory must be positive GiB, got {args.memory}")
        return f"{args.memory:g} GiB", None, int(args.memory * GiB)
    name = args.gpu
    if name is None and torch.cuda.is_available():
        present = torch.cuda.get_device_name()
        name = card_named(present)
        if name is None:
            total = torch.cuda.get_device_properties(0).total_memory
            return present, None, int(0.95 * total)
    if name is None:
        return "none given (--gpu or --memory): memory only, no verdict", None, None
    if name not in devices:
        raise LorafitError(f"unknown --gpu {name!r}; known: {', '.join(devices)} (or give --memory GiB)")
    # 5% for the CUDA context and fragmentation, as train.memory_budget_gib's default
    return name, devices[name], int(0.95 * devices[name].memory_gib * GiB)


def _count_rows(path: Path) -> int | None:
    """Rows of a data file, counted cheaply without parsing examples; None when it can't be told."""
    try:
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl", ".ndjson"):
            text = path.read_text(encoding="utf-8")
            if suffix == ".json" and text.lstrip().startswith("["):
                return len(json.loads(text))
            return sum(1 for line in text.splitlines() if line.strip())  # JSON Lines (.json may hold them too)
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                # csv.reader, not a line count: a quoted field may span several lines.
                return max(0, sum(1 for _ in csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")) - 1)
    except (OSError, ValueError):  # unreadable or malformed: training will report it properly
        return None
    return None


def _model_hf_config(source) -> dict:
    """The model's Hugging Face config.json as a dict, without reading any weight."""
    from .models.loading import open_checkpoint, resolve_source

    return open_checkpoint(resolve_source(source, _cache_dir())).hf_config  # tensors are read lazily


DEMO_QUESTION = "Who are you?"


def _launch_under_torchrun(args) -> int:
    """`lorafit train --nproc N ...` is `torchrun --standalone --nproc-per-node N -m lorafit train ...`:
    PyTorch's own launcher starts and watches the ranks (and stops them all when one fails)."""
    rest, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "lorafit", *rest]
    print("lorafit: " + " ".join(command[1:]), file=sys.stderr, flush=True)
    return subprocess.call(command)


def _distributed_from_environment():
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK (absent: one process); the process group is joined here."""
    from .training.distributed import init_distributed

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return init_distributed(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def cmd_train(args) -> int:
    if args.nproc is not None and args.nproc < 1:
        raise LorafitError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_under_torchrun(args)
    from .training.distributed import shutdown

    dist = _distributed_from_environment()
    try:
        return _train(args, dist)
    finally:
        shutdown(dist)


def _train(args, dist) -> int:
    from importlib import resources

    from .config import Config
    from .recipes import train

    # `lorafit train train.max_steps=5`: an override in the config's place means "the demo, overridden".
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None
    demo = args.config is None
    path = args.config or str(resources.files("lorafit").joinpath("demo.yaml"))
    config = Config.from_yaml(path, args.overrides)
    if demo and not args.resume and not any(o.startswith("train.output_dir=") for o in args.overrides):
        # Each demo run gets its own folder, so running it twice never meets the first run's checkpoints.
        # Ranks agree on it: rank 0's clock decides.
        stamp = dist.gather_objects(time.strftime("%Y%m%d-%H%M%S"))[0]
        config = config.with_overrides([f"train.output_dir={config.train.output_dir}-{stamp}"])
    if demo and dist.is_main:
        from .generate import generate
        from .models.loading import load_model

        model, tokenizer = load_model(config.model.source, dtype=config.model.dtype, device=dist.device,
                                      cache_dir=_cache_dir())
        before = generate(model, tokenizer, [{"role": "user", "content": DEMO_QUESTION}], max_new_tokens=48)
        del model
        print(f"\nBefore fine-tuning\n  Q: {DEMO_QUESTION}\n  A: {before}\n", flush=True)

    result = train(config, resume=args.resume, cache_dir=_cache_dir(), progress=not args.no_progress, dist=dist)
    if dist.is_main:
        print(f"\nsaved {result.final}  (metrics, report and checkpoints in {result.output_dir})")
    if demo:
        from .generate import generate
        from .training.distributed import unsharded

        with unsharded(result.model):  # every rank generates the same greedy answer; rank 0 prints it
            after = generate(result.model, result.tokenizer, [{"role": "user", "content": DEMO_QUESTION}],
                             max_new_tokens=48)
        if dist.is_main:
            print(f"\nAfter fine-tuning ({result.steps} steps of LoRA)\n  Q: {DEMO_QUESTION}\n  A: {after}")
    return 0


def _print_checks(config) -> None:
    from .export.checks import adapter_checks

    for message in adapter_checks(config):
        print(f"note: {message}")


def _adapter_with_checks(args):
    from .export.adapter_source import load_adapter_model

    model, tokenizer = load_adapter_model(args.adapter, args.model, cache_dir=_cache_dir())
    _print_checks(model.lora_config)
    return model, tokenizer


def cmd_merge(args) -> int:
    import torch

    from .export.adapter_source import merged_dtype
    from .lora import merge_lora
    from .models.saving import save_model

    model, tokenizer = _adapter_with_checks(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    dtype = dtype or merged_dtype(model)
    merge_lora(model).to(dtype)
    out = save_model(model, tokenizer, args.out)
    print(f"wrote {out} (merged, {str(dtype).removeprefix('torch.')}): transformers, vLLM and llama.cpp's converter read it")
    return 0


def cmd_export(args) -> int:
    if args.format == "gguf-adapter":
        from .export.gguf_adapter import export_lora_gguf

        model, _ = _adapter_with_checks(args)
        path = export_lora_gguf(model, args.out, qtype=args.qtype)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): llama.cpp --lora {path} on the base's GGUF")
        return 0
    from .export.gguf_writer import export_gguf
    from .export.modelfile import write_modelfile
    from .lora import merge_lora

    if args.adapter is not None:
        model, tokenizer = _adapter_with_checks(args)
        merge_lora(model)
    elif args.model is not None:
        from .models.loading import load_model

        model, tokenizer = load_model(args.model, dtype="float32", device="cpu", cache_dir=_cache_dir())
    else:
        raise LorafitError("export gguf needs --model SOURCE or --adapter DIR")
    path = export_gguf(model, tokenizer, args.out, qtype=args.qtype)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.qtype})")
    if not args.no_modelfile:
        modelfile = write_modelfile(tokenizer, path)
        print(f"wrote {modelfile}: ollama create NAME -f {modelfile}")
    return 0
