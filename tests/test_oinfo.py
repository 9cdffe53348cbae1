"""O-information (issue 23, item 1; Clauw et al. 2024): the Gaussian-copula estimator against
closed forms, redundancy and synergy on constructed variables, Ward grouping, and the analysis
family against its one-call functions. The comparison with ``hoi`` (which pulls in JAX) is
opt-in: ``CIRCUITS_HOI=1`` with ``hoi`` installed (science.md Decisions)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import circuits
from circuits.analysis import analyze
from circuits.grid import grid_forward, stack_state_dicts
from circuits.measures.oinfo import (
    copula_normalise,
    gaussian_entropy,
    multiplet_o_information,
    o_information,
    subset_entropies,
    ward_groups,
)
from tests.conftest import tiny_config

F64 = torch.float64


def _closed_form(cov: torch.Tensor, groups: list[list[int]]) -> float:
    """Omega of a Gaussian from its covariance: H(S) = 1/2 log2((2 pi e)^d det cov_S)."""

    def h(cols: list[int]) -> float:
        sub = cov[cols][:, cols]
        return 0.5 * (len(cols) * math.log(2 * math.pi * math.e) + float(torch.logdet(sub))) / math.log(2)

    every = [c for g in groups for c in g]
    n = len(groups)
    rest = sum(h([c for j, g in enumerate(groups) if j != i for c in g]) for i in range(n))
    return (n - 2) * h(every) + sum(h(g) for g in groups) - rest


def _sample(cov: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cov.shape[0], generator=gen, dtype=F64)
    return z @ torch.linalg.cholesky(cov).T


def test_gaussian_entropy_is_the_closed_form_and_the_bias_correction_vanishes_with_samples() -> None:
    cov = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=F64)
    exact = 0.5 * (2 * math.log(2 * math.pi * math.e) + math.log(2.0 * 0.5 - 0.09)) / math.log(2)
    assert gaussian_entropy(cov, bias_correct=False) == pytest.approx(exact, abs=1e-12)
    small, large = gaussian_entropy(cov, 20), gaussian_entropy(cov, 10**6)
    assert small > exact and large == pytest.approx(exact, abs=1e-4)  # small samples underestimate H
    with pytest.raises(ValueError, match="number of samples"):
        gaussian_entropy(cov)


def test_o_information_of_a_known_gaussian_matches_its_closed_form() -> None:
    # Three scalar variables and a grouping of five into three multivariate variables.
    a = torch.tensor([[1.0, 0.6, 0.2, 0.1, 0.0], [0.0, 1.0, 0.5, 0.0, 0.3], [0.0, 0.0, 1.0, 0.4, 0.2],
                      [0.0, 0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=F64)
    cov = a.T @ a + 0.2 * torch.eye(5, dtype=F64)
    x = _sample(cov, 40_000)
    for groups in ([[0], [1], [2]], [[0, 1], [2], [3, 4]], [[0], [1], [2], [3], [4]]):
        sub = [c for g in groups for c in g]
        local = [[sub.index(c) for c in g] for g in groups]
        exact = _closed_form(cov[sub][:, sub], local)
        assert o_information(x[:, sub], local) == pytest.approx(exact, abs=0.02), groups


def test_copies_are_redundant_and_a_sum_is_synergistic() -> None:
    gen = torch.Generator().manual_seed(3)
    y, noise = torch.randn(5000, 1, generator=gen, dtype=F64), torch.randn(5000, 3, generator=gen, dtype=F64)
    copies = y + 0.2 * noise
    assert o_information(copies) > 1.0
    x1, x2 = noise[:, :1], noise[:, 1:2]
    summed = torch.cat([x1, x2, x1 + x2 + 0.1 * noise[:, 2:]], 1)  # the Gaussian XOR: X3 needs both
    assert o_information(summed) < -1.0
    # Pairs have no O-information; independent variables none either.
    assert o_information(copies[:, :2]) == pytest.approx(0.0, abs=1e-12)
    assert o_information(torch.randn(5000, 4, generator=gen, dtype=F64)) == pytest.approx(0.0, abs=0.02)


def test_ties_are_broken_per_neuron_so_dead_neurons_add_nothing() -> None:
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(4000, 1, generator=gen, dtype=F64)
    live = (y + 0.3 * torch.randn(4000, 3, generator=gen, dtype=F64)).relu()  # half zeros, like ReLUs
    base = o_information(live)
    dead = torch.cat([live, torch.zeros(4000, 2, dtype=F64)], 1)
    groups = [[0, 3], [1, 4], [2]]  # two groups gain a dead neuron each
    assert o_information(dead, groups) == pytest.approx(base, abs=0.02)
    # With ties in sample order (hoi's convention), two dead neurons are one variable twice.
    cov = (lambda z: z.T @ z / (len(z) - 1))(copula_normalise(dead, seed=None))
    assert torch.isnan(subset_entropies(cov, [[3, 4]], 4000)[1])
    # The normalised columns are standard normal ranks: every column the same values, reordered.
    z = copula_normalise(dead)
    assert torch.allclose(z.sort(0).values, z[:, :1].sort(0).values.expand_as(z))


def test_multiplets_are_searched_from_subset_entropies() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 6, generator=gen, dtype=F64)
    x[:, 3] = x[:, 0] + x[:, 1] + 0.1 * x[:, 3]
    z = copula_normalise(x)
    groups = [[0], [1], [2, 4], [3], [5]]
    ent = subset_entropies(z.T @ z / 2999, groups, 3000)
    omega = multiplet_o_information(ent, 5)
    assert torch.isnan(omega[[0, 1, 2, 4, 8, 16]]).all()
    for mask in (0b00011, 0b01011, 0b11111, 0b10110):
        members = [groups[g] for g in range(5) if mask >> g & 1]
        cols = [c for g in members for c in g]
        local = [[cols.index(c) for c in g] for g in members]
        assert omega[mask].item() == pytest.approx(o_information(x[:, cols], local), abs=1e-9)
    # The synergistic triple {0, 1, 3} holds the synergy (an independent group added to it
    # changes Omega by noise only).
    best = int(torch.nan_to_num(omega, nan=1e9).argmin())
    assert best & 0b01011 == 0b01011 and omega[0b01011].item() == pytest.approx(omega[best].item(), abs=0.01)
    # Too many dimensions for the samples: NaN, not a number from a singular covariance.
    assert torch.isnan(subset_entropies(torch.eye(6, dtype=F64), [[0, 1, 2], [3, 4, 5]], 6)[3])


def test_ward_groups_recover_separated_clusters_with_canonical_labels() -> None:
    gen = torch.Generator().manual_seed(6)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=F64)
    which = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1, 1])
    pts = centres[which] + 0.3 * torch.randn(10, 2, generator=gen, dtype=F64)
    groups = ward_groups(pts.T, 3)  # columns are the points (neurons)
    assert groups.tolist() == [0, 1, 2, 2, 0, 1, 1, 0, 2, 2]
    assert ward_groups(pts.T, 10).tolist() == list(range(10))
    assert ward_groups(pts.T, 1).tolist() == [0] * 10
    with pytest.raises(ValueError, match="into 11 groups"):
        ward_groups(pts.T, 11)


def test_the_oinfo_family_equals_its_functions_every_kth_checkpoint(quick_run: circuits.Run, tmp_path: Path) -> None:
    run, k, every = quick_run, 4, 20
    a = analyze(run, out=tmp_path / "a", measures=["oinfo"], options={"oinfo.every": every, "oinfo.groups": k})
    n = len(run.epochs)
    done = [i for i in range(n) if i % every == 0]
    assert np.isnan(a.measures.oinfo_synergy.to_numpy()[[i for i in range(n) if i % every]]).all()
    task = run.task
    _, post = grid_forward(stack_state_dicts([run.state_dict(run.epochs[-1])]), task, "relu")
    groups = ward_groups(post[0][task.train_idx], k)
    assert a.arrays["oinfo_groups"][0].tolist() == groups.tolist()
    members = [torch.nonzero(groups == g).squeeze(1).tolist() for g in range(k)]
    for i in (done[0], done[-1]):
        _, post = grid_forward(stack_state_dicts([run.state_dict(run.epochs[i])]), task, "relu")
        acts = post[0][task.train_idx]
        z = copula_normalise(acts.double(), seed=1)
        omega = multiplet_o_information(subset_entropies(z.T @ z / (len(z) - 1), members, len(z)), k)
        # The analysis's blockwise forward equals this one to float32 rounding, which can swap the
        # ranks of nearly equal activations: equal to 1e-3 bits.
        got = a.arrays["oinfo"][i]
        torch.testing.assert_close(got, omega, rtol=1e-3, atol=1e-3, equal_nan=True)
        row = a.measures.iloc[i]
        assert row.oinfo_synergy == float(np.nanmin(got.numpy()))
        assert row.oinfo_redundancy == float(np.nanmax(got.numpy()))
        assert 2 <= row.oinfo_synergy_size <= k and row.oinfo_synergy <= 0.0 <= row.oinfo_redundancy
        assert o_information(acts, members, seed=1) == pytest.approx(float(omega[-1]), abs=1e-6)
    # Too few training inputs for the neurons' covariance: skipped with the reason.
    from circuits.measures.registry import applicable, select

    _, skipped = applicable(select(["oinfo"]), tiny_config())
    assert "more training inputs than neurons" in skipped["oinfo"]


@pytest.mark.skipif(os.environ.get("CIRCUITS_HOI") != "1", reason="compares with hoi (JAX); enable with CIRCUITS_HOI=1")
def test_the_estimator_matches_hoi_on_random_data() -> None:
    from hoi.metrics import Oinfo

    gen = torch.Generator().manual_seed(7)
    mix = torch.randn(5, 5, generator=gen, dtype=F64)
    x = torch.randn(2000, 5, generator=gen, dtype=F64) @ mix
    x[:, 4] = x[:, 0] * x[:, 1] + 0.5 * x[:, 4]  # something not Gaussian, so the copula matters
    ref = np.asarray(Oinfo(x.numpy()).fit(minsize=5, maxsize=5, method="gc")).ravel()[0]
    assert o_information(x, seed=None) == pytest.approx(float(ref), rel=1e-3, abs=1e-3)
    three = np.asarray(Oinfo(x[:, [0, 2, 4]].numpy()).fit(minsize=3, maxsize=3, method="gc")).ravel()[0]
    assert o_information(x[:, [0, 2, 4]], seed=None) == pytest.approx(float(three), rel=1e-3, abs=1e-3)
