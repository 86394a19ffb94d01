"""The models' Linear: MKL-packed weights for CPU decoding give F.linear's results (up to summation order)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafit.nn.linear import Linear, can_prepack, prepacked_weights

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="needs PyTorch built with MKL")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Linear(72, 100, bias=True), nn.GELU(), Linear(100, 24, bias=False))


@pytest.mark.parametrize("backend", ["mkl", "onednn"])
@pytest.mark.parametrize("rows", [2, 8])
def test_packed_product_equals_the_plain_one_and_other_row_counts_fall_back(rows, backend):
    model = _model()
    with torch.inference_mode():
        expected = {n: model(torch.ones(n, 1, 72) * 0.1 * n) for n in (rows, 3, 17)}
        with prepacked_weights(model, rows=rows, backend=backend):
            assert all(m.use_packed and m.packed.backend == backend for m in model if isinstance(m, Linear))
            for n, want in expected.items():
                got = model(torch.ones(n, 1, 72) * 0.1 * n)
                if n == rows:  # the libraries may sum in another order: differences of a few float32 ulps
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                else:  # the plain product, exactly
                    assert torch.equal(got, want)
    assert not any(m.use_packed for m in model if isinstance(m, Linear))


def test_pack_is_kept_while_the_weight_is_unchanged_and_redone_after_a_change():
    model = _model()
    layer = model[0]
    with prepacked_weights(model, rows=8):
        first = layer.packed.tensor
    with prepacked_weights(model, rows=8):
        assert layer.packed.tensor is first  # a second generation reuses the pack
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step changes the weight in place
    x = torch.randn(8, 72)
    with torch.inference_mode(), prepacked_weights(model, rows=8):
        assert layer.packed.tensor is not first
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


def test_single_rows_and_non_float32_weights_are_not_packed():
    model = _model()
    with prepacked_weights(model, rows=1):
        assert not any(m.use_packed for m in model if isinstance(m, Linear))
    assert can_prepack(torch.zeros(4, 4))
    assert not can_prepack(torch.zeros(4, 4, dtype=torch.bfloat16))
    model = _model().to(torch.bfloat16)
    with prepacked_weights(model, rows=8):
        assert not any(m.use_packed for m in model if isinstance(m, Linear))


def test_training_outside_the_block_is_untouched():
    model = _model()
    with prepacked_weights(model, rows=4):
        pass
    x = torch.randn(4, 72)
    model(x).sum().backward()  # the packed op has no backward; outside the block it is never used
    assert model[0].weight.grad is not None


def test_the_faster_backend_is_measured_once():
    from lorafit.nn import linear

    weights = [torch.randn(64, 48), torch.randn(64, 48), torch.randn(48, 64)]
    choice = linear.fastest_backend(4, weights)
    assert choice in linear.BACKENDS and linear._FASTEST[(4, (((48, 64), 1), ((64, 48), 2)))] == choice
    with pytest.raises(ValueError, match="backend must be one of mkl, onednn"):
        with prepacked_weights(_model(), rows=4, backend="blas"):
            pass


@pytest.mark.parametrize("backend", ["mkl", "onednn"])
@pytest.mark.parametrize("dora", [False, True])
def test_lora_layers_decode_through_one_packed_merged_weight(dora, backend):
    from lorafit.lora import LoRALinear, LoRAConfig, set_adapters_enabled

    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(Linear(72, 100, bias=True), LoRAConfig(r=4, alpha=8, dora=dora)), nn.GELU(),
                          Linear(100, 24, bias=False))
    adapter = model[0]
    with torch.no_grad():
        adapter.lora_B.weight.normal_(0, 0.1)  # a trained adapter: the merged weight differs from W
    model.eval()
    with torch.inference_mode():
        expected = {n: model(torch.ones(n, 72) * 0.1 * n) for n in (8, 3)}
        with prepacked_weights(model, rows=8, backend=backend):
            assert adapter.decode_rows == 8 and adapter.base_layer.packed.key[4]  # a merged pack
            torch.testing.assert_close(model(torch.ones(8, 72) * 0.8), expected[8], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(torch.ones(3, 72) * 0.3), expected[3], rtol=1e-6, atol=1e-6)
    assert adapter.decode_rows == 0
    first = adapter.base_layer.packed.tensor
    with torch.no_grad():
        adapter.lora_A.weight.add_(0.01)  # an optimizer step on the adapter: the merged pack is made again
    with torch.inference_mode(), prepacked_weights(model, rows=8, backend=backend):
        assert adapter.base_layer.packed.tensor is not first
        torch.testing.assert_close(model(torch.ones(8, 72)), model[2](model[1](adapter.merged_weight() @ torch.ones(72)
                                   + adapter.base_layer.bias)).expand(8, 24), rtol=1e-5, atol=1e-5)
    set_adapters_enabled(model, False)  # the reference model: the base alone, packed as it is
    with torch.inference_mode(), prepacked_weights(model, rows=8, backend=backend):
        assert adapter.decode_rows == 0 and not adapter.base_layer.packed.key[4]
        x = torch.randn(8, 72)
        torch.testing.assert_close(adapter(x), F.linear(x, adapter.base_layer.weight, adapter.base_layer.bias),
                                   rtol=1e-6, atol=1e-6)
