"""Micro-batches replayed from a CUDA graph (training/cuda_graphs.py) train exactly as the eager path does.

@pytest.mark.gpu: a tiny random Llama with LoRA (and an NF4 base), bf16 under autocast, three optimizer
steps of four micro-batches: the losses and the adapters after each step against the same run without
graphs. On the CPU: when graphs apply and how a collated batch becomes model inputs."""

import json
import warnings
from pathlib import Path

import pytest
import torch

import lorafit
from lorafit.data.packing import Example, collate
from lorafit.models.loading import build_from_tensors
from lorafit.models.registry import model_config_from_hf
from lorafit.recipes.sft import batch_inputs
from lorafit.training.cuda_graphs import MAX_CAPTURES, GraphedMicroBatches, can_graph
from tiny_models import tiny_hf_model


def _model(device, quantize=None):
    hf = tiny_hf_model("llama", vocab_size=320, hidden_size=128, intermediate_size=192, num_attention_heads=4,
                       head_dim=32)
    model = build_from_tensors(model_config_from_hf(hf.config.to_dict()), hf.state_dict().items(), torch.bfloat16,
                               torch.device(device), Path("tiny"), quantize)
    torch.manual_seed(1)
    lorafit.apply_lora(model, r=8, alpha=16, dropout=0.0, verbose=False)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # float32 masters, as the SFT recipe keeps them
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # B = 0 at init would leave A without gradient
    return model.train()


