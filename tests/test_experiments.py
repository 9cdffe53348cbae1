"""The protocols of issue 5 on real, small training runs (p = 23, d_model 32): no mocks.

Each science claim is checked on the outcome of actual training: the reference networks' shares,
the memorising norm growing with D, ungrokking below D_crit, capacity growing with width.
"""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pandas as pd
import pytest
import torch

import circuits
from circuits.config import ConfigError, TaskConfig, preset
from circuits.errors import ProtocolError, RunFolderError
from circuits.experiments import (
    Member,
    classify_zone,
    critical_dataset_size,
    curve_events,
    memorisation_capacity,
    reference_circuits,
    run_members,
    ungrokking,
)
from circuits.tasks import make_task
from circuits.report import write_experiment_page
from circuits.trainer import TrainingInterrupted, with_init_digest
from tests.conftest import run_cli, tiny_config


def small(**overrides: object) -> circuits.RunConfig:
    """p = 23, narrow model, lr 3e-3: groks on 80% of the pairs within 1,500 epochs."""
    base = preset("quick-v1").replace(
        p=23, d_model=32, n_heads=4, d_mlp=128, lr=3e-3, epochs=1500, checkpoint_every=250,
        checkpoint_early_until=0, log_every=50, preset="small",
    )
    return base.replace(**overrides) if overrides else base


# ---- splits and initialisation ------------------------------------------------------------------


def test_pool_subsets_only_remove_pairs_of_the_parent_split() -> None:
    parent = make_task(TaskConfig(p=23, frac=None, train_size=300))
    subsets = [make_task(TaskConfig(p=23, frac=None, train_size=40, pool_size=300, subset_seed=s)) for s in range(3)]
    pool = set(parent.train_idx.tolist())
    for sub in subsets:
        train = set(sub.train_idx.tolist())
        assert len(train) == 40 and train <= pool
        # Every other pair, including the pool's unused ones, is a test pair.
        assert train | set(sub.test_idx.tolist()) == set(range(23 * 23))
        assert not train & set(sub.test_idx.tolist())
    assert len({tuple(sorted(s.train_idx.tolist())) for s in subsets}) == 3


def test_pool_size_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="must fit in the pool"):
        TaskConfig(p=23, frac=None, train_size=301, pool_size=300)
    with pytest.raises(ConfigError, match="pool_size 600 exceeds the 529 pairs"):
        TaskConfig(p=23, frac=None, train_size=10, pool_size=600)


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_init_from_starts_at_the_parent_weights(tiny_run, tmp_path, engine: str) -> None:  # noqa: ANN001
    last = tiny_run.epochs[-1]
    source = tiny_run.store.checkpoint_path(last)
    child = circuits.train(tiny_config(init_from=str(source), epochs=5, engine=engine), out=tmp_path / "child")
    start, parent = child.state_dict(0), tiny_run.state_dict(last)
    assert all(torch.equal(start[k], parent[k]) for k in parent)
    assert not torch.equal(child.state_dict(5)["embed.W_E"], parent["embed.W_E"])


def test_init_from_refuses_damaged_or_mismatched_checkpoints(tiny_run, tmp_path) -> None:  # noqa: ANN001
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.path, copy)
    last = tiny_run.epochs[-1]
    path = circuits.load_run(copy).store.checkpoint_path(last)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RunFolderError, match=path.name):
        circuits.train(tiny_config(init_from=str(path), epochs=5), out=tmp_path / "a")
    with pytest.raises(RunFolderError, match="shape"):
        circuits.train(tiny_config(init_from=str(tiny_run.store.checkpoint_path(last)), d_mlp=32, epochs=5),
                       out=tmp_path / "b")
    with pytest.raises(RunFolderError, match="does not exist"):
        circuits.train(tiny_config(init_from=str(tmp_path / "nope.safetensors"), epochs=5), out=tmp_path / "c")


