"""PyTorch's ``clip_grad_norm_`` beside ``clip_by_global_norm``: equal where they agree,
and the edge cases of docs/numerics.md, as PyTorch behaves on them.

PyTorch is not a dependency: without it these tests are skipped. Run them in an
environment with torch (docs/numerics.md names the version last checked).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

import gradclip_jax  # noqa: E402


def _torch_clip(grads, max_norm):
    """``clip_grad_norm_`` on parameters whose ``.grad`` are ``grads``: (norm, grads)."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm, [p.grad for p in params]


def _ours(grads, max_norm):
    tx = gradclip_jax.clip_by_global_norm(max_norm)
    out, state = tx.update(grads, tx.init(grads))
    return state.stats.norm, out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 1e3])
def test_equal_to_clip_grad_norm_on_ordinary_gradients(seed, max_norm):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=shape).astype(np.float32) for shape in [(7, 5), (5,), (3, 2, 4)]]
    torch_norm, torch_out = _torch_clip([torch.from_numpy(a) for a in arrays], max_norm)
    norm, out = _ours([jnp.asarray(a) for a in arrays], max_norm)
    np.testing.assert_allclose(norm, torch_norm.item(), rtol=1e-6)
    for ours_leaf, torch_leaf in zip(out, torch_out):
        # PyTorch divides by norm + 1e-6; we divide by the norm.
        np.testing.assert_allclose(ours_leaf, torch_leaf.numpy(), rtol=2e-6, atol=1e-9)


def test_float16_norm_above_65504_pytorch_zeroes_we_clip():
    grad = np.full((1000,), 3000.0, np.float16)  # norm 94868 > float16's largest, 65504
    torch_norm, torch_out = _torch_clip([torch.from_numpy(grad)], 1.0)
    assert math.isinf(torch_norm.item())
    assert not torch_out[0].any()  # every entry multiplied by 1 / inf
    norm, out = _ours([jnp.asarray(grad)], 1.0)
    np.testing.assert_allclose(norm, 3000.0 * math.sqrt(1000), rtol=1e-3)
    np.testing.assert_allclose(gradclip_jax.global_norm(out), 1.0, rtol=2e-3)


@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_huge_float32_gradients_pytorch_zeroes_we_keep_the_direction(magnitude):
    direction = np.array([3.0, -4.0, 0.0, 12.0], np.float32)
    torch_norm, torch_out = _torch_clip([torch.from_numpy(direction * magnitude)], 1.0)
    assert math.isinf(torch_norm.item()) and not torch_out[0].any()
    _, out = _ours([jnp.asarray(direction * magnitude)], 1.0)
    np.testing.assert_allclose(out[0], direction / 13.0, rtol=1e-6)


def test_zero_gradients_with_zero_threshold_give_zeros_in_both():
    _, torch_out = _torch_clip([torch.zeros(3)], 0.0)
    _, out = _ours([jnp.zeros(3)], 0.0)
    assert not torch_out[0].any() and not np.asarray(out[0]).any()
    assert np.all(np.isfinite(out[0]))


def test_negative_threshold_pytorch_flips_the_sign_we_raise():
    _, torch_out = _torch_clip([torch.tensor([3.0, 4.0])], -1.0)
    np.testing.assert_allclose(torch_out[0].numpy(), [-0.6, -0.8], rtol=1e-5)
    with pytest.raises(ValueError, match="max_norm"):
        gradclip_jax.clip_by_global_norm(-1.0)


def test_nan_entries_pytorch_spreads_them_we_keep_them_in_place():
    grads = [np.array([np.nan, 1.0], np.float32), np.array([1.0], np.float32)]
    _, torch_out = _torch_clip([torch.from_numpy(g) for g in grads], 1.0)
    for leaf in torch_out:  # every entry times NaN / (NaN + 1e-6)
        assert torch.isnan(leaf).all()
    norm, out = _ours([jnp.asarray(g) for g in grads], 1.0)
    assert np.isnan(norm)  # reported, so a guard or a logger sees it
    np.testing.assert_array_equal(out[0], grads[0])  # NaN where it was, nowhere else
    np.testing.assert_array_equal(out[1], grads[1])


def test_complex_gradients_agree():
    grad = np.array([3 + 4j, 1 - 2j, 0j], np.complex64)
    torch_norm, torch_out = _torch_clip([torch.from_numpy(grad)], 1.0)
    norm, out = _ours([jnp.asarray(grad)], 1.0)
    np.testing.assert_allclose(norm, torch_norm.item(), rtol=1e-6)
    np.testing.assert_allclose(out[0], torch_out[0].numpy(), rtol=2e-6)
