"""`circuits sweep` and circuits.sweep: members, the index, resumption, failures, executors, maps.

Real tiny runs (p = 7, 32-wide, tens of epochs): a sweep member trains in well under a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import circuits
from circuits.errors import ProtocolError
from circuits.experiments.sweeps import INDEX_FILE, sweep_points
from tests.conftest import REPO, assert_same_weights, run_cli, tiny_config

GRID = {"weight_decay": [0.3, 1.0], "d_mlp": [64, 96]}
TINY_FLAGS = ["--preset", "quick-v1", "--p", "7", "--frac", "0.5", "--d-model", "32", "--n-heads", "4", "--d-mlp", "64",
              "--epochs", "40",
              "--checkpoint-every", "10", "--checkpoint-early-every", "5", "--checkpoint-early-until", "20",
              "--log-every", "5", "--lr", "0.01"]


def _base(**kw: object) -> circuits.RunConfig:
    return tiny_config(**{"p": 7, "epochs": 40, **kw})


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()
            and f.name != "circuits.lock"}


def _stamps(root: Path) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_mtime_ns for f in sorted(root.rglob("*")) if f.is_file()
            and f.name != "circuits.lock"}


def test_a_sweep_trains_every_member_and_indexes_its_outcomes(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    result = circuits.sweep(out, GRID, base=_base(), seeds=2, workers=1)
    index = pd.read_csv(out / INDEX_FILE)
    # One row per member in grid order (the last axis fastest, then the seeds), all done.
    assert list(index.columns[:5]) == ["name", "weight_decay", "d_mlp", "seed", "status"]
    assert [(r.weight_decay, r.d_mlp, r.seed) for r in index.itertuples()] == [
        (wd, d, s) for wd in (0.3, 1.0) for d in (64, 96) for s in (0, 1)]
    assert (index.status == "done").all() and index.error.isna().all()
    assert len(result.table) == 8 and result.summary["done"] == 8 and result.summary["stacks"] == 2
    for row in index.itertuples():
        run = circuits.load_run(out / "runs" / row.name)
        # Each member is an ordinary run of its grid point.
        assert run.config.train.weight_decay == row.weight_decay and run.config.model.d_mlp == row.d_mlp
        assert run.config.model.seed == _base().model.seed + row.seed
        assert run.is_complete and row.epochs_trained == run.epochs[-1]
        # Outcome metrics agree with the run's own curves.
        for split in ("train", "test"):
            for level in (90, 95, 99):
                got = getattr(row, f"epochs_to_{split}_{level}")
                want = run.first_epoch(f"{split}_acc", level / 100)
                assert (pd.isna(got) and want is None) or got == want
        final = run.metrics.iloc[-1]
        assert row.train_acc == pytest.approx(final.train_acc) and row.test_acc == pytest.approx(final.test_acc)
        assert row.zone in {"progression", "comprehension", "grokking", "semi-grokking", "ungrokking", "confusion"}
        assert row.liu_phase in {"comprehension", "grokking", "memorization", "confusion", "unclassified"}
    # A second call trains nothing and rewrites the same index.
    before, stamps = (out / INDEX_FILE).read_bytes(), _stamps(out / "runs")
    again = circuits.sweep(out, GRID, base=_base(), seeds=2, workers=1)
    assert (out / INDEX_FILE).read_bytes() == before and _stamps(out / "runs") == stamps
    assert again.summary["stacks"] == 0


def test_the_sweep_maps_have_the_grid_axes_and_show_disagreement(tmp_path: Path) -> None:
    result = circuits.sweep(tmp_path / "sw", {"weight_decay": [0.3, 1.0], "lr": [0.01, 0.03]}, base=_base(),
                            seeds=3, workers=1)
    zone_map = result.figure
    heat = zone_map.data[0]
    assert list(heat.x) == ["0.3", "1"] and list(heat.y) == ["0.01", "0.03"]
    table = result.table
    for yi, lr in enumerate((0.01, 0.03)):
        for xi, wd in enumerate((0.3, 1.0)):
            zones = table[(table.weight_decay == wd) & (table.lr == lr)].zone.value_counts()
            cell = heat.text[yi][xi]
            # The cell names the majority zone, with its share when the seeds disagree.
            assert cell.split()[0] == zones.index[0]
            assert cell.endswith(f"{zones.iloc[0]}/3") == (zones.iloc[0] < 3)
    titles = [f.layout.title.text for f in (result.figure, *result.extra_figures)]
    assert "Liu et al.'s phase" in titles
    curves = [f for f in result.extra_figures if f.layout.title.text.startswith("epochs to test 95 against")]
    assert [f.layout.title.text.split(" against ")[1] for f in curves] == ["weight decay", "lr"]
    assert list(curves[0].data[1].x) == [0.3, 1.0]


def test_a_bad_member_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    r = run_cli("sweep", "--out", str(out), "--grid", "frac=0.5,1.5", "--grid", "lr=0.01,1e6", *TINY_FLAGS)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "1 of 4 members done" in r.stdout
    index = pd.read_csv(out / INDEX_FILE).set_index("name")
    assert index.loc["frac0.5-lr0.01", "status"] == "done"
    # A grid point that is not a valid config, and one whose loss diverges: recorded, named.
    assert index.loc["frac1.5-lr0.01", "status"] == "failed" and "frac must lie in (0, 1]" in index.loc["frac1.5-lr0.01", "error"]
    assert index.loc["frac1.5-lr1000000.0", "status"] == "failed"
    assert index.loc["frac0.5-lr1000000.0", "status"] == "diverged" and "non-finite" in index.loc["frac0.5-lr1000000.0", "error"]
    assert "frac0.5-lr1000000.0: diverged" in r.stderr and "failed or diverged" in r.stderr
    assert not (out / "runs" / "frac1.5-lr0.01").exists()
    # The same command again: the finished member is kept, the failures are reported again.
    stamps = _stamps(out / "runs" / "frac0.5-lr0.01")
    again = run_cli("sweep", "--out", str(out), "--grid", "frac=0.5,1.5", "--grid", "lr=0.01,1e6", *TINY_FLAGS)
    assert again.returncode == 1 and _stamps(out / "runs" / "frac0.5-lr0.01") == stamps
    index = pd.read_csv(out / INDEX_FILE).set_index("name")
    assert index.loc["frac0.5-lr1000000.0", "status"] == "diverged"
    assert "earlier call" in index.loc["frac0.5-lr1000000.0", "error"] and "lr 1e+06" in index.loc["frac0.5-lr1000000.0", "error"]


def test_another_sweep_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    circuits.sweep(out, {"weight_decay": [0.3]}, base=_base(), workers=1)
    with pytest.raises(ProtocolError, match="holds a different sweep"):
        circuits.sweep(out, {"weight_decay": [0.3, 1.0]}, base=_base(), workers=1)
    r = run_cli("sweep", "--out", str(out), "--grid", "weight_decay=1", *TINY_FLAGS)
    assert r.returncode == 2 and "holds a different sweep" in r.stderr and "Traceback" not in r.stderr
    # Bad grids are one line each.
    for args, msg in ((["--grid", "widht=1,2"], "unknown config field 'widht'"),
                      ([], "a sweep needs a grid"),
                      (["--grid", "lr=0.1", "--backend", "slurm"], "--backend 'slurm'"),
                      (["--grid", "lr=0.1", "--workers", "0"], "--workers must be at least 1"),
                      (["--grid", "d_mlp=64,96", "--workers", "2", "--threads", str(os.cpu_count() or 1)],
                       "torch threads on")):
        r = run_cli("sweep", "--out", str(tmp_path / "other"), *args, *TINY_FLAGS)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_grid_file_gives_points_and_seeds(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.toml"
    spec.write_text('seeds = [0, 2]\n[[points]]\nweight_decay = 0.3\nlr = 0.01\n[[points]]\nweight_decay = 1.0\n')
    out = tmp_path / "sw"
    r = run_cli("sweep", "--out", str(out), "--grid-file", str(spec), *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    index = pd.read_csv(out / INDEX_FILE)
    assert list(index.name) == ["weight_decay0.3-lr0.01-s0", "weight_decay0.3-lr0.01-s2",
                                "weight_decay1.0-s0", "weight_decay1.0-s2"]
    assert (index.status == "done").all()
    assert json.loads((out / "spec.json").read_text())["seeds"] == [0, 2]
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nweight_decay = 0.3\n")
    r = run_cli("sweep", "--out", str(tmp_path / "o2"), "--grid-file", str(bad), *TINY_FLAGS)
    assert r.returncode == 2 and "`grid` must map each field to a list" in r.stderr


def test_points_that_spell_one_folder_are_refused() -> None:
    with pytest.raises(ProtocolError, match="same folder name"):
        sweep_points([{"init_from": "a/b"}, {"init_from": "a_b"}], _base())


def test_a_killed_sweep_reruns_only_the_unfinished_members(tmp_path: Path) -> None:
    # Two stacks (different schedules): the short one finishes, the long one is killed mid-way.
    out = tmp_path / "sw"
    args = [sys.executable, "-m", "circuits.cli", "sweep", "--out", str(out), "--grid", "epochs=40,400",
            "--workers", "1", "--threads", "1", *TINY_FLAGS]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    short, long_ = out / "runs" / "epochs40", out / "runs" / "epochs400"
    try:
        # Wait for a state, not a time: the short member done, the long one with checkpoints.
        while not ((out / INDEX_FILE).is_file() and "done" in (out / INDEX_FILE).read_text()
                   and len(list((long_ / "checkpoints").glob("*.safetensors"))) >= 8):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    index = pd.read_csv(out / INDEX_FILE).set_index("name")
    assert index.loc["epochs40", "status"] == "done" and index.loc["epochs400", "status"] == "running"
    assert not circuits.load_run(long_).is_complete
    kept, stamps = _files(short), _stamps(short)
    r = run_cli("sweep", "--out", str(out), "--grid", "epochs=40,400", "--workers", "1", "--threads", "1", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    assert _files(short) == kept and _stamps(short) == stamps  # the finished member was not touched
    index = pd.read_csv(out / INDEX_FILE)
    assert (index.status == "done").all()
    # The resumed member equals the same run trained without a stop.
    alone = circuits.train(circuits.load_run(long_).config, out=tmp_path / "alone")
    assert_same_weights(alone, circuits.load_run(long_))


def _ray_or_skip() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("needs the ray extra (pip install 'circuits[ray]'); CI installs it")


def test_local_workers_and_ray_write_the_same_index_and_the_same_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _ray_or_skip()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray only, never another address
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    grid = {"d_mlp": [64, 96], "weight_decay": [0.3, 1.0]}
    # Two stacks each way: in two worker processes, as two Ray tasks.
    # (This process against worker processes: the protocol test below.)
    two = circuits.sweep(tmp_path / "two", grid, base=_base(), seeds=2, workers=2, threads=1)
    ray = circuits.sweep(tmp_path / "ray", grid, base=_base(), seeds=2, backend="ray", threads=1)
    import ray as ray_module

    assert not ray_module.is_initialized()  # the local instance was shut down
    assert two.summary["stacks"] == ray.summary["stacks"] == 2
    assert (tmp_path / "ray" / INDEX_FILE).read_bytes() == (tmp_path / "two" / INDEX_FILE).read_bytes()
    assert _files(tmp_path / "ray" / "runs") == _files(tmp_path / "two" / "runs")


def _worker_pids(parent: int | None = None) -> list[int]:
    """The sweep worker processes whose parent is ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"circuits.experiments.worker" in cmd and int(stat[1]) == parent:
            pids.append(int(proc.name))
    return pids