def test_a_run_from_a_checkpoint_is_named_by_its_weights_not_their_path(tiny_run, tmp_path) -> None:  # noqa: ANN001
    import shutil

    last = tiny_run.epochs[-1]
    here, there = tmp_path / "parent", tmp_path / "moved" / "parent"
    shutil.copytree(tiny_run.path, here)
    shutil.copytree(tiny_run.path, there)
    name = tiny_run.store.checkpoint_path(last).name
    at_here = tiny_config(init_from=str(here / "checkpoints" / name), epochs=5)
    at_there = tiny_config(init_from=str(there / "checkpoints" / name), epochs=5)
    assert with_init_digest(at_here).short_hash() == with_init_digest(at_there).short_hash()
    assert at_here.short_hash() != at_there.short_hash()  # without the digest, only the paths

    child = circuits.train(at_here, out=tmp_path / "child")
    digest = tiny_run.store.read_manifest()[name]["sha256"]
    assert child.config.train.init_sha256 == digest
    # The same run read from its moved parent: recognised as finished, not refused or retrained.
    again = circuits.train(at_there, out=tmp_path / "child")
    assert again.epochs == child.epochs

    # A parent replaced by other weights under the same name is refused by name.
    other = tiny_run.store.checkpoint_path(tiny_run.epochs[-2])
    (here / "checkpoints" / name).write_bytes(other.read_bytes())
    (here / "manifest.json").unlink()
    with pytest.raises(RunFolderError, match="not the checkpoint this run started from"):
        circuits.train(child.config, out=tmp_path / "fresh")


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_a_killed_child_resumes_after_its_parent_checkpoint_is_gone(tiny_run, tmp_path, engine: str) -> None:  # noqa: ANN001
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(tiny_run.path, parent)
    source = parent / "checkpoints" / tiny_run.store.checkpoint_path(tiny_run.epochs[-1]).name
    cfg = tiny_config(init_from=str(source), epochs=20, engine=engine)

    def kill(info) -> None:  # noqa: ANN001
        if info.epoch == 12:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        circuits.train(cfg, out=tmp_path / "killed", on_step=kill)
    whole = circuits.train(cfg, out=tmp_path / "whole")
    shutil.rmtree(parent)
    resumed = circuits.train(circuits.load_run(tmp_path / "killed").config, out=tmp_path / "killed")
    sa, sb = resumed.state_dict(20), whole.state_dict(20)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- protocols on real runs -------------------------------------------------------------------------


def test_reference_networks_have_the_expected_generalising_share(tmp_path) -> None:  # noqa: ANN001
    result = reference_circuits(tmp_path, base=small(), mem_size=200, gen_frac=0.8, seeds=1)
    table = result.table.set_index("kind")
    chance = 1 / math.sqrt(23 + 1)
    assert table.loc["mem", "train_acc"] == 1.0
    # Random labels: no a+b structure beyond what chance puts in the span (0.20 at p = 23).
    assert table.loc["mem", "gen_share_all"] < chance
    assert table.loc["gen", "test_acc"] >= 0.95
    assert table.loc["gen", "gen_share"] > 0.95
    assert result.summary["gen_only_criterion_met"]
    write_experiment_page(result)  # the caller draws the page: experiments never import the dashboard
    for ext in ("csv", "json", "html"):
        assert (tmp_path / f"reference.{ext}").stat().st_size > 0


