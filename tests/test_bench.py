"""`bench train` end to end, as a user runs it: a real `python -m lora_trainer_ext bench train` process
on the tiny model, whose table must hold one row per network with numbers that agree with each other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ["model", "resolution", "batch", "network", "TE cache", "s/step", "samples/s", "peak mem", "floor s/step",
           "ratio", "ratio range"]

pytestmark = pytest.mark.timeout(120)


def bench_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lora_trainer_ext", "bench", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=110)


def table(stdout: str) -> list[dict[str, str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    header = [cell.strip() for cell in lines[start].split("|")]
    assert header == COLUMNS
    assert set(lines[start + 1]) <= {"-", "+"}
    body = [line for line in lines[start + 2 :] if line.strip()]
    return [dict(zip(header, (cell.strip() for cell in line.split("|")))) for line in body]


def test_bench_train_tiny_prints_a_consistent_table():
    done = bench_train("--model", "tiny", "--steps", "2", "--batch", "2", "--rounds", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "device: cpu" in done.stdout and "torch " in done.stdout and "CPU threads" in done.stdout
    assert "peak mem: " in done.stdout
    rows = table(done.stdout)
    assert [row["network"] for row in rows] == ["lora", "locon"]
    for row in rows:
        assert (row["model"], row["resolution"], row["batch"], row["TE cache"]) == ("tiny", "64px", "2", "no")
        step, rate, floor, ratio = (float(row[k]) for k in ("s/step", "samples/s", "floor s/step", "ratio"))
        assert step > 0 and floor > 0
        assert rate == pytest.approx(2 / step, rel=0.02, abs=0.01)
        # the median of 2 rounds' ratios (their mean), inside their range, near the medians' ratio
        low, high = map(float, row["ratio range"].removesuffix(" (2 rounds)").split("-"))
        assert low <= high and ratio == pytest.approx((low + high) / 2, abs=0.0015)
        assert 0.5 * step / floor < ratio < 2 * step / floor
        amount, unit = row["peak mem"].split()
        assert unit == "GiB" and 0 < float(amount) < 64


def test_bench_train_sdxl_rows_come_with_and_without_cached_text_encoder_outputs():
    done = bench_train("--model", "tiny-sdxl", "--network", "lora", "--steps", "2", "--batch", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    assert [(row["model"], row["network"], row["TE cache"]) for row in rows] == [
        ("tiny-sdxl", "lora", "no"), ("tiny-sdxl", "lora", "ram")]
    assert all(float(row["s/step"]) > 0 for row in rows)


def test_bench_train_refuses_bad_numbers():
    for bad in (("--steps", "0"), ("--rounds", "0")):
        done = bench_train("--model", "tiny", *bad)
        assert done.returncode == 1 and "at least 1" in done.stderr
