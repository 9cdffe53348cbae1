"""analyze(): every measure over every checkpoint; incremental; damage-tolerant; the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import circuits
from circuits.analysis import MEASURE_COLUMNS, _key_set, analyze, load_analysis
from circuits.store import RunStore
from tests.conftest import run_cli


def _copy(run: circuits.Run, tmp_path: Path, name: str = "run") -> Path:
    dest = tmp_path / name
    shutil.copytree(run.path, dest)
    return dest


def test_tables_cover_every_checkpoint_and_agree_with_training_metrics(
    tiny_run: circuits.Run, tmp_path: Path
) -> None:
    result = analyze(tiny_run, out=tmp_path / "a")
    m = result.measures
    assert set(MEASURE_COLUMNS) <= set(m.columns)
    assert any(c.startswith("norm_sq.blocks.0.mlp.W_in") for c in m.columns)
    assert m.epoch.tolist() == tiny_run.epochs
    # Independent paths: the trainer's fused evaluation vs the analysis grid forward.
    logged = tiny_run.metrics.set_index("epoch").loc[m.epoch]
    for col in ("train_loss", "test_loss", "train_acc", "test_acc"):
        torch.testing.assert_close(
            torch.tensor(m[col].values), torch.tensor(logged[col].values), rtol=1e-4, atol=1e-6
        )
    a = result.arrays
    n, p, d_mlp = len(m), tiny_run.config.task.p, tiny_run.config.model.d_mlp
    assert a["epochs"].tolist() == m.epoch.tolist()
    assert a["embed_fourier_norms"].shape == (n, p)
    assert a["neuron_cluster"].shape == (n, d_mlp)
    back = load_analysis(tmp_path / "a")
    assert back.measures.epoch.tolist() == m.epoch.tolist()
    torch.testing.assert_close(
        torch.tensor(back.measures.weight_norm_sq.values), torch.tensor(m.weight_norm_sq.values)
    )
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["n_checkpoints"] == n and "restricted_loss" in summary["variants"]
    assert len(result.frequency_table()) == n * (p - 1) // 2
    assert len(result.clusters()) == d_mlp


def test_second_call_only_computes_new_checkpoints(tiny_run: circuits.Run, tmp_path: Path) -> None:
    root = _copy(tiny_run, tmp_path)
    store = RunStore(root)
    full_manifest = store.read_manifest()
    # Pretend the run is still training: only the first checkpoints exist yet.
    early = dict(list(sorted(full_manifest.items()))[:5])
    store._write_manifest(early)
    first = analyze(root, out=tmp_path / "a", key_freqs=[1, 2])
    assert len(first.measures) == 5
    store._write_manifest(full_manifest)
    calls: list[tuple[int, int]] = []
    second = analyze(root, out=tmp_path / "a", key_freqs=[1, 2], on_progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][1] == len(full_manifest) - 5
    fresh = analyze(root, out=tmp_path / "b", key_freqs=[1, 2])
    assert second.measures.epoch.tolist() == fresh.measures.epoch.tolist()
    for col in ("restricted_loss", "excluded_loss", "gini_embed", "weight_norm_sq"):
        torch.testing.assert_close(
            torch.tensor(second.measures[col].values), torch.tensor(fresh.measures[col].values)
        )
    # A different key set (as when a later checkpoint changes it) recomputes every row.
    calls.clear()
    analyze(root, out=tmp_path / "a", key_freqs=[3], on_progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][1] == len(full_manifest)


def test_damaged_checkpoint_is_named_and_skipped(tiny_run: circuits.Run, tmp_path: Path) -> None:
    root = _copy(tiny_run, tmp_path)
    victim = RunStore(root).checkpoint_path(tiny_run.epochs[2])
    victim.write_bytes(victim.read_bytes()[:50])
    result = analyze(root, out=tmp_path / "a")
    assert tiny_run.epochs[2] not in result.measures.epoch.tolist()
    assert len(result.measures) == len(tiny_run.epochs) - 1
    assert len(result.damaged) == 1 and victim.name in result.damaged[0]
    assert victim.name in json.dumps(result.summary["damaged_checkpoints"])
    cli = run_cli("analyze", str(root), "--out", str(tmp_path / "c"))
    assert cli.returncode == 0 and victim.name in cli.stderr and "Traceback" not in cli.stderr


def test_cli_analyze(tiny_run: circuits.Run, tmp_path: Path) -> None:
    result = run_cli("analyze", str(tiny_run.path), "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert "key frequencies:" in result.stdout and "analysis:" in result.stdout
    assert (tmp_path / "a" / "measures.csv").is_file()
    bad = run_cli("analyze", str(tmp_path / "missing"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# ---- science on the real quick run --------------------------------------------------------


def _first(m, col: str, below: float) -> int:  # noqa: ANN001
    return int(m.epoch[m[col] < below].iloc[0])


def test_key_frequencies_are_few_and_stable(quick_run: circuits.Run, quick_analysis) -> None:  # noqa: ANN001
    key = quick_analysis.key_frequencies
    assert 1 <= len(key) <= 8
    for epoch in quick_run.epochs[-4:]:
        assert _key_set(quick_run, epoch) == key
    sizes = quick_analysis.summary["neuron_cluster_sizes"]
    assert sum(v for k, v in sizes.items() if k != "unassigned") > quick_run.config.model.d_mlp // 2


def test_restricted_loss_falls_well_before_test_loss(quick_analysis) -> None:  # noqa: ANN001
    m = quick_analysis.measures
    for level in (1.0, 0.1, 0.01):
        assert _first(m, "restricted_loss", level) < _first(m, "test_loss", level) - 100


def test_phases_are_ordered_and_match_the_curves(quick_analysis) -> None:  # noqa: ANN001
    m = quick_analysis.measures.set_index("epoch")
    ph = quick_analysis.summary["phases"]
    mem, form, clean = ph["memorisation_end"], ph["circuit_formation_end"], ph["cleanup_end"]
    assert mem is not None and form is not None
    assert mem < form
    # Memorisation: train accuracy perfect, test loss at its peak.
    assert m.loc[mem, "train_acc"] == 1.0 or m.loc[mem, "train_loss"] < 0.05
    assert m.loc[mem, "test_loss"] == m.test_loss.max()
    # Circuit formation: the excluded loss rises while the test loss stays high.
    assert m.loc[form, "excluded_loss"] > 1.5 * m.loc[mem, "excluded_loss"]
    assert m.loc[form, "test_loss"] > 1.0
    # Cleanup: the weight norm falls, the test loss collapses, sparsity rises. The retuned quick
    # preset (issue 21) finishes it inside its schedule (quick-v1 ended cleanup at 2,950 of
    # 3,000 epochs, or not at all), with the test accuracy already up.
    last = int(m.index[-1])
    assert clean is not None and form < clean <= last - 500
    assert m.loc[clean, "weight_norm_sq"] < 0.7 * m.loc[form, "weight_norm_sq"]
    assert m.loc[clean, "test_loss"] < 1e-3 and m.loc[clean, "test_acc"] >= 0.99
    assert m.loc[clean, "gini_embed"] > m.loc[form, "gini_embed"]


def test_columns_equal_the_standalone_measure_functions(tiny_run: circuits.Run, tmp_path: Path) -> None:
    # analyze() shares one projection between several columns; each must still equal the
    # public function a notebook would call.
    from circuits.grid import grid_forward, stack_state_dicts
    from circuits.measures import (
        embed_fourier_norms,
        excluded_loss,
        gini,
        key_logit_fraction,
        restricted_loss,
        weight_norm_sq,
    )

    key = [1, 3]
    result = analyze(tiny_run, out=tmp_path / "a", key_freqs=key)
    m = result.measures.set_index("epoch")
    p, task = tiny_run.config.task.p, tiny_run.task
    for epoch in tiny_run.epochs[::3]:
        sd = tiny_run.state_dict(epoch)
        logits, _ = grid_forward(stack_state_dicts([sd]), p)
        expected = {
            "weight_norm_sq": torch.tensor(weight_norm_sq(sd)),
            "gini_embed": gini(embed_fourier_norms(sd["embed.W_E"], p)[1:]),
            "restricted_loss": restricted_loss(logits[0], task.labels, p, key),
            "excluded_loss": excluded_loss(logits[0], task.labels, p, key, task.train_idx),
            "key_logit_frac": key_logit_fraction(logits[0], p, key),
        }
        for col, value in expected.items():
            assert m.loc[epoch, col] == pytest.approx(value.item(), rel=1e-6, abs=1e-9), (epoch, col)


def _measures_from_hooked_model(run: circuits.Run, epoch: int, key: list[int]) -> tuple[dict, dict]:
    """Every column and array of one checkpoint, from the hooked model's own forward
    (``run_with_cache`` on all p^2 inputs) and the public measure functions, one at a time."""
    from circuits.grid import stack_state_dicts
    from circuits.measures import (
        accuracy,
        circuit_efficiency,
        circuit_norms_sq,
        cross_entropy,
        embed_fourier_norms,
        excluded_logits,
        gini,
        key_logit_fraction,
        logit_parts,
        neuron_clusters,
        neuron_frequency_fractions,
        neuron_logit_fourier_norms,
        part_logit_stats,
        restricted_logits,
        sum_direction_share,
        weight_norms_sq,
    )

    task, p = run.task, run.config.task.p
    model = run.model(epoch, exact=True)
    with torch.no_grad():
        out, cache = model.run_with_cache(task.tokens)
    logits, post = out[:, -1], cache["blocks.0.mlp.hook_post"][:, -1]
    labels, valid = task.labels, torch.nonzero(task.valid).squeeze(1)
    cols: dict[str, float] = {}
    for split, idx in (("train", task.train_idx), ("test", task.test_idx)):
        cols[f"{split}_loss"] = cross_entropy(logits[idx], labels[idx]).item()
        cols[f"{split}_acc"] = accuracy(logits[idx], labels[idx]).item()
    restricted = restricted_logits(logits, p, key)[valid]
    cols["restricted_loss"] = cross_entropy(restricted, labels[valid]).item()
    cols["restricted_acc"] = accuracy(restricted, labels[valid]).item()
    excluded = excluded_logits(logits, p, key)[task.train_idx]
    cols["excluded_loss"] = cross_entropy(excluded, labels[task.train_idx]).item()
    cols["excluded_acc"] = accuracy(excluded, labels[task.train_idx]).item()
    sd = run.state_dict(epoch)
    emb = embed_fourier_norms(sd["embed.W_E"], p)
    nl = neuron_logit_fourier_norms(sd["blocks.0.mlp.W_out"], sd["unembed.W_U"])
    cols["gini_embed"], cols["gini_neuron_logit"] = gini(emb[1:]).item(), gini(nl[1:]).item()
    norms = weight_norms_sq(sd)
    cols.update({f"norm_sq.{k}": v for k, v in norms.items()})
    cols["weight_norm_sq"] = sum(norms.values())
    cols["key_logit_frac"] = key_logit_fraction(logits, p, key).item()
    cols["gen_share"] = cols["key_logit_frac"] ** 0.5
    cols["gen_share_all"] = sum_direction_share(logits, p, None).item()
    fractions = neuron_frequency_fractions(post, p)
    cluster, best = neuron_clusters(fractions)
    nkf = fractions[:, [k - 1 for k in key]].sum(-1)
    cols["neuron_key_frac"] = nkf.double().mean().item()
    cols["n_clustered_neurons"] = float((cluster > 0).sum())
    bias, gen, mem = logit_parts(logits, p, key)
    for name, part in (("gen", gen), ("mem", mem)):
        for split, idx in (("train", task.train_idx), ("test", task.test_idx)):
            logit, margin = part_logit_stats(part, labels, idx)
            cols[f"{name}_logit_{split}"], cols[f"{name}_margin_{split}"] = logit.item(), margin.item()
    parts = circuit_norms_sq(stack_state_dicts([sd]), p, key, nkf[None])
    cols.update({k: v.item() for k, v in parts.items()})
    for name in ("gen", "mem"):
        cols[f"{name}_efficiency"] = circuit_efficiency(
            torch.tensor(cols[f"{name}_margin_train"]), torch.tensor(cols[f"{name}_norm_sq"])
        ).item()
    # The memorising part's chance level: the same split of the initial weights.
    with torch.no_grad():
        _, cache0 = run.model(0, exact=True).run_with_cache(task.tokens)
    nkf0 = neuron_frequency_fractions(cache0["blocks.0.mlp.hook_post"][:, -1], p)[:, [k - 1 for k in key]].sum(-1)
    init = circuit_norms_sq(stack_state_dicts([run.state_dict(0)]), p, key, nkf0[None])["mem_norm_sq"].item()
    cols["mem_norm_sq_init"], cols["mem_norm_sq_excess"] = init, cols["mem_norm_sq"] - init
    arrays = {"embed_fourier_norms": emb, "neuron_logit_fourier_norms": nl, "neuron_cluster": cluster,
              "neuron_best_frac": best, "neuron_key_frac": nkf}
    return cols, arrays


def _assert_matches_hooked_model(analysis, run: circuits.Run, epochs: list[int]) -> None:  # noqa: ANN001
    m = analysis.measures.set_index("epoch")
    all_epochs = analysis.arrays["epochs"].tolist()
    assert set(m.columns) >= set(MEASURE_COLUMNS) - {"epoch"}
    for epoch in epochs:
        cols, arrays = _measures_from_hooked_model(run, epoch, analysis.key_frequencies)
        assert set(cols) == set(m.columns), set(cols) ^ set(m.columns)
        for col, value in cols.items():
            assert m.loc[epoch, col] == pytest.approx(value, rel=2e-5, abs=2e-6), (epoch, col)
        i = all_epochs.index(epoch)
        for name, value in arrays.items():
            got = analysis.arrays[name][i]
            if name == "neuron_cluster":
                assert torch.equal(got, value.to(got.dtype)), (epoch, name)
            else:
                torch.testing.assert_close(got.double(), value.double(), rtol=2e-5, atol=2e-6)


def test_every_column_and_array_equals_the_hooked_models_measures(
    tiny_run: circuits.Run, tmp_path: Path
) -> None:
    # The analysis pass computes everything from shared reductions over the (a, b) grid; each
    # number must still be what a notebook gets from the hooked model's own forward and the
    # public measure functions.
    result = analyze(tiny_run, out=tmp_path / "a", key_freqs=[1, 3], batch_size=3)
    _assert_matches_hooked_model(result, tiny_run, tiny_run.epochs[::2])


@pytest.mark.parametrize("block_rows", [1, 3, 4])
def test_row_blocks_give_the_whole_grid_result(tiny_run: circuits.Run, block_rows: int) -> None:
    # Blocks of a rows (p = 11: 11 blocks of 1, or 3 + 3 + 3 + 2, or 4 + 4 + 3) accumulate the
    # same sums as the whole grid in one block, up to float32 rounding (the matmuls' own
    # summation order depends on the block's size).
    from circuits.analysis import _init_weights, _measure_chunk
    from circuits.grid import stack_state_dicts

    params = stack_state_dicts([tiny_run.state_dict(e) for e in tiny_run.epochs[-3:]])
    init = _init_weights(tiny_run)
    whole_cols, whole_arrays = _measure_chunk(tiny_run, params, [1, 3], block_rows=tiny_run.config.task.p, init=init)
    cols, arrays = _measure_chunk(tiny_run, params, [1, 3], block_rows=block_rows, init=init)
    assert set(cols) == set(whole_cols)
    for name, value in whole_cols.items():
        torch.testing.assert_close(cols[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in whole_arrays.items():
        torch.testing.assert_close(arrays[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_grokked_checkpoint_equals_the_hooked_models_measures(
    quick_run: circuits.Run, quick_analysis  # noqa: ANN001
) -> None:
    # A grokked network: clustered neurons, key frequencies, near-zero training loss.
    assert quick_analysis.measures.n_clustered_neurons.iloc[-1] > 0
    _assert_matches_hooked_model(quick_analysis, quick_run, [quick_run.epochs[-1], quick_run.epochs[len(quick_run.epochs) // 2]])
