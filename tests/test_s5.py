"""The S5 tasks (issue 22, item 1): the tables have the group's properties, and a run on them
trains, analyses with the non-Fourier measures and says why the Fourier ones are skipped."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import circuits
from circuits.config import preset
from circuits.tasks import make_task
from tests.conftest import run_cli, tiny_config

PERMS = list(itertools.permutations(range(5)))
INDEX = {p: i for i, p in enumerate(PERMS)}


def mul(x: tuple, y: tuple) -> tuple:
    """Power et al.'s product (openai/grok: c = b[a] on numpy arrays): first x, then y."""
    return tuple(y[x[i]] for i in range(5))


def inv(x: tuple) -> tuple:
    out = [0] * 5
    for i, v in enumerate(x):
        out[v] = i
    return tuple(out)


def cycle_type(x: tuple) -> tuple:
    seen, lengths = set(), []
    for start in range(5):
        if start in seen:
            continue
        n, i = 0, start
        while i not in seen:
            seen.add(i)
            i, n = x[i], n + 1
        lengths.append(n)
    return tuple(sorted(lengths))


@pytest.mark.parametrize("op, formula", [
    ("s5", lambda x, y: mul(x, y)),
    ("s5conj", lambda x, y: mul(mul(x, y), inv(x))),
    ("s5aba", lambda x, y: mul(mul(x, y), x)),
])
def test_the_s5_tables_are_the_group_products(op: str, formula) -> None:  # noqa: ANN001
    cfg = preset("quick").replace(op=op)
    task = make_task(cfg.task)
    assert task.n_elements == 120 and task.n_classes == 120 and task.n_tokens == 121 and task.eq_token == 120
    assert task.tokens.shape == (14400, 3) and bool(task.valid.all())
    labels = task.labels.view(120, 120)
    for a, b in itertools.product(range(0, 120, 7), range(0, 120, 5)):
        assert int(labels[a, b]) == INDEX[formula(PERMS[a], PERMS[b])], (a, b)
    assert len(task.train_idx) == int(cfg.task.frac * 14400) and not task.has_fourier


def test_the_s5_product_is_a_group() -> None:
    table = make_task(preset("quick").replace(op="s5").task).labels.view(120, 120)
    e = INDEX[tuple(range(5))]
    assert e == 0 and torch.equal(table[e], torch.arange(120)) and torch.equal(table[:, e], torch.arange(120))
    # Every row and column is a permutation of the elements (a Latin square), so inverses exist.
    assert all(sorted(table[a].tolist()) == list(range(120)) for a in range(120))
    assert all(sorted(table[:, b].tolist()) == list(range(120)) for b in range(120))
    for a in range(120):
        assert int(table[a, INDEX[inv(PERMS[a])]]) == e
    # Associative: (a b) c = a (b c), over the whole table at once.
    ab_c = table[table[:, :, None], torch.arange(120)[None, None, :]]
    a_bc = table[torch.arange(120)[:, None, None], table[None, :, :]]
    assert torch.equal(ab_c, a_bc)
    assert not torch.equal(table, table.T)  # S5 is not abelian
    conj = make_task(preset("quick").replace(op="s5conj").task).labels.view(120, 120)
    for a, b in itertools.product(range(0, 120, 11), range(120)):  # conjugation keeps the cycle type
        assert cycle_type(PERMS[int(conj[a, b])]) == cycle_type(PERMS[b])


def test_a_run_on_s5_trains_and_analyses(tmp_path: Path) -> None:
    cfg = tiny_config(op="s5", frac=0.5, epochs=20)
    run = circuits.train(cfg, out=tmp_path / "s5")
    assert run.model(-1).cfg.d_vocab == 121 and run.model(-1).cfg.d_vocab_out == 120
    assert run.metrics.train_acc.iloc[-1] > run.metrics.train_acc.iloc[0]
    analysis = circuits.analyze(run, out=tmp_path / "a")
    assert {"train_loss", "test_loss", "weight_norm_sq"} <= set(analysis.measures.columns)
    assert "restricted_loss" not in analysis.measures.columns
    skipped = analysis.summary["skipped_measures"]
    assert set(skipped) >= {"fourier_losses", "sparsity", "key_share", "neurons", "circuits"}
    assert all("not abelian" in reason for reason in skipped.values())
    out = run_cli("analyze", str(run.path), "--out", str(tmp_path / "cli"))
    assert out.returncode == 0, out.stderr
    assert "not abelian" in out.stdout + out.stderr
    page = (tmp_path / "cli" / "dashboard.html").read_text()
    assert "test_loss" in page or "Test loss" in page or "test loss" in page