def test_a_worker_process_that_dies_fails_only_its_stack(tmp_path: Path) -> None:
    import threading

    out = tmp_path / "sw"
    done: dict[str, object] = {}

    def work() -> None:
        done["result"] = circuits.sweep(out, {"epochs": [40, 100_000]}, base=_base(), workers=2, threads=1)

    t = threading.Thread(target=work)
    t.start()
    # Wait for a state, not a time: the short member done, the long one training in a worker.
    long_ = out / "runs" / "epochs100000" / "checkpoints"
    while not ((out / INDEX_FILE).is_file() and "epochs40,40,done" in (out / INDEX_FILE).read_text()
               and long_.is_dir() and len(list(long_.glob("*.safetensors"))) >= 3):
        assert t.is_alive()
        time.sleep(0.05)
    for pid in _worker_pids():
        os.kill(pid, signal.SIGKILL)
    t.join()
    index = pd.read_csv(out / INDEX_FILE).set_index("name")
    assert index.loc["epochs40", "status"] == "done"
    assert index.loc["epochs100000", "status"] == "failed"
    assert "worker process exited with code -9" in index.loc["epochs100000", "error"]
    assert done["result"].summary["failed"] == 1


def test_a_phase_diagram_runs_on_the_sweep_machinery_and_takes_over_its_old_folders(tmp_path: Path) -> None:
    from circuits.experiments import phase_diagram

    out = tmp_path / "pd"
    grid = {"weight_decay": [0.3, 1.0], "lr": [0.01]}
    first = phase_diagram(out, grid, base=_base(), seeds=2)
    index = pd.read_csv(out / INDEX_FILE)
    assert len(index) == 4 and (index.status == "done").all()
    assert sorted(index.name) == sorted(first.table.run)
    # A folder written before phase diagrams kept a sweep spec: its runs are taken over, not retrained.
    (out / "spec.json").unlink()
    (out / INDEX_FILE).unlink()
    stamps = _stamps(out / "runs")
    again = phase_diagram(out, grid, base=_base(), seeds=2)
    assert _stamps(out / "runs") == stamps and again.table.equals(first.table)
    # A folder holding a run that is not a member is not taken over.
    (out / "spec.json").unlink()
    (out / INDEX_FILE).unlink()
    (out / "runs" / "someone-else").mkdir()
    with pytest.raises(ProtocolError, match="someone-else"):
        phase_diagram(out, grid, base=_base(), seeds=2)


