"""Float32 subnormals are flushed on every computing thread while training (issue 17).

The speed itself is a benchmark (benchmarks/train_step.py --run); here, the mechanism: inside
the context, parallel torch ops and the Numba kernels write no subnormal on any thread; a
training step on weights whose float32 loss gradient would hold subnormals holds none, at 1 and
2 threads, with the same bits at both; without subnormals, flushing changes no bit.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import circuits
from circuits.engine.fused import stacked_last_logits
from circuits.engine.loss import stacked_loss
from circuits.engine.mix import MixMLPUnembed
from circuits.engine.stacked import StackedAdamW, stack_models
from circuits.engine.step import TrainStep
from circuits.engine.subnormal import flush_subnormals, flushing, subnormal_count
from circuits.model import make_model
from circuits.trainer import deterministic
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the MXCSR flush is x86-64 only"
)


@contextmanager
def threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _parallel_product() -> torch.Tensor:
    # 2^-100 * 2^-30 = 2^-130, a float32 subnormal; 2^18 elements split over every thread.
    return torch.full((1 << 18,), 2.0**-100) * 2.0**-30


def _mix_kernel_output() -> torch.Tensor:
    # The Numba forward (parallel over the batch's rows): weights 2^-64 times table rows 2^-70,
    # so every logit is a sum of subnormal products.
    n_models, batch, n_pos, n_heads, vocab, d_mlp, d_out = 1, 512, 2, 4, 5, 8, 6
    pattern = torch.full((n_models, batch, n_pos, n_heads), 2.0**-64)
    table = torch.full((n_models, n_heads, n_pos, vocab, d_mlp + d_out), 2.0**-70)
    base = torch.zeros(n_models, 1, d_mlp + d_out)
    W_L = torch.zeros(n_models, d_mlp, d_out)
    tokens = torch.randint(0, vocab, (n_models, batch, n_pos))
    base_tokens = torch.zeros(n_models, batch, dtype=torch.int64)
    return MixMLPUnembed.apply(pattern, table, base, W_L, tokens, base_tokens)


def test_every_thread_flushes_inside_and_none_after() -> None:
    with threads(2):
        assert subnormal_count(_parallel_product()) == 1 << 18  # the check can see subnormals
        assert subnormal_count(_mix_kernel_output()) > 0
        with flush_subnormals() as on:
            assert on and flushing()
            with flush_subnormals() as inner:  # re-entrant: the inner exit restores nothing
                assert inner
            assert subnormal_count(_parallel_product()) == 0
            out = _mix_kernel_output()
            assert subnormal_count(out) == 0 and not out.any()
        assert not flushing()
        # Every thread is back as it was: the product is subnormal on both threads again.
        assert subnormal_count(_parallel_product()) == 1 << 18
        assert subnormal_count(_mix_kernel_output()) > 0


def test_every_thread_flushes_when_numba_has_its_own_pool() -> None:
    # Here Numba's OpenMP layer shares torch's libgomp, so one parallel region reaches both
    # pools; with Numba's own workqueue threads, torch's pool must be set on its own.
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    test = f"{__file__}::test_every_thread_flushes_inside_and_none_after"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout


def _large_margin_step(run: circuits.Run, scale: float) -> tuple[dict[str, torch.Tensor], TrainStep, list]:
    """One member at the run's last checkpoint, its unembedding scaled by ``scale`` (so the
    margins are huge, as after memorisation), and the logits' gradient recorded."""
    cfg = run.config
    model = make_model(cfg)
    weights = run.state_dict(run.epochs[-1])
    weights["unembed.W_U"] = weights["unembed.W_U"] * scale
    model.load_state_dict(weights, strict=False)
    x, y = run.task.train_data()
    params = stack_models([model])
    opt = StackedAdamW(params, [cfg])
    w = torch.full((1, len(y)), 1.0 / len(y), dtype=torch.float64)
    seen: list[torch.Tensor] = []

    def forward(p: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        logits = stacked_last_logits(p, tokens, cfg.model.act_fn)
        logits.register_hook(lambda g: seen.append(g.detach().clone()))
        return logits

    return params, TrainStep(params, opt, x[None], y[None], w, cfg.model.act_fn, forward=forward), seen


def _subnormal_scale(run: circuits.Run) -> float:
    """A W_U scale at which the float32 gradient of the logits holds subnormals unflushed."""
    for scale in (4.0, 8.0, 16.0, 32.0, 64.0):
        _, step, seen = _large_margin_step(run, scale)
        with threads(1):
            step()
        if subnormal_count(seen[0]) > 0:
            return scale
    raise AssertionError("no scale of W_U gives subnormal gradients")


def test_a_late_training_step_makes_no_subnormals_at_one_and_two_threads(tiny_run: circuits.Run) -> None:
    scale = _subnormal_scale(tiny_run)
    results = []
    for n in (1, 2):
        with threads(n):
            _, unflushed, seen = _large_margin_step(tiny_run, scale)
            unflushed()
            assert subnormal_count(seen[0]) > 0  # what the fix acts on, without it
            params, step, seen = _large_margin_step(tiny_run, scale)
            with deterministic():  # what training runs under
                # The step by hand, to look at the gradients before the update drops them.
                logits = step.forward(params, step.tokens)
                stacked_loss(logits, step.labels, step.weights).backward()
                g = seen[0]
                # The same gradient, with its subnormal entries flushed to 0.
                assert subnormal_count(g) == 0 and int((g == 0).sum()) > 0
                for k, p in params.items():
                    assert p.grad is None or subnormal_count(p.grad) == 0, k
                step.opt.step()
                step.opt.zero_grad()
                step()  # and one more, as the loop runs it
        state = [t for st in step.opt.state.values() for t in st.values()]
        for t in [*params.values(), *state]:
            assert subnormal_count(t) == 0
        results.append({k: v.detach().clone() for k, v in params.items()})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_flushing_changes_no_bit_without_subnormals(tiny_run: circuits.Run) -> None:
    out = []
    for flush in (False, True):
        params, step, seen = _large_margin_step(tiny_run, 1.0)
        with threads(2), (flush_subnormals() if flush else threads(2)):
            for _ in range(3):
                step()
        assert subnormal_count(seen[0]) == 0
        out.append(params)
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k