def test_memorising_norm_at_convergence_grows_with_dataset_size(tmp_path) -> None:  # noqa: ANN001
    result = critical_dataset_size(tmp_path, sizes=[30, 120, 400], base=small(), seeds=1)
    mem = result.table[result.table.circuit == "mem"].sort_values("dataset_size")
    assert (mem.train_acc == 1.0).all()
    assert np.all(np.diff(mem.weight_norm.to_numpy()) > 0), mem.weight_norm.tolist()
    assert result.summary["mem_norm_increases"]
    gen = result.table[result.table.gen_only]
    # The largest real-label set groks into a pure generalising circuit; its norm sets D_crit.
    assert 400 in gen.dataset_size.tolist()
    d_crit = result.summary["d_crit_per_seed"]["0"]
    assert d_crit is not None and 30 < d_crit < 400
    # Every summary number says how many seeds it rests on; one seed carries no interval.
    assert result.summary["d_crit_reached"] == "1 of 1 seeds" and result.summary["d_crit_ci95"] is None
    by_size = result.summary["mem_norm_by_size_ci"]
    assert {k: v["mean"] for k, v in by_size.items()} == pytest.approx(
        {str(int(d)): w for d, w in zip(mem.dataset_size, mem.weight_norm)})
    assert all(v["n"] == 1 and v["ci95"] is None for v in by_size.values())


def test_protocol_intervals_are_student_t_over_seeds_with_missing_counted() -> None:
    from circuits.experiments.members import interval_by
    from circuits.stats import t_quantile

    table = pd.DataFrame({"d": [10, 10, 10, 20, 20, 20], "x": [1.0, 2.0, 3.0, 5.0, np.nan, 7.0]})
    got = interval_by(table, "d", "x")
    assert got["10"] == {"mean": 2.0, "ci95": pytest.approx(t_quantile(2) * 1.0 / 3**0.5), "n": 3, "missing": 0}
    assert got["20"]["mean"] == 6.0 and got["20"]["n"] == 2 and got["20"]["missing"] == 1
    assert got["20"]["ci95"] == pytest.approx(t_quantile(1) * 2**0.5 / 2**0.5)


def test_ungrokking_loses_test_accuracy_far_below_d_crit(tmp_path) -> None:  # noqa: ANN001
    result = ungrokking(tmp_path, sizes=[30, 300], base=small(), parent_frac=0.8, epochs=800, seeds=1)
    acc = result.table.set_index("dataset_size").test_acc
    assert result.summary["parent_test_acc"] >= 0.95
    assert acc[30] < 0.3 and acc[300] > 0.8
    assert (result.table.train_acc == 1.0).all()
    parent = circuits.load_run(tmp_path / "runs" / "parent")
    child = circuits.load_run(tmp_path / "runs" / "ungrok-d30-s0")
    assert set(child.task.train_idx.tolist()) <= set(parent.task.train_idx.tolist())
    p_last = parent.state_dict(parent.epochs[-1])
    assert all(torch.equal(child.state_dict(0)[k], p_last[k]) for k in p_last)

    # The experiment folder moved (another disk, a cluster's mount): running the protocol
    # again finds every run finished and trains nothing.
    import shutil

    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    moved.mkdir()
    shutil.move(tmp_path / "runs", moved / "runs")
    groups: list[int] = []
    again = ungrokking(moved, sizes=[30, 300], base=small(), parent_frac=0.8, epochs=800, seeds=1,
                       on_group=lambda i, n, m: groups.append(m))
    assert groups == []
    pd.testing.assert_frame_equal(again.table, result.table)


def test_capacity_grows_with_width(tmp_path) -> None:  # noqa: ANN001
    result = memorisation_capacity(tmp_path, widths=[4, 32], base=small(epochs=800), seeds=1)
    cap = result.table.set_index("d_model").capacity
    assert cap[4] < cap[32] == 23 * 23


def test_a_killed_protocol_resumes_to_the_same_weights(tmp_path) -> None:  # noqa: ANN001
    members = [Member(f"m{s}", small(seed=s, epochs=300, train_size=200)) for s in range(2)]

    def kill(info) -> None:  # noqa: ANN001
        if info.epoch == 130:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        run_members(members, tmp_path / "killed", on_step=kill)
    resumed = run_members(members, tmp_path / "killed")
    whole = run_members(members, tmp_path / "whole")
    for a, b in zip(resumed, whole):
        sa, sb = a.state_dict(300), b.state_dict(300)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    groups: list[int] = []
    run_members(members, tmp_path / "killed", on_group=lambda i, n, m: groups.append(m))
    assert groups == []  # finished members are not trained again


