"""The memorising / generalising split: exact additivity, and the reference networks.

Science claims on real training runs (Varma et al. 2023): a random-label network carries no
(a + b)-structured logits; a grokked network's logits lie almost entirely in the key-frequency
directions, and its generalising part has the larger logit margin per unit of norm.
"""

from __future__ import annotations

from pathlib import Path

import torch

import circuits
from circuits.grid import grid_forward, stack_state_dicts
from circuits.measures.circuits import (
    circuit_efficiency,
    circuit_norms_sq,
    logit_parts,
    part_logit_stats,
    sum_direction_share,
)
from circuits.measures.frequencies import key_frequencies, neuron_frequency_fractions
from circuits.measures.losses import project_sum_directions
from circuits.measures.norms import stacked_weight_norms_sq
from tests.conftest import tiny_config
from tests.handbuilt import fourier_network


def _grid(run_or_model, p: int, epoch: int | None = None):  # noqa: ANN001, ANN202
    sd = run_or_model.state_dict(epoch) if epoch is not None else run_or_model.state_dict()
    params = stack_state_dicts([sd])
    with torch.no_grad():
        logits, post = grid_forward(params, p)
    return params, logits, post


def test_parts_add_up_to_the_whole_logits_and_norms() -> None:
    torch.manual_seed(3)
    cfg = tiny_config(p=13)
    model = circuits.make_model(cfg)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.3 * torch.randn_like(prm))  # biases too: every parameter must be counted
    params, logits, post = _grid(model, 13)
    freqs = [2, 5]
    bias, gen, mem = logit_parts(logits, 13, freqs)
    torch.testing.assert_close(bias + gen + mem, logits.double(), rtol=0, atol=1e-5)
    fractions = neuron_frequency_fractions(post, 13)
    nkf = fractions[..., [k - 1 for k in freqs]].sum(-1)
    parts = circuit_norms_sq(params, 13, freqs, nkf)
    total = sum(stacked_weight_norms_sq(params).values())
    torch.testing.assert_close(sum(parts.values()), total, rtol=1e-5, atol=0)
    assert all((v > 0).all() for v in parts.values())
    # Margins are linear: the parts' margins add up to the network's.
    labels = circuits.make_task(cfg.task).labels
    idx = torch.arange(13 * 13)
    margins = [part_logit_stats(x.expand_as(logits.double()), labels, idx)[1] for x in (bias, gen, mem)]
    torch.testing.assert_close(sum(margins), part_logit_stats(logits.double(), labels, idx)[1])


def test_all_frequency_share_is_the_dependence_on_a_plus_b() -> None:
    # Logits that depend on (a, b) only through a + b have share 1 without any key set;
    # logits that depend on a - b have share 0.
    p = 11
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    table = torch.randn(p, 7, dtype=torch.float64)
    assert abs(sum_direction_share(table[(a + b) % p], p).item() - 1) < 1e-12
    assert sum_direction_share(table[(a - b) % p], p).item() < 1e-12
    # With every frequency listed, the explicit projection agrees.
    x = torch.randn(p * p, 7, dtype=torch.float64)
    every = list(range(1, (p - 1) // 2 + 1))
    assert abs(sum_direction_share(x, p).item() - sum_direction_share(x, p, every).item()) < 1e-12
    proj = project_sum_directions(x, p, every)
    assert abs(sum_direction_share(x, p).item() ** 2
               - proj.pow(2).sum().item() / (x - x.mean(0)).pow(2).sum().item()) < 1e-12


def test_handbuilt_fourier_network_is_all_generalising_circuit() -> None:
    p, freqs = 23, [3, 7]
    cfg, model = fourier_network(p, freqs)
    params, logits, post = _grid(model, p)
    # Its logits are Σ_k |cos(πk(a-b)/p)| cos(w_k(a+b-c)): the a-b envelope keeps ~10% of the
    # norm outside the a+b directions, but carries no margin on average.
    assert sum_direction_share(logits, p, freqs).item() > 0.85
    _, gen, mem = logit_parts(logits, p, freqs)
    labels = circuits.make_task(cfg.task).labels
    idx = torch.arange(p * p)
    _, gen_margin = part_logit_stats(gen, labels, idx)
    _, mem_margin = part_logit_stats(mem, labels, idx)
    assert gen_margin.item() > 0 and abs(mem_margin.item()) < 0.01 * gen_margin.item()


def test_random_label_network_has_no_generalising_share(tmp_path: Path) -> None:
    # Memorisation only (Varma et al.): uniform labels, symmetric in (a, b), learned to 100%.
    cfg = tiny_config(p=23, random_labels=True, frac=0.9, d_mlp=128, epochs=400,
                      checkpoint_every=400, log_every=50, weight_decay=0.1)
    run = circuits.train(cfg, out=tmp_path / "rand")
    assert run.metrics.train_acc.iloc[-1] == 1.0
    _, logits, _ = _grid(run, 23, run.epochs[-1])
    # Logits with no (a + b) structure put a share sqrt((p-1)/(p^2-1)) = 1/sqrt(p+1) of their
    # norm in the all-frequency span by chance (0.20 at p = 23, 0.094 at p = 113): the
    # memorising network sits at chance, far below a generalising one (> 0.9).
    chance = (1 / 24) ** 0.5
    assert sum_direction_share(logits, 23).item() < 1.3 * chance
    # With a key set S the chance share is sqrt(2|S| / (p^2 - 1)): 0.11 for three frequencies.
    assert sum_direction_share(logits, 23, [2, 5, 9]).item() < 1.3 * (6 / 528) ** 0.5


def test_grokked_quick_run_is_carried_by_the_generalising_circuit(quick_run: circuits.Run) -> None:
    p = quick_run.config.task.p
    params, logits, post = _grid(quick_run, p, quick_run.epochs[-1])
    fractions = neuron_frequency_fractions(post[0], p)
    key = key_frequencies(fractions)
    assert sum_direction_share(logits, p, key).item() > 0.9
    assert sum_direction_share(logits, p).item() > 0.9
    _, gen, mem = logit_parts(logits, p, key)
    train = quick_run.task.train_idx
    labels = quick_run.task.labels
    nkf = fractions[:, [k - 1 for k in key]].sum(-1)[None]
    norms = circuit_norms_sq(params, p, key, nkf)
    gen_eff = circuit_efficiency(part_logit_stats(gen, labels, train)[1], norms["gen_norm_sq"])
    mem_eff = circuit_efficiency(part_logit_stats(mem, labels, train)[1], norms["mem_norm_sq"])
    assert gen_eff.item() > 5 * mem_eff.item() > 0
