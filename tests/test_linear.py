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


@pytest.mark.parametrize("rows", [2, 8])
def test_packed_product_equals_the_plain_one_and_other_row_counts_fall_back(rows):
    model = _model()
    with torch.inference_mode():
        expected = {n: model(torch.ones(n, 1, 72) * 0.1 * n) for n in (rows, 3, 17)}
        with prepacked_weights(model, rows=rows):
            assert all(m.use_packed for m in model if isinstance(m, Linear))
            for n, want in expected.items():
                got = model(torch.ones(n, 1, 72) * 0.1 * n)
                if n == rows:  # MKL may sum in another order: differences of a few float32 ulps
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                else:  # the plain product, exactly
                    assert torch.equal(got, want)
    assert not any(m.use_packed for m in model if isinstance(m, Linear))


def test_pack_is_kept_while_the_weight_is_unchanged_and_redone_after_a_change():
    model = _model()
    layer = model[0]
    with prepacked_weights(model, rows=8):
        first = layer.packed[0]
    with prepacked_weights(model, rows=8):
        assert layer.packed[0] is first  # a second generation reuses the pack
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step changes the weight in place
    x = torch.randn(8, 72)
    with torch.inference_mode(), prepacked_weights(model, rows=8):
        assert layer.packed[0] is not first
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
