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
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[1].min() >= 0 and a[1].max() < 1000 and torch.equal(a[2], a[0])  # no perturbation asked
    one = latents[:1]
    plain, _, _ = objective.sample(one, torch.Generator().manual_seed(2), 1000)
    offset, _, _ = objective.sample(one, torch.Generator().manual_seed(2), 1000, noise_offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift)) and shift.abs().sum() > 0


def test_a_batch_draws_what_its_samples_draw_as_smaller_batches_in_a_row():
    latents = torch.zeros(4, 4, 8, 8)
    options = dict(noise_offset=0.1, multires_iterations=3, ip_noise_gamma=0.05)
    whole = objective.sample(latents, torch.Generator().manual_seed(7), 1000, **options)
    g = torch.Generator().manual_seed(7)
    halves = [objective.sample(latents[:2], g, 1000, **options), objective.sample(latents[2:], g, 1000, **options)]
    for i, part in enumerate(whole):  # what gradient accumulation relies on
        assert torch.equal(part, torch.cat([half[i] for half in halves]))
    assert not torch.equal(whole[2], whole[0])  # the latents get the perturbed noise, the target stays eps


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


def test_multires_noise_adds_coarser_layers_then_rescales_to_unit_std():
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = objective.multires_noise(noise, torch.Generator().manual_seed(5), iterations=6, discount=0.3)
    # By hand: layer i is noise drawn at (32/r^i) per side, r in [2, 4), upsampled, weighted 0.3^i; it stops
    # once a side is 1 pixel; then the sum is divided by its standard deviation.
    g, expected, layers = torch.Generator().manual_seed(5), noise.clone(), 0
    for i in range(6):
        r = 2 + 2 * torch.rand((), generator=g).item()
        side = max(1, int(32 / r**i))
        layer = torch.randn((2, 4, side, side), generator=g)
        expected += torch.nn.functional.interpolate(layer, size=(32, 32), mode="bilinear") * 0.3**i
        layers += 1
        if side == 1:
            break
    assert 2 <= layers < 6  # 32 px reaches 1 px before six layers
    torch.testing.assert_close(out, expected / expected.std())
    assert abs(out.std().item() - 1) < 1e-5
    # Coarse layers make whole regions brighter or darker together: neighbouring pixels correlate.
    def neighbours(x):
        return (x[..., :-1] * x[..., 1:]).mean().item() / x.var().item()

    strong = objective.multires_noise(noise, torch.Generator().manual_seed(5), iterations=6, discount=0.8)
    assert neighbours(strong) > 0.2 and abs(neighbours(noise)) < 0.05
    latents = torch.zeros(2, 4, 32, 32)
    plain, _, _ = objective.sample(latents, torch.Generator().manual_seed(3), 1000)
    layered, _, _ = objective.sample(latents, torch.Generator().manual_seed(3), 1000, multires_iterations=6)
    assert not torch.equal(plain, layered) and all(abs(x.std().item() - 1) < 1e-5 for x in layered)  # per sample


def test_input_perturbation_changes_only_the_noise_put_into_the_latents():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert objective.perturbed(noise, torch.Generator().manual_seed(1), 0.0) is noise
    out = objective.perturbed(noise, torch.Generator().manual_seed(1), 0.1)
    torch.testing.assert_close(out - noise, 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(1)))


def test_zero_terminal_snr_ends_in_pure_noise_and_keeps_the_first_step():
    ac = schedule()
    z = objective.zero_terminal_snr(ac)
    assert z[-1].item() == 0 and math.isclose(z[0].item(), ac[0].item(), rel_tol=1e-6)
    assert bool((z[1:] <= z[:-1]).all())  # still falling
    root, new = ac.double().sqrt(), z.double().sqrt()
    torch.testing.assert_close(new, (root - root[-1]) * root[0] / (root[0] - root[-1]), atol=1e-6, rtol=0)
    t = torch.tensor([999, 500])
    assert objective.snr_weights(t, z, 5.0, "v")[0].item() == 0  # no SNR at the end: no weight, no NaN
    wanted = objective.target(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), t, z, "v")
    assert torch.equal(wanted[0], -torch.ones(4, 2, 2))  # v at pure noise is -x0


def test_v_prediction_loss_weighed_like_noise_prediction():
    ac = schedule()
    t = torch.tensor([0, 500, 999])
    snr = ac[t] / (1 - ac[t])
    torch.testing.assert_close(objective.v_pred_like_eps_weights(t, ac), torch.clamp(snr, max=1000) / (torch.clamp(snr, max=1000) + 1))
