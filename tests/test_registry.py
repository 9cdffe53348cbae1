"""The measure registry (issue 18): a measure family defined in this test module is picked up by
analyze(), measures.csv, the measure selector, the column docs, the CLI and the dashboard with
no other edit; a subset of families is computed alone; a family that does not apply is skipped
with its reason; the one-call measure equals the analysis row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import circuits
from circuits.analysis import MEASURE_COLUMNS, analyze, load_analysis
from circuits.cli import main as cli_main
from circuits.measures import ArraySpec, Column, Family, Result, measure, register, unregister
from circuits.measures.registry import Block, Checkpoints, select
from circuits.report import report
from circuits.store import DASHBOARD_FILE


class MaxLogit(Family):
    """Mean over the grid of each input's largest logit, accumulated blockwise, and the
    embedding's squared norm per token as an array."""

    name = "test_max_logit"
    doc = "a test family: the mean largest logit"
    columns = (Column("mean_max_logit", "mean over all p² inputs of the largest logit", "logit"),)
    arrays = (ArraySpec("embed_row_sq", "float64 [ckpt, d_vocab]: squared norm of each W_E row"),)
    needs = frozenset({"logits"})

    def start(self, ckpts: Checkpoints) -> dict[str, torch.Tensor]:
        return {"sum": torch.zeros(ckpts.n_ckpt, dtype=torch.float64), "n": torch.zeros(())}

    def add(self, state: dict[str, torch.Tensor], ckpts: Checkpoints, block: Block) -> None:
        state["sum"] += block.x64.amax(-1).sum(-1)
        state["n"] += block.x64.shape[1]

    def finish(self, state: dict[str, torch.Tensor], ckpts: Checkpoints) -> Result:
        rows = ckpts.params["embed.W_E"].double().pow(2).sum(-1)
        return Result(columns={"mean_max_logit": state["sum"] / state["n"]}, arrays={"embed_row_sq": rows})


class NeverApplies(Family):
    name = "test_never"
    columns = (Column("never", "a family for no task"),)

    def applies(self, config: circuits.RunConfig) -> str | None:
        return f"it needs a task other than {config.task.op} mod {config.task.p}"

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        raise AssertionError("a family that does not apply is never computed")


class EveryKth(Family):
    """An opt-in family with settings: the stack's checkpoint positions where ``every`` divides
    them (NaN elsewhere), scaled by ``gain``; and the reference checkpoint's W_E norm."""

    name = "test_every"
    doc = "a test lens: opt-in, with settings"
    default = False
    options = {"every": 1, "gain": 1.0}
    columns = (Column("every_pos", "the checkpoint's position times gain where every divides it"),
               Column("every_ref", "the reference checkpoint's squared W_E norm"))

    def finish(self, state: None, ckpts: Checkpoints) -> Result:
        every, gain = ckpts.option(self, "every"), ckpts.option(self, "gain")
        pos = torch.tensor(ckpts.positions, dtype=torch.float64)
        col = torch.where(pos % every == 0, pos * gain, torch.full_like(pos, float("nan")))
        ref = ckpts.reference["embed.W_E"].double().pow(2).sum()
        return Result(columns={"every_pos": col, "every_ref": ref.expand(ckpts.n_ckpt).clone()})


@pytest.fixture()
def registered() -> Iterator[None]:
    register(MaxLogit)
    register(NeverApplies)
    register(EveryKth)
    yield
    unregister(MaxLogit.name)
    unregister(NeverApplies.name)
    unregister(EveryKth.name)


def _direct(run: circuits.Run, epoch: int) -> float:
    model = run.model(epoch)
    with torch.no_grad():
        logits = model(run.task.tokens)[:, -1].double()
    return float(logits.amax(-1).mean())


