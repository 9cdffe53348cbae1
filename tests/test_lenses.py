"""The other lenses (issue 23): RQI (Liu et al. 2022) and Nanda et al.'s remaining Fourier
measures (per-frequency excluded loss, the cos(w(a+b-c)) fit, the neuron-level losses), checked
on known answers, on the hand-built Fourier network, and as analysis families that equal their
one-call functions and are computed only when asked for."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import circuits
from circuits.analysis import analyze
from circuits.grid import grid_forward, stack_state_dicts
from circuits.measures import (
    cos_fit,
    cross_entropy,
    excluded_loss,
    excluded_loss_per_frequency,
    measure,
    neuron_level_losses,
    rqi,
)
from circuits.measures.registry import select
from circuits.measures.per_frequency import cos_cube
from circuits.tasks import as_view, make_task
from tests.handbuilt import fourier_network


def _pairs(n: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor([i * n + j for i, j in pairs])


def test_rqi_of_a_linear_embedding_is_one_and_of_a_random_one_the_trivial_floor() -> None:
    n, d = 13, 16
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    linear = a + torch.arange(n, dtype=torch.float64)[:, None] * b.double()
    train = torch.randperm(n * n, generator=gen)[: n * n // 2]
    value, acc = rqi(linear, train)
    assert value.item() == pytest.approx(1.0) and acc.item() == pytest.approx(1.0)
    # A random embedding realises only the quadruples every embedding realises: (i, j, i, j)
    # and (i, j, j, i). Over the integer sums there are sum_s c_s^2 permissible quadruples.
    counts = [min(s + 1, 2 * n - 1 - s) for s in range(2 * n - 1)]
    permissible = sum(c * c for c in counts)
    trivial = sum(2 if i != j else 1 for i in range(n) for j in range(n))
    rand, rand_acc = rqi(torch.randn(n, d, generator=gen, dtype=torch.float64), train)
    assert rand.item() == pytest.approx(trivial / permissible)  # about 3 / n: near 0 for a real p
    # With nothing but the trivial quadruples, a pair is reached only from itself or its mirror.
    mirror = {(i * n + j) for i, j in ((int(q) // n, int(q) % n) for q in train)} | {
        (j * n + i) for i, j in ((int(q) // n, int(q) % n) for q in train)}
    assert rand_acc.item() == pytest.approx(len(mirror) / n**2)
    # Mod n, a linear embedding realises exactly the quadruples whose integer sums agree.
    mod, _ = rqi(linear, train, modular=True)
    assert mod.item() == pytest.approx(permissible / (n * n * n))
    # Scale and offset do not matter (the embeddings are normalised); a stack is per checkpoint.
    stack = torch.stack([7.0 * linear + 3.0, torch.randn(n, d, generator=gen, dtype=torch.float64)])
    both, _ = rqi(stack, train)
    assert both[0].item() == pytest.approx(1.0) and both[1].item() == pytest.approx(trivial / permissible)
    big = rqi(torch.randn(59, d, generator=gen, dtype=torch.float64), torch.arange(59 * 59))[0].item()
    assert big < 0.06


def test_rqi_tolerance_admits_near_parallelograms() -> None:
    n = 9
    line = torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 0.0]])
    jitter = line + torch.tensor([[0.0, 1e-3]]) * torch.tensor([(-1.0) ** k for k in range(n)])[:, None]
    train = torch.arange(n * n)
    assert rqi(jitter, train, delta=1e-6)[0].item() < 1.0
    assert rqi(jitter, train, delta=0.1)[0].item() == pytest.approx(1.0)


def test_per_frequency_excluded_loss_rises_only_for_the_networks_own_frequencies() -> None:
    p, freqs = 31, [3, 7, 11]
    cfg, model = fourier_network(p, freqs, scale=20.0)
    task = make_task(cfg.task)
    logits, _ = grid_forward(stack_state_dicts([model.state_dict()]), p)
    per = excluded_loss_per_frequency(logits[0], task.labels, task, task.train_idx)
    assert per.shape == (15,)
    base = cross_entropy(logits[0][task.train_idx], task.labels[task.train_idx]).item()
    for k in range(1, 16):
        if k in freqs:
            assert per[k - 1].item() > 1.0, k  # nats: the answer is lost on many pairs
        else:
            # The ReLU's harmonics leave traces at other frequencies: a few 1e-4 nats at most.
            assert per[k - 1].item() < 3 * base, k
    # Each column is the excluded loss of that frequency alone.
    assert per[6].item() == pytest.approx(excluded_loss(logits[0], task.labels, task, [7], task.train_idx).item())


def test_cos_fit_recovers_exact_coefficients_and_reads_the_handbuilt_network() -> None:
    p = 13
    task = make_task(circuits.preset("quick-v1").replace(p=p).task)
    view = as_view(task)
    logits = 0.7 + 2.0 * cos_cube(view, 2) - 0.5 * cos_cube(view, 5)
    alpha, share = cos_fit(logits, task, [2, 5, 6])
    assert alpha.tolist() == pytest.approx([2.0, -0.5, 0.0], abs=1e-12)
    assert share.item() == pytest.approx(1.0)
    noise = torch.randn(p * p, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, part = cos_fit(logits + noise, task, [2, 5])
    assert 0.0 < part.item() < 1.0
    # The hand-built network's logits are |cos(pi k (a-b)/p)| cos(w_k(a+b-c)): the fit keeps the
    # amplitude's mean, a share (E|cos|)^2 / E[cos^2] = 8 / pi^2, with equal coefficients.
    freqs = [3, 7, 11]
    cfg, model = fourier_network(31, freqs, scale=20.0)
    hand = make_task(cfg.task)
    logits31, _ = grid_forward(stack_state_dicts([model.state_dict()]), 31)
    alpha, share = cos_fit(logits31[0], hand, freqs)
    assert share.item() == pytest.approx(8 / math.pi**2, abs=0.02)
    assert float(alpha.std() / alpha.mean()) < 0.02


def test_neuron_level_losses_follow_the_transformerlens_demo() -> None:
    p, freqs = 31, [3, 7, 11]
    cfg, model = fourier_network(p, freqs, scale=20.0)
    task = make_task(cfg.task)
    sd = stack_state_dicts([model.state_dict()])
    logits, post = grid_forward(sd, p)
    W_out, W_U = sd["blocks.0.mlp.W_out"][0], sd["unembed.W_U"][0]
    restricted, excluded = neuron_level_losses(post[0], logits[0], W_out, W_U, task.labels, task, freqs,
                                               task.train_idx, task.test_idx)
    # The neurons' key directions carry the algorithm: kept, the test pairs are solved; removed, the
    # training pairs are lost.
    full = cross_entropy(logits[0][task.test_idx], task.labels[task.test_idx]).item()
    assert restricted.item() < 2 * full + 1e-3
    assert excluded.item() > 1.0
    # Written out as the demo does it: N_r = mean N + P(N), logits_r = N_r W_out W_U shifted to the
    # logits' mean; N_e = N - P(N), logits_e = N_e W_out W_U + the attention path.
    from circuits.fourier import sum_directions

    N, L = post[0].double(), logits[0].double()
    dirs = sum_directions(p, freqs)
    P = dirs.T @ (dirs @ N)
    W_L = W_out.double() @ W_U.double()
    lr = (N.mean(0) + P) @ W_L
    lr = lr + (L.mean(0) - lr.mean(0))
    attn = L - N @ W_L
    le = (N - P) @ W_L + attn
    assert restricted.item() == pytest.approx(cross_entropy(lr[task.test_idx], task.labels[task.test_idx]).item())
    assert excluded.item() == pytest.approx(cross_entropy(le[task.train_idx], task.labels[task.train_idx]).item())


LENSES = ["per_frequency", "cos_fit", "neuron_losses", "rqi"]


def test_the_lenses_are_opt_in_families_equal_to_their_functions(tiny_run: circuits.Run, tmp_path: Path) -> None:
    assert not {f.name for f in select()} & set(LENSES)
    key = [1, 2]
    a = analyze(tiny_run, out=tmp_path / "a", measures=["losses", *LENSES], key_freqs=key)
    task = tiny_run.task
    for i in (0, len(tiny_run.epochs) // 2, len(tiny_run.epochs) - 1):
        epoch = tiny_run.epochs[i]
        row = a.measures.iloc[i]
        sd = stack_state_dicts([tiny_run.state_dict(epoch)])
        logits, post = grid_forward(sd, task.config.p)
        per = excluded_loss_per_frequency(logits[0], task.labels, task, task.train_idx)
        torch.testing.assert_close(a.arrays["excluded_loss_per_freq"][i], per, rtol=1e-5, atol=1e-8)
        assert row.excluded_loss_max_freq == pytest.approx(per.max().item(), rel=1e-5)
        alpha, share = cos_fit(logits[0], task, key)
        assert row.cos_fit_share == pytest.approx(share.item(), rel=1e-5, abs=1e-9)
        torch.testing.assert_close(a.arrays["cos_fit_alpha"][i], alpha, rtol=1e-5, atol=1e-8)
        rl, el = neuron_level_losses(post[0], logits[0], sd["blocks.0.mlp.W_out"][0], sd["unembed.W_U"][0],
                                     task.labels, task, key, task.train_idx, task.test_idx)
        assert row.restricted_loss_neurons == pytest.approx(rl.item(), rel=1e-5)
        assert row.excluded_loss_neurons == pytest.approx(el.item(), rel=1e-5)
        value, acc = rqi(sd["embed.W_E"][0, : task.config.p], task.train_idx)
        assert (row.rqi, row.rqi_acc_hat) == (pytest.approx(value.item()), pytest.approx(acc.item()))
    one = measure(tiny_run.model(tiny_run.epochs[-1]), task, tiny_run.config, measures=["rqi"],
                  options={"rqi.delta": 10.0})
    assert one["rqi"] > a.measures.rqi.iloc[-1]  # a looser tolerance realises more parallelograms
    assert set(a.summary["measures"]) >= set(LENSES) and a.summary["measure_options"]["rqi"] == {
        "delta": 0.01, "modular": False}


def test_rqi_is_refused_for_a_task_without_sums() -> None:
    from circuits.measures.registry import applicable
    from tests.conftest import tiny_config

    for cfg, why in ((tiny_config(op="mul"), "not addition"), (tiny_config(mix_mem=20, engine="reference"), "memorisation task")):
        keep, skipped = applicable(select(["losses", "rqi"]), cfg)
        assert "rqi" not in [f.name for f in keep] and why in skipped["rqi"]
        assert "losses" in [f.name for f in keep]


def test_a_lens_panel_joins_the_checkpoints_it_computed_and_puts_a_second_unit_on_the_right() -> None:
    import pandas as pd

    from circuits.plots import plot_measure_columns

    m = pd.DataFrame({"epoch": [0, 10, 20, 30, 40], "syn": [-1.0, float("nan"), -3.0, float("nan"), -2.0],
                      "size": [2.0, float("nan"), 5.0, float("nan"), 3.0], "red": [9.0, float("nan"), 7.0, float("nan"), 5.0]})
    fig = plot_measure_columns(m, {"syn": "syn (bits)", "red": "red (bits)", "size": "size (groups)"}, "t",
                               {"memorisation_end": 10, "circuit_formation_end": 30, "cleanup_end": None},
                               {"syn": "bits", "red": "bits", "size": "groups"})
    traces = {t.name: t for t in fig.data}
    assert list(traces["syn (bits)"].x) == [0, 20, 40]  # a line through the computed checkpoints
    assert traces["syn (bits)"].yaxis in (None, "y") and traces["size (groups)"].yaxis == "y2"
    assert fig.layout.yaxis.title.text == "bits" and fig.layout.yaxis2.title.text == "groups"
