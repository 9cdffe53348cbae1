"""The local learning coefficient (issue 23, item 3): known answers on regular models, the
ordering by effective parameter count, and the opt-in ``llc`` family on the tiny run.

A regular model at its minimum has λ = d/2. For a linear regression with the Gaussian loss
L(w) = mean ½(y − wᵀx)², L − L(w*) = ½ ΔᵀHΔ exactly, so the SGLD chain is a discretised
Ornstein-Uhlenbeck process whose stationary expectation is known in closed form, step size
and localisation included: along an eigenvector of H with eigenvalue h, with a = nβh + γ and
step ε, the variance is 1 / (a (1 − εa/4)), and λ̂ = Σ nβh / (2a (1 − εa/4)), which tends to
d/2 as ε, γ → 0. The tests compare with both.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import circuits
from circuits.analysis import analyze
from circuits.cli import main as cli_main
from circuits.measures import estimate_llc, measure
from circuits.measures.llc import calibrate_llc
from circuits.measures.registry import select

try:
    import devinterp  # noqa: F401

    HAVE_DEVINTERP = True
except ImportError:
    HAVE_DEVINTERP = False

# design.md: a test needing an extra skips only outside CI (CI installs every extra with tests).
needs_devinterp = pytest.mark.skipif(
    not HAVE_DEVINTERP and not os.environ.get("CI"), reason="needs the llc extra: pip install -e '.[llc]'"
)

N = 1000
LR, GAMMA = 2e-3, 1.0  # ε·a ≈ 0.3 at nβ = n / log n: fast mixing, 7% above d/2 from the step size
SAMPLER = dict(lr=LR, localization=GAMMA, chains=4, draws=1500, burn_in=100)


def half_squared_error(out: Tensor, y: Tensor) -> Tensor:
    """The Gaussian negative log-likelihood (σ = 1) up to a constant: a regular model's loss."""
    return 0.5 * (out.squeeze(-1) - y) ** 2


