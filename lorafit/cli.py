"""The `lorafit` command. The only place that reads environment variables and prints errors for people."""

import argparse
import os
import sys

from .errors import LorafitError


def main(argv=None) -> int:
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

    args = parser.parse_args(argv)
    try:
        return {"generate": cmd_generate, "chat": cmd_chat}[args.command](args)
    except LorafitError as e:
        print(f"lorafit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _load(args):
    from .models.loading import load_model

    cache_dir = os.environ.get("LORAFIT_CACHE_DIR")  # where the default model's converted copy lives
    return load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=cache_dir)


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
