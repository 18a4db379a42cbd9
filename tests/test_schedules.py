from __future__ import annotations

import math

import pytest
import torch

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.training.schedules import SCHEDULERS, lr_lambda, make_scheduler, warmup_steps


def test_warmup_steps_is_the_whole_part_of_the_ratio():
    assert warmup_steps(2000, 0.05) == 100
    assert warmup_steps(99, 0.05) == 4
    assert warmup_steps(500, 0.0) == 0


def test_constant_ignores_warmup():
    f = lr_lambda("constant", 100, warmup_steps=10)
    assert [f(s) for s in (0, 5, 10, 99)] == [1.0, 1.0, 1.0, 1.0]


def test_constant_with_warmup_ramps_linearly_then_holds():
    f = lr_lambda("constant_with_warmup", 100, warmup_steps=10)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == 1.0
    assert f(99) == 1.0


def test_cosine_after_warmup_halves_at_midpoint_and_ends_at_zero():
    f = lr_lambda("cosine", 110, warmup_steps=10)
    assert f(4) == pytest.approx(0.4)
    assert f(10) == pytest.approx(1.0)  # warmup end: full rate
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(60) == pytest.approx(0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.0)
    assert f(150) == pytest.approx(0.0)  # past the end it stays down


def test_cosine_with_restarts_jumps_back_at_each_cycle():
    f = lr_lambda("cosine_with_restarts", 300, warmup_steps=0, cycles=3)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.5)
    assert f(99) < 0.01  # end of the first cycle ...
    assert f(100) == pytest.approx(1.0)  # ... hard restart
    assert f(150) == pytest.approx(0.5)
    assert f(200) == pytest.approx(1.0)
    assert f(250) == pytest.approx(0.5)
    assert f(300) == 0.0


def test_cosine_with_restarts_with_warmup_counts_cycles_after_it():
    f = lr_lambda("cosine_with_restarts", 130, warmup_steps=10, cycles=3)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(50) == pytest.approx(1.0)  # 10 + 120/3: second cycle starts
    assert f(30) == pytest.approx(0.5)


def test_linear_and_polynomial_fall_to_zero_after_the_warmup():
    linear, square = lr_lambda("linear", 110, 10), lr_lambda("polynomial", 110, 10, power=2.0)
    assert [linear(s) for s in (0, 5, 10, 60, 110)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    assert [square(s) for s in (5, 10, 60, 85, 110)] == pytest.approx([0.5, 1, 0.25, 0.0625, 0])
    assert lr_lambda("polynomial", 110, 10)(60) == linear(60)  # power 1 is linear


def test_one_restart_is_plain_cosine():
    a = lr_lambda("cosine_with_restarts", 200, 20, cycles=1)
    b = lr_lambda("cosine", 200, 20)
    assert all(a(s) == pytest.approx(b(s)) for s in range(0, 200, 7))


@pytest.mark.parametrize(
    "args", [("step", 10, 0, 1), ("cosine", 0, 0, 1), ("cosine", 10, -1, 1), ("cosine_with_restarts", 10, 0, 0),
             ("polynomial", 10, 0, 1, 0.0)]
)
def test_bad_schedules_are_refused(args):
    with pytest.raises(LoraMakerError):
        lr_lambda(*args)


def _optimizer():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [a], "lr": 5e-4}, {"params": [b], "lr": 1e-4}])


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_drives_every_group_and_resumes(name):
    total, warmup = 40, 4
    f = lr_lambda(name, total, warmup, cycles=3)
    opt = _optimizer()
    sched = make_scheduler(opt, name, total, warmup, cycles=3)
    seen = []
    for step in range(25):
        seen.append([g["lr"] for g in opt.param_groups])
        assert seen[-1] == pytest.approx([5e-4 * f(step), 1e-4 * f(step)])
        opt.step()
        sched.step()
    # A fresh optimizer and scheduler, loaded from the saved states, carry on where they stopped.
    opt2 = _optimizer()
    sched2 = make_scheduler(opt2, name, total, warmup, cycles=3)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for step in range(25, total):
        assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
        assert opt2.param_groups[0]["lr"] == pytest.approx(5e-4 * f(step))
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()


def test_rex_is_the_xl_trainers_rational_decay_with_decaying_restarts():
    """RexAnnealingWarmRestarts as the XL trainer sets it (d 0.9, gamma 0.9, min_lr ~0): each of the cycles
    (total / cycles steps) warms up again, peaks at 0.9x the last one's, and decays along
    (1 - p) / (0.1 + 0.9 (1 - p)): slow at first, steep at the end."""
    f = lr_lambda("rex", 30, 3, 3)  # 3 cycles of 10 steps, 3 warmup steps each
    assert [f(s) for s in (0, 1, 3)] == pytest.approx([0.0, 1 / 3, 1.0])
    p = 3 / 7  # step 6: 3 of the 7 decay steps
    assert f(6) == pytest.approx((1 - p) / (0.1 + 0.9 * (1 - p)))
    assert f(6) > 1 - p  # above the straight line: rex holds the rate longer than linear
    assert f(13) == pytest.approx(0.9) and f(23) == pytest.approx(0.81) and f(10) == 0.0
    cut = lr_lambda("rex", 10, 20, 1)  # a warmup longer than its cycle is cut to leave one step of decay
    assert (cut(8), cut(9)) == (pytest.approx(8 / 9), 1.0)