# ---- rules and bad input ----------------------------------------------------------------------------


def _curves(train: list[float], test: list[float]) -> dict:
    return curve_events(list(range(0, 100 * len(train), 100)), train, test)


def test_zone_rule_on_written_curves() -> None:
    n = 40
    late = [0.02] * 25 + [1.0] * 15
    assert classify_zone(_curves([1.0] * n, late)) == "grokking"
    together = [min(1.0, 0.05 * i) for i in range(n)]
    assert classify_zone(_curves(together, together)) == "progression"
    assert classify_zone(_curves([1.0] * n, [0.02] * 25 + [0.55] * 15)) == "semi-grokking"
    assert classify_zone(_curves([1.0] * n, [0.02] * n)) == "ungrokking"
    assert classify_zone(_curves([0.5] * n, [0.02] * n)) == "confusion"
    # Never fits (capacity-bound) yet generalises partly: progression, not semi-grokking.
    assert classify_zone(_curves([0.9] * n, [0.02] * 25 + [0.55] * 15)) == "progression"
    ev = _curves([0.1, 1.0] + [1.0] * (n - 2), late)
    assert ev["fit_epoch"] == 100 and ev["rise_epoch"] == 2500 and ev["plateau_test_acc"] == 1.0


def test_zone_rule_tells_progression_from_comprehension_by_the_measured_capacity() -> None:
    # Issue 20, item 4: a fast generaliser is Huang et al.'s progression only when the data
    # exceed what the width can memorise; within capacity it is Liu et al.'s comprehension.
    n = 40
    together = _curves([min(1.0, 0.05 * i) for i in range(n)], [min(1.0, 0.05 * i) for i in range(n)])
    assert classify_zone(together, dataset_size=300, capacity=200.0) == "progression"
    assert classify_zone(together, dataset_size=300, capacity=500.0) == "comprehension"
    assert classify_zone(together, dataset_size=300, capacity=300.0) == "comprehension"  # D <= D_mem
    assert classify_zone(together) == "progression"  # capacity unknown: not told apart
    late = _curves([1.0] * n, [0.02] * 25 + [1.0] * 15)
    assert classify_zone(late, dataset_size=300, capacity=500.0) == "grokking"  # delay decides first
    assert classify_zone(_curves([1.0] * n, [0.02] * n), dataset_size=300, capacity=500.0) == "ungrokking"
    # Nearly fit, nearly generalised, within capacity (p = 59 zone map: train 0.92-0.98, test
    # 0.89-0.90): not confusion, whose runs neither fit nor generalise.
    assert classify_zone(_curves([0.95] * n, [0.9] * n), dataset_size=300, capacity=500.0) == "progression"


def test_liu_phase_rule_on_written_curves() -> None:
    # Liu et al. (2022), App. A Table 1: 90% thresholds, a 10^5-step budget, a 10^3-step gap.
    from circuits.measures.phases import liu_phase

    steps = list(range(0, 100_001, 500))
    n = len(steps)

    def ramp(at: int) -> list[float]:
        return [0.05 if s < at else 1.0 for s in steps]

    comp = liu_phase(steps, ramp(2_000), ramp(2_500))
    assert comp == {"phase": "comprehension", "train_step": 2_000, "test_step": 2_500, "truncated": False}
    grok = liu_phase(steps, ramp(2_000), ramp(30_000))
    assert grok["phase"] == "grokking" and grok["test_step"] - grok["train_step"] == 28_000
    assert liu_phase(steps, ramp(2_000), [0.3] * n)["phase"] == "memorization"
    assert liu_phase(steps, [0.5] * n, [0.3] * n)["phase"] == "confusion"
    assert liu_phase(steps, [0.5] * n, ramp(4_000))["phase"] == "unclassified"
    # A crossing after the budget does not count; the thresholds are strict ("exceed 90%").
    assert liu_phase(steps, ramp(2_000), ramp(30_000), budget=20_000)["phase"] == "memorization"
    assert liu_phase(steps, [0.9] * n, [0.9] * n)["phase"] == "confusion"
    # The gap and the threshold are parameters.
    assert liu_phase(steps, ramp(2_000), ramp(30_000), gap=50_000)["phase"] == "comprehension"
    assert liu_phase(steps, [0.95] * n, [0.95] * n, threshold=0.96)["phase"] == "confusion"
    # A run shorter than its budget is classified on its own length and flagged.
    short = liu_phase(steps[:21], ramp(2_000)[:21], [0.3] * 21)
    assert short["phase"] == "memorization" and short["truncated"] is True


