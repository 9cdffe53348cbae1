"""Measures checked analytically: a hand-built Fourier network, random networks, known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.config import preset
from circuits.grid import grid_forward, stack_state_dicts
from circuits.fourier import fft2d, n_frequencies
from circuits.measures import (
    accuracy,
    cross_entropy,
    embed_key_frequencies,
    excluded_loss,
    gini,
    key_frequencies,
    key_logit_fraction,
    neuron_clusters,
    neuron_frequency_fractions,
    phase_boundaries,
    restricted_loss,
    weight_norm_sq,
)
from circuits.model import make_model
from circuits.tasks import make_task
from tests.handbuilt import fourier_network


def _grid(model, p):  # noqa: ANN001, ANN202
    logits, post = grid_forward(stack_state_dicts([model.state_dict()]), p)
    return logits[0], post[0]


def test_gini_known_values() -> None:
    n = 10
    one_hot = torch.zeros(n)
    one_hot[3] = 2.5
    assert gini(one_hot).item() == pytest.approx(1 - 1 / n)
    assert gini(torch.full((n,), 0.7)).item() == pytest.approx(0.0, abs=1e-12)
    # [0, 0, 1, 1]: Σ(2i - N - 1) c_i / (N Σ c) = (1 + 3) / (4 * 2) = 0.5
    assert gini(torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == pytest.approx(0.5)
    batch = torch.stack([one_hot, torch.ones(n)])
    torch.testing.assert_close(gini(batch), torch.tensor([0.9, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        gini(torch.tensor([-1.0, 1.0]))


def test_handbuilt_fourier_network_yields_its_frequencies_and_losses() -> None:
    p, freqs = 31, [3, 7, 11]
    cfg, model = fourier_network(p, freqs, scale=20.0)
    task = make_task(cfg.task)
    logits, post = _grid(model, p)
    fractions = neuron_frequency_fractions(post, p)
    assert key_frequencies(fractions) == freqs
    cluster, best = neuron_clusters(fractions)
    assert sorted(set(cluster.tolist())) == freqs and best.min() > 0.85
    full = cross_entropy(logits, task.labels).item()
    assert accuracy(logits, task.labels).item() == 1.0 and full < 1e-2
    restricted = restricted_loss(logits, task.labels, p, freqs).item()
    excluded = excluded_loss(logits, task.labels, p, freqs, task.train_idx).item()
    assert restricted <= 2 * full + 1e-6  # the key directions carry the whole algorithm
    assert excluded > 100 * full and excluded > 1.0  # without them the network is lost
    # The logits are |cos(πk(a-b)/p)| cos(w_k(a+b-c)): the sum directions hold the mean of the
    # amplitude, so their share of the variance is (E|cos|)^2 / E cos^2 = (2/π)^2 / (1/2) = 8/π^2.
    assert key_logit_fraction(logits, p, freqs).item() == pytest.approx(8 / np.pi**2, abs=0.02)
    # Removing a frequency the network does not use changes nothing.
    other = excluded_loss(logits, task.labels, p, [5], task.train_idx).item()
    assert other == pytest.approx(cross_entropy(logits[task.train_idx], task.labels[task.train_idx]).item(), rel=1e-3)
    assert embed_key_frequencies(model.W_E, p) == freqs


def test_random_network_has_no_confident_key_frequencies() -> None:
    cfg = preset("quick")
    model = make_model(cfg)
    _, post = _grid(model, cfg.task.p)
    fractions = neuron_frequency_fractions(post, cfg.task.p)
    assert key_frequencies(fractions) == []
    _, best = neuron_clusters(fractions)
    assert best.max() < 0.85


def test_frequency_fractions_match_full_2d_transform() -> None:
    p = 13
    acts = torch.randn(p * p, 6, dtype=torch.float64).relu()
    fast = neuron_frequency_fractions(acts, p)
    centred = acts - acts.mean(0)
    coeffs = fft2d(centred, p).pow(2)  # [p, p, n]
    total = coeffs.sum((0, 1))
    for k in range(1, n_frequencies(p) + 1):
        idx = torch.tensor([0, 2 * k - 1, 2 * k])
        block = coeffs[idx][:, idx].sum((0, 1))
        torch.testing.assert_close(fast[:, k - 1], block / total)


def test_restricted_and_excluded_on_synthetic_logits() -> None:
    # Logits = cos(w_k(a+b-c)) for k in S: the restricted logits equal them exactly.
    p, S = 23, [2, 9]
    a = torch.arange(p).repeat_interleave(p).double()
    b = torch.arange(p).repeat(p).double()
    c = torch.arange(p).double()
    logits = sum(torch.cos(2 * torch.pi * k * (a[:, None] + b[:, None] - c) / p) for k in S) * 10
    labels = ((a + b) % p).long()
    full = cross_entropy(logits, labels)
    torch.testing.assert_close(restricted_loss(logits, labels, p, S), full)
    idx = torch.arange(0, p * p, 2)
    excl = excluded_loss(logits, labels, p, S, idx)
    assert excl.item() == pytest.approx(np.log(p), rel=1e-6)  # nothing left: uniform
    assert key_logit_fraction(logits, p, S).item() == pytest.approx(1.0)


def test_weight_norm_sums_every_parameter() -> None:
    model = make_model(preset("quick").replace(p=7))
    expected = sum(p.double().pow(2).sum().item() for p in model.parameters())
    assert weight_norm_sq(model.state_dict()) == pytest.approx(expected)


def test_phase_rule_on_synthetic_curves() -> None:
    epochs = np.arange(0, 10_000, 50)
    # Test loss: rises to a peak at 1000, slow decline, sharp fall from 6000, floor after.
    test = np.where(epochs < 1000, 5 + epochs / 100, 15 - (epochs - 1000) / 1000)
    test = np.where(epochs >= 6000, 10 * 10.0 ** (-(epochs - 6000) / 300), test)
    test = np.maximum(test, 1e-7)
    # Weight norm: flat, then falls steeply from 6000 to 8000, then flat.
    norm = np.where(epochs < 6000, 1000.0, np.where(epochs < 8000, 1000 - (epochs - 6000) * 0.3, 400.0))
    ph = phase_boundaries(epochs, test, norm)
    assert ph.memorisation_end == 1000
    assert 5800 <= ph.circuit_formation_end <= 6100
    assert 7900 <= ph.cleanup_end <= 8200
    # Not grokked: only memorisation ends.
    flat = phase_boundaries(epochs, np.where(epochs < 1000, 5 + epochs / 100, 15.0 - epochs / 1e4), norm)
    assert flat.memorisation_end is not None and flat.circuit_formation_end is None


def test_phase_rule_skips_the_dip_after_the_memorisation_peak() -> None:
    # The curves of test_phase_rule_on_synthetic_curves with the test loss overshooting its
    # plateau at the peak: 15 at epoch 1000, down to 12 by 1200 (about 20% of the grokking
    # fall's rate in log10), then the slow plateau. Circuit formation still ends where the
    # sharp fall starts (6000), not at the dip, and cleanup is the norm's fall after it.
    epochs = np.arange(0, 10_000, 50)
    plateau = np.where(epochs < 1200, 15 - (epochs - 1000) * 3 / 200, 12 - (epochs - 1200) / 1000)
    test = np.where(epochs < 1000, 5 + epochs / 100, plateau)
    test = np.where(epochs >= 6000, 7.2 * 10.0 ** (-(epochs - 6000) / 300), test)
    test = np.maximum(test, 1e-7)
    # An early norm drop right after memorisation, then cleanup's steep fall 6000-8000.
    norm = np.where(epochs < 1000, 1000.0, np.where(epochs < 1300, 1000 - (epochs - 1000) * 0.5, 850.0))
    norm = np.where(epochs < 6000, norm, np.where(epochs < 8000, 850 - (epochs - 6000) * 0.3, 250.0))
    ph = phase_boundaries(epochs, test, norm)
    assert ph.memorisation_end == 1000
    assert 5800 <= ph.circuit_formation_end <= 6100
    assert 7900 <= ph.cleanup_end <= 8200


@pytest.mark.parametrize("spike_loss", [30.0, 1.0, 1e-2])
def test_phase_rule_ignores_a_late_spike(spike_loss: float) -> None:
    # The clean curves of test_phase_rule_on_synthetic_curves, run on to 12,000 epochs.
    epochs = np.arange(0, 12_000, 50)
    test = np.where(epochs < 1000, 5 + epochs / 100, 15 - (epochs - 1000) / 1000)
    test = np.where(epochs >= 6000, 10 * 10.0 ** (-(epochs - 6000) / 300), test)
    test = np.maximum(test, 1e-7)
    norm = np.where(epochs < 6000, 1000.0, np.where(epochs < 8000, 1000 - (epochs - 6000) * 0.3, 400.0))
    clean = phase_boundaries(epochs, test, norm)
    assert clean.memorisation_end == 1000 and clean.cleanup_end is not None
    # A slingshot-like spike at 11,000 (nanda run at 39.5k): the test loss jumps (above the
    # memorisation peak, above the grokked level, or only 1e5 above its floor, as the nanda
    # spike looks at checkpoint spacing) and falls back faster than it grokked; the norm
    # re-grows by half and then falls steeply, faster than in cleanup.
    spiked_test, spiked_norm = test.copy(), norm.copy()
    s = epochs >= 11_000
    spiked_test[s] = np.maximum(spike_loss * 10.0 ** (-(epochs[s] - 11_000) / 50), 1e-6)
    grow = (epochs >= 11_000) & (epochs < 11_300)
    spiked_norm[grow] = 400 + (epochs[grow] - 11_000) * 2 / 3
    fall = epochs >= 11_300
    spiked_norm[fall] = np.maximum(600 - (epochs[fall] - 11_300) * 1.5, 250.0)
    assert phase_boundaries(epochs, spiked_test, spiked_norm) == clean
    # Same boundaries as on the table cut before the spike.
    cut = epochs < 11_000
    assert phase_boundaries(epochs[cut], test[cut], norm[cut]) == clean


@pytest.mark.parametrize("overrides", [{}, {"train_biases": True, "act_fn": "gelu", "n_heads": 2}])
def test_grid_forward_matches_hooked_model(overrides: dict) -> None:
    p = 13
    cfg = preset("quick").replace(p=p, d_model=64, d_mlp=96, **overrides)
    models = []
    for seed in range(3):
        model = make_model(cfg.replace(seed=seed))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(0.1 * torch.randn(prm.shape, generator=g))
        models.append(model)
    tokens = make_task(cfg.task).tokens
    with torch.no_grad():
        logits, post = grid_forward(stack_state_dicts([m.state_dict() for m in models]), p, cfg.model.act_fn)
        for i, model in enumerate(models):
            ref, cache = model.run_with_cache(tokens)
            torch.testing.assert_close(logits[i], ref[:, -1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(post[i], cache["blocks.0.mlp.hook_post"][:, -1], rtol=1e-5, atol=1e-5)


def test_a_neuron_without_variance_has_no_frequency() -> None:
    # A dead neuron (always 0) and a constant one carry no frequency: their fractions were
    # rounding noise over rounding noise (1e19 in a hand-built network), which clustered them
    # and moved their norm between the circuits when the weights were rescaled.
    p = 13
    a = torch.arange(p).repeat_interleave(p).float()
    b = torch.arange(p).repeat(p).float()
    live = 1.0 + torch.cos(2 * torch.pi * 4 * (a + b) / p)
    acts = torch.stack([live, torch.zeros_like(live), torch.full_like(live, 2.0), 1e-3 * live], dim=1)
    fractions = neuron_frequency_fractions(acts, p)
    assert fractions[1].abs().max() == 0 and fractions[2].abs().max() == 0
    cluster, _ = neuron_clusters(fractions)
    assert cluster.tolist() == [4, -1, -1, 4]  # a small but varying neuron keeps its frequency