class SumOfTwo(nn.Module):
    """y = (a + b)ᵀx: 2d parameters, d effective (the loss is flat along a − b)."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(w / 2)
        self.b = nn.Parameter(w / 2)

    def forward(self, x: Tensor) -> Tensor:
        return x @ (self.a + self.b)


def regression(d: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded data set (x ~ N(0, I), y = xᵀw₀ + noise) and its exact least-squares minimum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(N, generator=g, dtype=torch.float64)
    w = torch.linalg.lstsq(x, y[:, None]).solution.squeeze(1)
    return x, y, w


def linear_at_minimum(d: int) -> tuple[nn.Module, Tensor, Tensor, float]:
    """A bias-free linear model at its least-squares minimum, its data, and the closed-form
    stationary λ̂ of the discretised chain (module docstring)."""
    x, y, w = regression(d)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    nbeta = N / math.log(N)
    a = nbeta * torch.linalg.eigvalsh(x.T @ x / N) + GAMMA
    exact = float(((a - GAMMA) / (2 * a * (1 - LR * a / 4))).sum())
    return model, x, y, exact


@needs_devinterp
def test_a_regular_model_has_half_its_parameter_count_and_fewer_parameters_give_less() -> None:
    estimates = {}
    for d in (2, 8):
        model, x, y, exact = linear_at_minimum(d)
        est = estimate_llc(model, x, y, loss_fn=half_squared_error, **SAMPLER)
        assert est.nbeta == pytest.approx(N / math.log(N))
        assert not est.diverged.any() and est.per_chain.shape == (4,)
        # Tolerances: over seeds 1-5 the mean was within 6% (d = 2) and 2.1% (d = 8) of the exact value.
        assert est.mean == pytest.approx(exact, rel=0.12), d
        assert est.mean == pytest.approx(d / 2, rel=0.2), d
        assert est.std < 0.25 * est.mean
        estimates[d] = est.mean
    assert estimates[2] < estimates[8]


@needs_devinterp
def test_a_degenerate_parametrisation_counts_only_its_effective_parameters() -> None:
    # Eight parameters either way: the regular model's λ is 8/2, the redundant one's 4/2.
    x, y, w = regression(4)
    redundant = SumOfTwo(w)
    regular, x8, y8, _ = linear_at_minimum(8)
    lam_redundant = estimate_llc(redundant, x, y, loss_fn=half_squared_error, **SAMPLER).mean
    lam_regular = estimate_llc(regular, x8, y8, loss_fn=half_squared_error, **SAMPLER).mean
    assert lam_redundant == pytest.approx(2.0, rel=0.2)
    assert lam_regular == pytest.approx(4.0, rel=0.2)
    assert lam_redundant < lam_regular


@needs_devinterp
def test_the_estimate_is_seeded_leaves_the_model_and_global_rng_alone_and_refuses_bad_settings() -> None:
    model, x, y, _ = linear_at_minimum(2)
    before = model.weight.detach().clone()
    rng = torch.get_rng_state()
    kw = dict(lr=LR, localization=GAMMA, chains=3, draws=100, burn_in=10, batch_size=100, loss_fn=half_squared_error)
    one, two = estimate_llc(model, x, y, **kw), estimate_llc(model, x, y, **kw)
    assert torch.equal(one.per_chain, two.per_chain) and torch.equal(one.loss_trace, two.loss_trace)
    assert not torch.equal(one.per_chain, estimate_llc(model, x, y, seed=2, **kw).per_chain)
    # A chain's draws do not depend on how many chains run beside it.
    assert torch.equal(estimate_llc(model, x, y, **{**kw, "chains": 1}).per_chain, one.per_chain[:1])
    assert torch.equal(model.weight, before) and torch.equal(torch.get_rng_state(), rng)
    assert one.loss_trace.shape == (3, 110) and one.loss_trace.dtype == torch.float64
    assert one.mean == pytest.approx(float(one.per_chain.mean()))
    # Full-batch steps: every chain's first loss is L_n(w*), the float64 loss at the minimum.
    full = estimate_llc(model, x, y, **{**kw, "batch_size": None, "draws": 5, "burn_in": 0})
    direct = float(half_squared_error(model(x), y).mean().detach())
    assert full.init_loss == pytest.approx(direct, rel=1e-12)
    assert full.loss_trace[:, 0].tolist() == pytest.approx([direct] * 3, rel=1e-12)
    for bad, why in (({"chains": 0}, "chains must be an integer >= 1"), ({"draws": 0}, "draws"),
                     ({"lr": 0.0}, "lr"), ({"localization": -1.0}, "localization"), ({"nbeta": -2.0}, "nbeta"),
                     ({"batch_size": 0}, "batch_size"), ({"burn_in": -1}, "burn_in")):
        with pytest.raises(ValueError, match=why):
            estimate_llc(model, x, y, **{**kw, **bad})


@needs_devinterp
def test_a_diverging_step_size_gives_nan_and_a_warning_and_the_calibration_flags_it() -> None:
    model, x, y, _ = linear_at_minimum(2)
    with pytest.warns(RuntimeWarning, match="diverged"):
        est = estimate_llc(model, x, y, lr=10.0, localization=GAMMA, chains=2, draws=100, burn_in=10,
                           loss_fn=half_squared_error)
    assert est.diverged.all() and math.isnan(est.mean)
    table = calibrate_llc(model, x, y, lrs=(10.0, LR), localizations=(GAMMA,), chains=2, draws=400, burn_in=100,
                          loss_fn=half_squared_error)
    assert list(table.lr) == [10.0, LR]
    bad, good = table.iloc[0], table.iloc[1]
    assert bad.diverged == 2 and not bad.ok
    assert good.diverged == 0 and good.ok and good.llc_mean == pytest.approx(1.0, rel=0.25)
    assert good.trace.shape == (2, 500) and abs(good.burn_in_rise) < 0.5


def test_without_devinterp_the_module_imports_and_sampling_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tiny_run: circuits.Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry in sys.modules makes `import devinterp` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "devinterp", None)
    monkeypatch.setitem(sys.modules, "devinterp.optim", None)
    import circuits.measures.llc as llc

    model, x, y, _ = linear_at_minimum(2)
    with pytest.raises(ImportError, match=r"pip install 'grokking-circuits\[llc\]'"):
        llc.estimate_llc(model, x, y, lr=LR, localization=GAMMA)
    # The CLI says it in one line, exit 2, before any checkpoint is sampled.
    assert cli_main(["analyze", str(tiny_run.path), "--out", str(tmp_path / "a"), "--measures", "losses,llc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "devinterp" in err[0] and ".[llc]" in err[0]
    assert not (tmp_path / "a").exists()


LENS = {"llc.every": 2, "llc.chains": 2, "llc.draws": 30, "llc.burn_in": 10, "llc.lr": 1e-4,
        "llc.localization": 100.0, "llc.batch_size": 32}


@needs_devinterp
def test_the_llc_family_on_the_tiny_run_samples_every_kth_checkpoint_repeatably(
    tiny_run: circuits.Run, tmp_path: Path
) -> None:
    a = analyze(tiny_run, out=tmp_path / "a", measures=["llc"], options=LENS)
    n = len(tiny_run.epochs)
    m = a.measures
    for i in range(n):
        if i % 2 == 0:
            assert math.isfinite(m.llc_mean[i]) and math.isfinite(m.llc_std[i]), i
            assert torch.isfinite(a.arrays["llc_chains"][i]).all()
        else:
            assert math.isnan(m.llc_mean[i]) and math.isnan(m.llc_std[i]), i
            assert torch.isnan(a.arrays["llc_loss_trace"][i]).all()
    assert a.arrays["llc_chains"].shape == (n, 2) and a.arrays["llc_loss_trace"].shape == (n, 2, 40)
    assert a.summary["measure_options"]["llc"]["every"] == 2 and "llc" in a.summary["measures"]
    # Seeded: a second analysis (elsewhere, so nothing is reused; every 4th checkpoint, to
    # sample fewer) gives the same numbers where both sample.
    b = analyze(tiny_run, out=tmp_path / "b", measures=["llc"], options={**LENS, "llc.every": 4})
    both = [i for i in range(n) if i % 4 == 0]
    assert b.measures.llc_mean[both].tolist() == m.llc_mean[both].tolist()
    assert b.measures.llc_std[both].tolist() == m.llc_std[both].tolist()
    assert torch.equal(b.arrays["llc_loss_trace"][both], a.arrays["llc_loss_trace"][both])
    assert b.measures.llc_mean[[i for i in range(n) if i % 4]].isna().all()
    # The one-call measure of a notebook gives the analysis row.
    i = 2
    one = measure(tiny_run.model(tiny_run.epochs[i]), tiny_run.task, tiny_run.config, measures=["llc"],
                  options={k: v for k, v in LENS.items() if k != "llc.every"})
    assert set(one) == {"llc_mean", "llc_std"}
    assert one["llc_mean"] == pytest.approx(m.llc_mean[i], rel=1e-12)
    assert one["llc_std"] == pytest.approx(m.llc_std[i], rel=1e-12)
    # Not in the default selection; bad settings refused before anything is written.
    assert "llc" not in [f.name for f in select()] and "llc" in [f.name for f in select(["all"])]
    for bad, why in ((["llc.chains=0"], "positive integer"), (["llc.lr=-1"], "positive number"),
                     (["llc.gamma=1"], "no option 'gamma'.*llc.localization"),
                     (["llc.seed=-1"], "non-negative integer"), (["llc.burn_in=-5"], "non-negative integer")):
        with pytest.raises(ValueError, match=why):
            analyze(tiny_run, out=tmp_path / "bad", measures=["llc"], options=bad)
    assert not (tmp_path / "bad").exists()
    # A seed, a burn-in and nβ (0: n / log n) may be 0, from the command line too.
    from circuits.measures.registry import parse_options

    assert parse_options(["llc.seed=0", "llc.burn_in=0", "llc.nbeta=0"]) == {"llc": {"seed": 0, "burn_in": 0, "nbeta": 0.0}}
    assert parse_options(["oinfo.seed=0"]) == {"oinfo": {"seed": 0}}