def test_bad_protocol_parameters_get_clear_errors(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ProtocolError, match="grid is empty"):
        critical_dataset_size(tmp_path, sizes=[], base=small())
    with pytest.raises(ProtocolError, match="seeds grid is empty"):
        critical_dataset_size(tmp_path, sizes=[30], base=small(), seeds=0)
    with pytest.raises(ProtocolError, match="exceeds the 529 pairs"):
        critical_dataset_size(tmp_path, sizes=[30, 600], base=small())
    # D' larger than the pool is refused before the parent is trained.
    with pytest.raises(ProtocolError, match=r"D'=500 is larger than the parent's training set \(423 pairs\)"):
        ungrokking(tmp_path, sizes=[30, 500], base=small(), parent_frac=0.8)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ProtocolError, match="not divisible by n_heads=4"):
        memorisation_capacity(tmp_path, widths=[6], base=small())


def test_cli_protocol_errors_are_one_line(tmp_path) -> None:  # noqa: ANN001
    r = run_cli("experiment", "ungrok", "--sizes", "10,5000", "--p", "23", "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "larger than the parent's training set" in r.stderr
    r = run_cli("experiment", "dcrit", "--sizes", "ten")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr
    r = run_cli("experiment", "dcrit", "--sizes", "10", "--p", "7", "--engine", "reference", "--device", "cuda")
    assert r.returncode == 2 and "needs the fused engine" in r.stderr and "Traceback" not in r.stderr


def test_cli_zones_writes_table_and_figure_and_resumes(tmp_path) -> None:  # noqa: ANN001
    args = ("experiment", "zones", "--widths", "16,32", "--sizes", "100,400", "--seeds", "1", "--p", "23",
            "--lr", "0.003", "--epochs", "600", "--checkpoint-every", "200", "--checkpoint-early-until", "0",
            "--log-every", "50", "--out", str(tmp_path))
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "zones.csv")
    assert len(table) == 4 and set(table.zone) <= {"grokking", "progression", "semi-grokking", "ungrokking", "confusion"}
    assert "zone_counts" in (tmp_path / "zones.json").read_text()
    assert "<html" in (tmp_path / "zones.html").read_text()[:500].lower()
    assert len(list((tmp_path / "runs").iterdir())) == 4
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.safetensors")}
    again = run_cli(*args)
    summary = [line for line in r.stdout.splitlines() if line.startswith("zones: 4 rows")]
    assert again.returncode == 0 and summary and summary[0] in again.stdout
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.safetensors")} == mtimes
    assert set(table.liu_phase) <= {"comprehension", "grokking", "memorization", "confusion", "unclassified"}
    # With the widths' measured capacity, the same runs (not retrained) are classified again.
    (tmp_path / "cap.json").write_text(json.dumps({"capacity_by_width": {"16": 1000.0, "32": 50.0}}))
    third = run_cli(*args, "--capacity", str(tmp_path / "cap.json"))
    assert third.returncode == 0, third.stderr
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.safetensors")} == mtimes
    t3 = pd.read_csv(tmp_path / "zones.csv")
    assert t3.set_index("d_model").capacity.to_dict() == {16: 1000.0, 32: 50.0}
    assert "progression" not in set(t3[t3.d_model == 16].zone)  # D <= capacity: never progression
    assert json.loads((tmp_path / "zones.json").read_text())["capacity_by_width"] == {"16": 1000.0, "32": 50.0}
    (tmp_path / "bad.json").write_text("{}")
    bad = run_cli(*args, "--capacity", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "capacity_by_width" in bad.stderr and bad.stderr.strip().count("\n") == 0
    # circuits info on the protocol's folder: its members by status and its result's summary.
    info = run_cli("info", str(tmp_path))
    assert info.returncode == 0, info.stderr
    assert "status    complete 4" in info.stdout and "zone_counts: " in info.stdout
    assert str(tmp_path / "zones.csv") in info.stdout
    (tmp_path / "zones.csv").unlink()  # as before the protocol finished: runs, no result yet
    info = run_cli("info", str(tmp_path))
    assert info.returncode == 0 and "result    none yet" in info.stdout


def test_phase_diagram_over_two_fields_and_its_cli(tmp_path) -> None:  # noqa: ANN001
    from circuits.experiments import phase_diagram

    base = tiny_config(epochs=200, checkpoint_every=100, checkpoint_early_until=0, log_every=10)
    result = phase_diagram(tmp_path / "lib", {"weight_decay": [0.1, 1.0], "train_size": [30, 60]}, base=base)
    table = result.table
    assert len(table) == 4 and set(table.weight_decay) == {0.1, 1.0} and set(table.train_size) == {30, 60}
    assert {"zone", "grok_epoch", "test_acc", "weight_norm"} <= set(table.columns)
    # Each run really has its grid point's config.
    for _, row in table.iterrows():
        cfg = circuits.load_run(tmp_path / "lib" / "runs" / row.run).config
        assert cfg.train.weight_decay == row.weight_decay and cfg.task.n_train == row.train_size
    # Stronger weight decay ends with a smaller parameter norm at the same data size.
    norms = table.set_index(["train_size", "weight_decay"]).weight_norm
    assert norms[(60, 1.0)] < norms[(60, 0.1)]
    with pytest.raises(ProtocolError, match="at least two grid fields"):
        phase_diagram(tmp_path / "x", {"weight_decay": [0.1]}, base=base)
    with pytest.raises(ProtocolError, match="unknown config field"):
        phase_diagram(tmp_path / "x", {"weight_decay": [0.1], "wd": [1]}, base=base)
    r = run_cli("experiment", "phases", "--grid", "weight-decay=0.1,1", "--grid", "seed=1,2", "--p", "11",
                "--d-model", "32", "--d-mlp", "64", "--epochs", "60", "--checkpoint-early-until", "0",
                "--out", str(tmp_path / "cli"))
    assert r.returncode == 0, r.stderr
    cli_table = pd.read_csv(tmp_path / "cli" / "phase_diagram.csv")
    assert len(cli_table) == 4 and set(cli_table.seed) == {1, 2} and set(cli_table.replicate) == {0}
    r = run_cli("experiment", "phases", "--grid", "lr=fast", "--grid", "seed=1")
    assert r.returncode == 2 and "values must be floats" in r.stderr


def test_every_knob_the_members_differ_in_is_a_table_column(tmp_path) -> None:  # noqa: ANN001
    # Issue 22: every option is a config field, hence a column of every protocol table: the
    # fields that differ between members appear even where the protocol does not label them.
    from circuits.experiments import Member, run_members
    from circuits.experiments.members import member_table

    members = [Member("a", tiny_config(epochs=10), (("arm", "plain"),)),
               Member("b", tiny_config(epochs=10, weight_decay=0.1, grokfast="ema"), (("arm", "filtered"),))]
    runs = run_members(members, tmp_path)
    table = member_table(members, runs).set_index("arm")
    assert table.loc["plain", "weight_decay"] == 1.0 and table.loc["filtered", "weight_decay"] == 0.1
    assert list(table.grokfast) == ["none", "ema"]
    assert "lr" not in table and "p" not in table  # the same in every member: no column