def _train(model, graphed: bool, shapes):
    """Three AdamW steps, one per list of micro-batch (B, T) shapes -> (losses, adapters after each step)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    graphs = GraphedMicroBatches(model, trainable, torch.bfloat16) if graphed else None
    g = torch.Generator().manual_seed(0)
    losses, states = [], []
    for step_shapes in shapes:
        total = torch.zeros((), device="cuda")
        for B, T in step_shapes:
            ids = torch.randint(0, 320, (B, T), generator=g).cuda()
            inputs = {"input_ids": ids, "labels": ids}
            if graphs is not None:
                total += graphs(inputs, 1 / len(step_shapes))
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    part = model(**inputs).loss / len(step_shapes)
                part.backward()
                total += part.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item())
        states.append([p.detach().clone() for p in trainable])
    return losses, states, graphs


def _checkpointed(model, modes):
    """modes "offload, tiled": every layer offloaded and the MLPs 32 tokens at a time (from 64 on)."""
    if modes == "offload, tiled":
        modes = "offload"
        model.tile_mlp_from(64, 32)
    model.activation_checkpointing = modes
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("quantize, modes", [(None, "none"), ("nf4", "none"), (None, ["layers", "none"]),
                                             (None, ["offload", "layers"]), ("nf4", "offload"),
                                             (None, "offload, tiled")])
def test_replayed_micro_batches_train_as_eager_ones(quantize, modes):
    # Step 1 records (its 2nd micro-batch repeats the 1st's shape) and replays; step 2 has a shape of its own
    # in the middle (eager, between replays); step 3 records a second shape. ["layers", "none"]: the first
    # layer recomputed in backward, inside the graph; "offload": its input copied to pinned memory and back
    # inside the graph too; tiled, the MLPs' forward skipped in the recomputation.
    shapes = [[(2, 48)] * 4, [(2, 48), (2, 48), (3, 40), (2, 48)], [(3, 40)] * 4]
    eager_losses, eager_states, _ = _train(_checkpointed(_model("cuda", quantize), modes), False, shapes)
    losses, states, graphs = _train(_checkpointed(_model("cuda", quantize), modes), True, shapes)
    assert graphs.captures == 2 and graphs.signature[0][1] == (3, 40)
    print("losses", eager_losses, losses)
    # The same kernels on the same inputs: equal up to float order of the gradient sums (replays accumulate
    # into the same buffers in the same order, so in practice bit-exact).
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for eager, replayed in zip(eager_states, states):
        for a, b in zip(eager, replayed):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_a_shape_that_keeps_changing_stays_eager():
    model = _model("cuda")
    shapes = [[(2, 16 + i)] for i in range(2 * MAX_CAPTURES)]
    _, _, graphs = _train(model, True, [shapes[0] * 2] + [[s[0]] * 2 for s in shapes[1:MAX_CAPTURES + 2]])
    assert graphs.captures == MAX_CAPTURES


def test_graphs_apply_to_one_gpu_process_that_keeps_every_activation():
    model = _model("cpu")
    assert not can_graph(model, torch.device("cpu"), distributed=False)
    cuda = torch.device("cuda")
    assert can_graph(model, cuda, distributed=False)
    assert not can_graph(model, cuda, distributed=True)
    for modes in (["layers", "none"], ["offload", "none"]):  # recomputed without dropout: nothing drawn
        model.activation_checkpointing = modes
        assert can_graph(model, cuda, distributed=False)
    lora_dropout = model.model.layers[0].self_attn.q_proj.lora_dropout
    model.model.layers[0].self_attn.q_proj.lora_dropout = torch.nn.Dropout(0.1)
    assert not can_graph(model, cuda, distributed=False)
    assert not can_graph(model, cuda, distributed=False, modes=["layers", "none"])
    assert can_graph(model, cuda, distributed=False, modes=["none", "none"])  # a replay draws as eager does
    model.model.layers[0].self_attn.q_proj.lora_dropout = lora_dropout
    model.activation_checkpointing = "none"
    model.disable_kernels(["cuda_graphs"])
    assert not can_graph(model, cuda, distributed=False)
    model.kernels = True
    assert can_graph(model, cuda, distributed=False)
    model.kernels = False  # the plain PyTorch path: no graphs either
    assert not can_graph(model, cuda, distributed=False)


def test_weights_made_from_the_adapters_are_made_again_on_every_call():
    # What a graph records must include these copies: they are made while recording only if made every call.
    from lorafit.kernels.lora_mlp import FusedMLPWeights

    model = _model("cpu")
    mlp = model.model.layers[0].mlp
    GraphedMicroBatches(model, [p for p in model.parameters() if p.requires_grad], torch.bfloat16)
    assert all(not m.keep_compute_adapters for m in model.modules() if hasattr(m, "keep_compute_adapters"))
    weights = FusedMLPWeights(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    weights.gate_up.matrix((mlp.gate_proj, mlp.up_proj), torch.bfloat16)
    weights.down(mlp.down_proj, torch.bfloat16)
    mlp.gate_proj.lora_B.weight.data.add_(1.0)  # a change with no new tensor version, as a replay's would be
    mlp.down_proj.lora_B.weight.data.add_(1.0)
    M = weights.gate_up.matrix((mlp.gate_proj, mlp.up_proj), torch.bfloat16)
    D = weights.down(mlp.down_proj, torch.bfloat16)
    I, C, r, s = weights.I, weights.C, weights.r, mlp.gate_proj.scaling
    torch.testing.assert_close(M[:I, C:C + r], (mlp.gate_proj.lora_B.weight * s).to(M.dtype))
    torch.testing.assert_close(D[:, I:], (mlp.down_proj.lora_B.weight * mlp.down_proj.scaling).to(D.dtype))


def test_a_right_padded_batch_goes_without_its_mask():
    short, long = Example.from_lists([1, 2, 3], [-100, 2, 3]), Example.from_lists([4, 5, 6, 7, 8], [-100, 5, 6, 7, 8])
    padded = batch_inputs(collate([[short], [long]], pad_id=0, packed=False), torch.device("cpu"))
    assert set(padded) == {"input_ids", "labels", "position_ids"}  # what a graph can replay
    packed = batch_inputs(collate([[short, long]], pad_id=0, packed=True), torch.device("cpu"))
    assert packed["attention_mask"].shape == (1, 1, 8, 8) and packed["documents"].max_seqlen == 5
    # The model computes the same loss either way.
    model = _model("cpu")
    batch = collate([[short], [long]], pad_id=0, packed=False)
    with torch.no_grad():
        with_mask = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"]).loss
        without = model(**padded).loss
    assert without.item() == with_mask.item()


@pytest.mark.gpu
def test_the_sft_recipe_replays_repeated_shapes_and_trains_as_without(tmp_path):
    """stories260K (a real Llama) on 12 copies of one example, so every micro-batch has one shape: the recipe
    records a graph and replays it, and its 12 losses are those of the same run with cuda_graphs off."""
    from test_sft_gpu import STORIES

    from lorafit import Config
    from lorafit.recipes import train

    data = tmp_path / "stories.json"
    data.write_text(json.dumps([{"instruction": "Tell a story about a cat in the park.",
                                 "output": "Once upon a time, a little cat went to the park and played all day."}] * 12))
    runs = {}
    for name, disabled in (("graphs", ""), ("eager", "cuda_graphs")):
        config = Config.from_dict({"model": {"source": str(STORIES), "dtype": "bfloat16", "max_seq_length": 96}})
        config = config.with_overrides([
            f"data.path={data}", "train.max_steps=12", "train.batch_size=4", "train.grad_accum=2", "train.lr=2e-3",
            f"train.output_dir={tmp_path / name}", "train.save_every=0", "data.eval_fraction=0",
            f"train.disable_kernels=[{disabled}]"])
        lines = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback chat template's warning
            runs[name] = train(config, log=lambda line: lines.append(str(line)), progress=False).losses
        runs[name + " log"] = lines
    assert any("micro-batches of 4 x" in line and "replay from a CUDA graph" in line for line in runs["graphs log"])
    assert not any("CUDA graph" in line for line in runs["eager log"] if "replay" in line)
    print("losses", runs["graphs"], runs["eager"])
    assert runs["graphs"] == pytest.approx(runs["eager"], rel=1e-5)
