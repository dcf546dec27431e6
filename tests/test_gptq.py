"""GPTQ beats round-to-nearest on the same layer and data; scales and integers follow the reference."""

import pytest
import torch

from converter.gptq import HessianAccumulator, quantize_gptq, quantize_rtn


def layer_and_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2048, 256, generator=g)
    x = z @ (torch.randn(256, 256, generator=g) / 16)          # correlated inputs, as real activations are
    x[:, :4] *= 8                                               # a few heavy channels
    w = torch.randn(192, 256, generator=g) / 16
    return x, w


def output_error(x, w, w_hat):
    return float(((x @ w_hat.T - x @ w.T) ** 2).sum())


@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("mse_clip", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn(group_size, mse_clip, act_order):
    x, w = layer_and_data()
    acc = HessianAccumulator(256)
    acc.add(x)
    rtn = quantize_rtn(w, group_size=group_size, mse_clip=mse_clip)
    gq, loss = quantize_gptq(w, acc.hessian, group_size=group_size, mse_clip=mse_clip, act_order=act_order)
    assert loss > 0
    e_rtn, e_gptq = output_error(x, w, rtn.dequantize()), output_error(x, w, gq.dequantize())
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    for qw in (rtn, gq):
        assert qw.q.dtype == torch.int8 and int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
        assert qw.scale.dtype == torch.float16
        assert qw.scale.shape == ((192, 1) if group_size == -1 else (192, 4))
        expected = qw.q.float().reshape(192, qw.scale.shape[1], -1) * qw.scale.float().unsqueeze(-1)
        assert torch.equal(qw.dequantize(), expected.reshape(192, 256))


def test_mse_clip_lowers_rtn_weight_error():
    _, w = layer_and_data(1)
    plain = ((quantize_rtn(w).dequantize() - w) ** 2).sum()
    clipped = ((quantize_rtn(w, mse_clip=True).dequantize() - w) ** 2).sum()
    assert clipped < plain


def test_dead_input_column():
    x, w = layer_and_data(2)
    x[:, 7] = 0
    acc = HessianAccumulator(256)
    acc.add(x)
    qw, loss = quantize_gptq(w, acc.hessian)
    assert torch.isfinite(qw.scale.float()).all() and torch.isfinite(torch.tensor(loss))
    assert (qw.q[:, 7] == 0).all()


def test_hessian_accumulates_over_batches():
    x, _ = layer_and_data(3)
    one, two = HessianAccumulator(256), HessianAccumulator(256)
    one.add(x)
    two.add(x[:1000])
    two.add(x[1000:].reshape(2, -1, 256))
    assert torch.allclose(one.hessian, two.hessian, rtol=1e-5, atol=1e-6)
    assert torch.allclose(one.hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)