def test_with_analyze_each_member_has_its_analysis_phases(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    base = tiny_config(p=11, epochs=300, checkpoint_every=20)
    first = circuits.sweep(out, {"weight_decay": [1.0, 3.0]}, base=base, analyze=True, workers=1)
    for row in first.table.itertuples():
        summary = circuits.load_analysis(circuits.analyze(circuits.load_run(out / "runs" / row.name)).path).summary
        phases = summary["phases"] or {}
        for key in ("memorisation_end", "circuit_formation_end", "cleanup_end"):
            got = getattr(row, key)
            assert (got is None or pd.isna(got)) if phases.get(key) is None else got == phases[key]
    assert first.table.memorisation_end.notna().any()  # the memorisation phase ends in these runs
    # Members finished in an earlier call keep their phase columns.
    again = circuits.sweep(out, {"weight_decay": [1.0, 3.0]}, base=base, analyze=True, workers=1)
    assert again.table[["memorisation_end"]].equals(first.table[["memorisation_end"]])


def test_a_ray_stack_larger_than_the_cluster_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _ray_or_skip()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    with pytest.raises(ProtocolError, match="asks for 64 CPUs"):
        circuits.sweep(tmp_path / "sw", {"weight_decay": [0.3]}, base=_base(), backend="ray", threads=64)
    import ray

    assert not ray.is_initialized()


def test_the_summary_gives_the_time_to_generalise_per_axis_value(tmp_path: Path) -> None:
    from circuits.stats import interval

    # design.md's CI science size (p = 31), at a learning rate that generalises within 300 epochs.
    base = circuits.preset("quick").replace(p=31, d_model=32, n_heads=4, d_mlp=128, lr=1e-2, weight_decay=1.0,
                                            epochs=300, checkpoint_every=100)
    result = circuits.sweep(tmp_path / "sw", {"frac": [0.5, 0.8]}, base=base, seeds=2, workers=1)
    per = json.loads((tmp_path / "sw" / "sweep.json").read_text())["epochs_to_test_95_by_axis"]["frac"]
    for frac in (0.5, 0.8):
        hits = result.table[result.table.frac == frac].epochs_to_test_95.dropna().tolist()
        assert per[f"{frac:g}"] == {"members": 2, "reached": len(hits), **interval(hits)}
    assert per["0.8"]["reached"] >= 1  # so the interval is over real values


def test_a_protocol_on_worker_processes_writes_what_it_writes_in_process(tmp_path: Path) -> None:
    from circuits.experiments import memorisation_capacity
    from circuits.experiments.executors import LocalExecutor

    base = _base(epochs=30)
    # Two widths: two stacks, so two worker processes.
    here = memorisation_capacity(tmp_path / "here", widths=[16, 32], base=base, seeds=1)
    there = memorisation_capacity(tmp_path / "there", widths=[16, 32], base=base, seeds=1,
                                  executor=LocalExecutor(workers=2, threads=here_threads()))
    assert there.table.equals(here.table)
    assert _files(tmp_path / "there" / "runs") == _files(tmp_path / "here" / "runs")
    # The CLI's --workers and --backend reach the protocol; a bad one is one line.
    r = run_cli("experiment", "dcrit", "--sizes", "10", "--seeds", "1", "--backend", "slurm", *TINY_FLAGS)
    assert r.returncode == 2 and "--backend 'slurm'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def here_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_a_notebook_loads_a_sweep_back(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    done = circuits.sweep(out, {"weight_decay": [0.3, 1.0], "lr": [0.01]}, base=_base(), seeds=2, workers=1)
    sw = circuits.load_sweep(out)
    assert sw.table.equals(pd.read_csv(out / INDEX_FILE)) and sw.summary == done.summary
    assert sw.spec["grid"] == {"weight_decay": [0.3, 1.0], "lr": [0.01]} and sw.spec["seeds"] == 2
    runs = sw.runs()
    assert sorted(runs) == sorted(done.table.name)
    first = done.table.name[0]
    assert runs[first].path == out / "runs" / first and runs[first].is_complete
    assert [f.layout.title.text for f in sw.figures()] == [f.layout.title.text for f in (done.figure, *done.extra_figures)]
    with pytest.raises(KeyError, match="no member 'nope'"):
        sw.run("nope")
    with pytest.raises(ProtocolError, match="not a sweep folder"):
        circuits.load_sweep(out / "runs")
    # Given the sweep folder where a run folder is wanted, the CLI names one of its runs ...
    r = run_cli("analyze", str(out))
    assert r.returncode == 2 and "holds 4 run folder(s) under runs/" in r.stderr and str(out / "runs" / first) in r.stderr
    # ... and `circuits info` describes the sweep.
    r = run_cli("info", str(out))
    assert r.returncode == 0, r.stderr
    assert "4 members over weight_decay, lr, seed" in r.stdout and "status    done 4" in r.stdout


def test_ctrl_c_stops_the_workers_cleanly_and_a_rerun_finishes(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    args = ["sweep", "--out", str(out), "--grid", "d-mlp=64,96", "--workers", "2", "--threads", "1",
            *TINY_FLAGS, "--epochs", "400"]
    proc = subprocess.Popen([sys.executable, "-m", "circuits.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    runs = [out / "runs" / "d_mlp64", out / "runs" / "d_mlp96"]
    try:
        # Wait for a state, not a time: both members training in their workers.
        while not all(len(list((r / "checkpoints").glob("*.safetensors"))) >= 5 for r in runs):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGINT)  # to the sweep's process only: it stops its workers
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted; state saved" in err and "Traceback" not in err, err
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # they exited (saving first)
    index = pd.read_csv(out / INDEX_FILE)
    assert set(index.status) <= {"interrupted", "done"} and "interrupted" in set(index.status)
    for r in runs:  # each kept a consistent resume point
        run = circuits.load_run(r)
        assert run.store.diverged() is None and run.epochs[-1] <= 400
    again = run_cli(*args[:5], "--workers", "1", *args[7:])  # the same sweep, finished in one process
    assert again.returncode == 0, again.stderr
    assert (pd.read_csv(out / INDEX_FILE).status == "done").all()
