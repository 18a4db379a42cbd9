"""The training objective's maths against hand-computed values."""

from __future__ import annotations

import math

import torch

from lora_trainer_ext.training import objective


def schedule(T=1000):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_noise_and_timesteps_are_seeded_and_offset_is_per_channel():
    latents = torch.zeros(3, 4, 8, 8)
    a = objective.sample(latents, torch.Generator().manual_seed(1), 1000)
    b = objective.sample(latents, torch.Generator().manual_seed(1), 1000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].min() >= 0 and a[1].max() < 1000
    plain, _ = objective.sample(latents, torch.Generator().manual_seed(2), 1000)
    offset, _ = objective.sample(latents, torch.Generator().manual_seed(2), 1000, noise_offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift)) and shift.abs().sum() > 0


def test_add_noise_target_and_snr_weights():
    ac = schedule()
    x0 = torch.full((2, 1, 1, 1), 2.0)
    eps = torch.full((2, 1, 1, 1), -1.0)
    t = torch.tensor([0, 999])
    noisy = objective.add_noise(x0, eps, t, ac)
    for i, step in enumerate(t.tolist()):
        a = float(ac[step])
        assert math.isclose(float(noisy[i]), math.sqrt(a) * 2 - math.sqrt(1 - a), rel_tol=1e-5)
        v = float(objective.target(x0, eps, t, ac, "v")[i])
        assert math.isclose(v, math.sqrt(a) * -1 - math.sqrt(1 - a) * 2, rel_tol=1e-5)
    assert torch.equal(objective.target(x0, eps, t, ac, "eps"), eps)

    snr = ac / (1 - ac)
    t = torch.tensor([int((snr - 10).abs().argmin()), int((snr - 1).abs().argmin())])  # SNR about 10 and 1
    w = objective.snr_weights(t, ac, 5.0, "eps")
    assert math.isclose(float(w[0]), 5 / float(snr[t[0]]), rel_tol=1e-5) and math.isclose(float(w[1]), 1.0, rel_tol=1e-5)
    wv = objective.snr_weights(t, ac, 5.0, "v")
    assert math.isclose(float(wv[1]), float(snr[t[1]]) / (float(snr[t[1]]) + 1), rel_tol=1e-5)


def test_loss_is_weighted_per_sample_mean():
    pred = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    want = torch.zeros(2, 1, 2, 2)
    assert float(objective.loss(pred, want)) == 0.5
    assert float(objective.loss(pred, want, torch.tensor([0.5, 3.0]))) == 0.25