def test_a_family_registered_here_is_analysed_documented_and_drawn(
    registered: None, tiny_run: circuits.Run, tmp_path: Path
) -> None:
    result = report(tiny_run, out=tmp_path / "a", key_freqs=[1])
    m = result.measures
    assert "mean_max_logit" in m.columns and set(MEASURE_COLUMNS) <= set(m.columns)
    for e in tiny_run.epochs[:: max(1, len(tiny_run.epochs) // 4)]:
        row = m[m.epoch == e].iloc[0]
        assert row.mean_max_logit == pytest.approx(_direct(tiny_run, e), rel=1e-5)
    W_E = torch.stack([tiny_run.state_dict(e)["embed.W_E"] for e in tiny_run.epochs]).double()
    assert torch.allclose(result.arrays["embed_row_sq"], W_E.pow(2).sum(-1))
    s = result.summary
    assert s["columns"]["mean_max_logit"] == {"doc": MaxLogit.columns[0].doc, "unit": "logit",
                                              "family": "test_max_logit"}
    assert s["arrays"]["embed_row_sq"] == MaxLogit.arrays[0].doc
    assert "test_max_logit" in s["measures"]
    p = tiny_run.config.task.p
    assert s["skipped_measures"] == {"test_never": f"it needs a task other than add mod {p}"}
    assert "never" not in m.columns
    # Read back, and drawn as its own panel on the dashboard.
    assert load_analysis(result.path).measures.mean_max_logit.tolist() == m.mean_max_logit.tolist()
    page = (result.path / DASHBOARD_FILE).read_text()
    assert 'data-panel="family:test_max_logit"' in page


def test_a_subset_of_families_is_computed_alone_and_reused(
    registered: None, tiny_run: circuits.Run, tmp_path: Path
) -> None:
    out = tmp_path / "sub"
    only = analyze(tiny_run, out=out, measures=["test_max_logit"])
    assert list(only.measures.columns) == ["epoch", "mean_max_logit"]
    assert set(only.arrays) == {"epochs", "embed_row_sq"}
    assert only.summary["phases"] is None and "losses" in only.summary["phases_refused"]
    whole = analyze(tiny_run, out=tmp_path / "whole", key_freqs=only.key_frequencies)
    assert only.measures.mean_max_logit.tolist() == whole.measures.mean_max_logit.tolist()
    # The same selection again reuses every row; another selection recomputes them.
    again = analyze(tiny_run, out=out, measures=["test_max_logit"])
    assert again.measures.equals(only.measures)
    wider = analyze(tiny_run, out=out, measures=["test_max_logit", "losses"])
    assert {"train_loss", "mean_max_logit"} <= set(wider.measures.columns)
    assert load_analysis(out).summary["measures"] == ["losses", "test_max_logit"]


def test_select_orders_dependencies_and_refuses_unknown_names(registered: None) -> None:
    names = [f.name for f in select(["circuits"])]
    assert names.index("logit_sums") < names.index("circuits")
    assert names.index("neurons") < names.index("circuits")
    with pytest.raises(ValueError, match="no measure family 'nope'.*test_max_logit"):
        select(["nope"])


def test_the_cli_selects_and_lists_families(
    registered: None, tiny_run: circuits.Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["analyze", "--list-measures"]) == 0
    listed = capsys.readouterr().out
    assert "test_max_logit" in listed and "circuits" in listed and "logit_sums" not in listed
    out = tmp_path / "cli"
    assert cli_main(["analyze", str(tiny_run.path), "--out", str(out), "--measures", "test_max_logit,losses"]) == 0
    assert load_analysis(out).summary["measures"] == ["losses", "test_max_logit"]
    capsys.readouterr()
    assert cli_main(["analyze", str(tiny_run.path), "--out", str(out), "--measures", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no measure family 'nope'" in err[0]


def test_the_one_call_measure_is_the_analysis_row(tiny_run: circuits.Run, tmp_path: Path) -> None:
    result = analyze(tiny_run, out=tmp_path / "a", key_freqs=[1, 2])
    epoch = tiny_run.epochs[-1]
    row = result.measures[result.measures.epoch == epoch].iloc[0]
    one = measure(tiny_run.model(epoch), tiny_run.task, tiny_run.config, key_freqs=[1, 2], init=tiny_run.model(0))
    assert set(one) == set(result.measures.columns) - {"epoch"}
    for name, value in one.items():
        assert value == pytest.approx(float(row[name]), rel=1e-6, abs=1e-9), name
    losses = measure(tiny_run.model(epoch), tiny_run.task, tiny_run.config, measures=["losses"])
    assert set(losses) == {"train_loss", "test_loss", "train_acc", "test_acc"}


def test_a_two_layer_run_gets_its_losses_from_its_own_forward_and_no_grid_measures(tmp_path: Path) -> None:
    # The grid forward reads one layer: a deeper model's Fourier and circuit columns would be
    # wrong numbers, so they are skipped with the reason. Its losses come from the model's own
    # forward over the task's inputs (the same numbers training logged), so its phases can be
    # read; the norms apply as to every model.
    from tests.conftest import tiny_config

    run = circuits.train(tiny_config(engine="reference", n_layers=2, epochs=20), out=tmp_path / "deep")
    result = analyze(run, out=tmp_path / "a")
    cols = [c for c in result.measures.columns if not c.startswith("norm_sq.")]
    assert cols == ["epoch", "train_loss", "test_loss", "train_acc", "test_acc", "weight_norm_sq"]
    skipped = result.summary["skipped_measures"]
    assert set(skipped) == {"fourier_losses", "sparsity", "key_share", "neurons", "circuits"}
    assert all("n_layers = 2" in reason for reason in skipped.values())
    logged = run.metrics.set_index("epoch")
    for _, row in result.measures.iterrows():
        if row.epoch in logged.index:
            for col in ("train_loss", "test_loss", "train_acc", "test_acc"):
                assert row[col] == pytest.approx(logged.loc[row.epoch, col], rel=1e-6, abs=1e-9)
    direct = sum(v.double().pow(2).sum() for v in run.state_dict(run.epochs[-1]).values())
    assert result.measures.weight_norm_sq.iloc[-1] == pytest.approx(float(direct), rel=1e-12)


def test_an_opt_in_lens_is_computed_only_when_named_with_its_settings_recorded(
    registered: None, tiny_run: circuits.Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "test_every" not in [f.name for f in select()]
    assert "test_every" in [f.name for f in select(["all"])]
    assert {f.name for f in select(["default", "test_every"])} == {f.name for f in select()} | {"test_every"}
    out = tmp_path / "lens"
    plain = analyze(tiny_run, out=out, measures=["losses"])
    assert "every_pos" not in plain.measures
    a = analyze(tiny_run, out=out, measures=["losses", "test_every"], options={"test_every.every": 3})
    n = len(tiny_run.epochs)
    want = [float(i) if i % 3 == 0 else None for i in range(n)]
    got = [None if v != v else v for v in a.measures.every_pos.tolist()]
    assert got == want  # positions among the run's checkpoints, across batches of 2
    newest = tiny_run.state_dict(tiny_run.epochs[-1])["embed.W_E"].double().pow(2).sum()
    assert a.measures.every_ref.tolist() == pytest.approx([float(newest)] * n)
    assert a.summary["measure_options"] == {"test_every": {"every": 3, "gain": 1.0}}
    # The same settings reuse the rows; other settings recompute them.
    assert analyze(tiny_run, out=out, measures=["losses", "test_every"], options=["test_every.every=3"]).measures.equals(
        a.measures)
    b = analyze(tiny_run, out=out, measures=["losses", "test_every"], options=["test_every.gain=2"])
    assert b.measures.every_pos.tolist() == [2.0 * i for i in range(n)]
    one = measure(tiny_run.model(tiny_run.epochs[-1]), tiny_run.task, tiny_run.config, measures=["test_every"],
                  options={"test_every.gain": 5})
    assert one["every_pos"] == 0.0 and one["every_ref"] == pytest.approx(float(newest))
    for bad, why in ((["test_every.every=0"], "positive integer"), (["test_every.every=x"], "expected an integer"),
                     (["test_every.speed=1"], "no option 'speed'.*test_every.every"), (["every=1"], "FAMILY.NAME"),
                     (["nope.every=1"], "no measure family 'nope'"), (["test_every.every"], "FAMILY.NAME=VALUE")):
        with pytest.raises(ValueError, match=why):
            analyze(tiny_run, out=tmp_path / "bad", measures=["test_every"], options=bad)
    assert not (tmp_path / "bad").exists()
    assert cli_main(["analyze", "--list-measures"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("test_every")]
    assert "(opt-in)" in listed[0] and "--option test_every.every=1" in listed[0]
    assert cli_main(["analyze", str(tiny_run.path), "--out", str(tmp_path / "c"), "--measures", "default,test_every",
                     "--option", "test_every.every=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--option" in err[0] and "expected an integer" in err[0]
    assert cli_main(["analyze", str(tiny_run.path), "--out", str(tmp_path / "c"), "--measures", "default,test_every",
                     "--option", "test_every.every=2"]) == 0
    summary = load_analysis(tmp_path / "c").summary
    assert "test_every" in summary["measures"] and "losses" in summary["measures"]
