"""Full fine-tuning, LoRA and QLoRA are one preparation step on a loaded model, not separate code paths."""

from .lora import apply_lora, is_quantized_linear, parameter_summary

METHODS = ("lora", "qlora", "full")


def prepare_for_finetuning(model, method: str = "lora", verbose: bool = True, **lora_options):
    """method "full": every parameter trains. "lora": adapters on a dense base. "qlora": adapters on a base
    loaded with quantize="nf4". lora_options are apply_lora's (r, alpha, dropout, targets, rslora, dora,
    modules_to_save)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not supported (supported: {', '.join(METHODS)})")
    quantized = any(is_quantized_linear(m) for m in model.modules())
    if method == "full":
        if lora_options:
            raise ValueError(f"method 'full' takes no LoRA options (got {', '.join(lora_options)})")
        if quantized:
            raise ValueError("full fine-tuning needs dense weights: load the model without quantize='nf4'")
        for p in model.parameters():
            p.requires_grad_(True)
        if verbose:
            print(parameter_summary(model))
        return model
    if method == "qlora" and not quantized:
        raise ValueError("method 'qlora' needs a 4-bit base: load the model with quantize='nf4'")
    return apply_lora(model, verbose=verbose, **lora_options)
