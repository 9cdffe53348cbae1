"""Figure builders: each panel's traces against the analysis table they were drawn from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import circuits
from circuits import plots
from circuits.analysis import Analysis, analyze
from circuits.dashboard import choose_neurons, grid_activations, grid_frames, run_figures
from circuits.grid import stack_state_dicts
from circuits.fourier import frequency_norms


@pytest.fixture(scope="module")
def analysis(tiny_run: circuits.Run, tmp_path_factory: pytest.TempPathFactory) -> Analysis:
    # key_freqs given: the tiny run only memorises, so detection would find none to mark.
    return analyze(tiny_run, out=tmp_path_factory.mktemp("a") / "tiny", key_freqs=[1, 3], write=False)


def _close(got: object, want: object) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-6, atol=1e-7)


PHASES = {"memorisation_end": 15, "circuit_formation_end": 40, "cleanup_end": None}


def test_losses_and_accuracies_follow_the_table(analysis: Analysis) -> None:
    m = analysis.measures
    fig = plots.plot_losses(m, PHASES)
    assert [t.name for t in fig.data] == [plots.SPLIT_LABELS[s] for s in plots.SPLITS]
    for trace, split in zip(fig.data, plots.SPLITS, strict=True):
        assert list(trace.x) == m.epoch.tolist()
        _close(trace.y, m[f"{split}_loss"].astype(np.float32))
        assert trace.line.color == plots.PALETTE[split]
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.xaxis.title.text == "epoch" and "nats" in fig.layout.yaxis.title.text
    # Hover: the unified box is headed by the epoch and lists each value.
    assert fig.layout.hovermode == "x unified" and "epoch" in fig.layout.xaxis.unifiedhovertitle.text
    assert all("%{y" in t.hovertemplate for t in fig.data)
    # Three phases: memorisation, circuit formation, cleanup still going (its end is None).
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert [(r.x0, r.x1) for r in rects] == [(0, 15), (15, 40), (40, m.epoch.max())]
    labels = " ".join(a.text for a in fig.layout.annotations)
    assert "memorisation" in labels and "circuit formation" in labels and "cleanup (ongoing)" in labels

    acc = plots.plot_accuracies(m, PHASES)
    assert [t.name for t in acc.data][:2] == ["train", "test"]
    for trace, split in zip(acc.data, plots.SPLITS, strict=True):
        _close(trace.y, m[f"{split}_acc"].astype(np.float32))
        assert trace.line.color == plots.PALETTE[split]  # the same colour as on the loss panel
    assert [t.visible for t in acc.data] == [True, True, "legendonly", "legendonly"]


def test_phase_spans_handle_missing_boundaries() -> None:
    assert plots.phase_spans(None, 0, 100) == []
    assert plots.phase_spans({"memorisation_end": None, "circuit_formation_end": None, "cleanup_end": None}, 0, 100) == []
    assert plots.phase_spans({"memorisation_end": 10, "circuit_formation_end": None, "cleanup_end": None}, 0, 100) == [
        ("memorisation", 0.0, 10.0, True), ("circuit formation", 10.0, 100.0, False)
    ]
    full = plots.phase_spans({"memorisation_end": 10, "circuit_formation_end": 50, "cleanup_end": 70}, 0, 100)
    assert [s[0] for s in full] == ["memorisation", "circuit formation", "cleanup"] and all(s[3] for s in full)


def test_fourier_heatmap_is_the_merged_frequency_norms(analysis: Analysis) -> None:
    a = analysis.arrays
    fig = plots.plot_fourier_heatmap(a["epochs"], a["embed_fourier_norms"], analysis.key_frequencies)
    (hm,) = fig.data
    want = frequency_norms(a["embed_fourier_norms"]).T  # [freq, ckpt], from the library's own helper
    assert np.asarray(hm.z).shape == tuple(want.shape)
    _close(hm.z, want)
    assert list(hm.x) == a["epochs"].tolist() and list(hm.y) == list(range(1, want.shape[0] + 1))
    assert "epoch %{x}" in hm.hovertemplate and "%{z" in hm.hovertemplate
    # Key frequencies are marked on the frequency axis.
    marked = [v for v, t in zip(fig.layout.yaxis.tickvals, fig.layout.yaxis.ticktext, strict=True) if "▶" in t]
    assert marked == analysis.key_frequencies


def test_gini_norms_and_key_share(analysis: Analysis) -> None:
    m = analysis.measures
    g = plots.plot_gini(m)
    assert [t.name for t in g.data] == ["embedding W_E", "neuron-logit map W_L"]
    _close(g.data[0].y, m.gini_embed.astype(np.float32))
    _close(g.data[1].y, m.gini_neuron_logit.astype(np.float32))
    w = plots.plot_weight_norms(m)
    assert w.data[0].name == "total"
    _close(w.data[0].y, m.weight_norm_sq.astype(np.float32))
    per_param = {t.name: t for t in w.data[1:]}
    assert "mlp.W_in" in per_param and "embed.W_E" in per_param
    _close(per_param["mlp.W_in"].y, m["norm_sq.blocks.0.mlp.W_in"].astype(np.float32))
    assert w.layout.yaxis.type == "log"
    k = plots.plot_key_share(m)
    assert [t.name for t in k.data] == ["logits", "neurons (mean)"]
    _close(k.data[0].y, m.key_logit_frac.astype(np.float32))


def _circuit_table(n: int = 30) -> pd.DataFrame:
    epochs = np.arange(n) * 10
    return pd.DataFrame({
        "epoch": epochs,
        "train_loss": np.linspace(3, 0.01, n),
        "mem_norm": np.linspace(10, 1, n),
        "gen_norm": np.linspace(0.1, 8, n),
        "mem_efficiency": np.linspace(2, 0.5, n),
        "gen_efficiency": np.full(n, 1.5),
        "gen_logit_share": np.linspace(0, 1, n),  # only one circuit measured: still drawn
    })


def test_circuit_panel_draws_the_mem_and_gen_columns() -> None:
    m = _circuit_table()
    groups = plots.circuit_columns(m)
    assert groups == {
        "norm": {"mem": "mem_norm", "gen": "gen_norm"},
        "efficiency": {"mem": "mem_efficiency", "gen": "gen_efficiency"},
        "logit_share": {"gen": "gen_logit_share"},
    }
    assert plots.circuit_quantities(m) == (["norm", "efficiency"], ["logit_share"])
    # By default: the norm and efficiency quantities, efficiency first, one subplot each.
    fig = plots.plot_circuits(m)
    by_column = {t.meta: t for t in fig.data}
    assert set(by_column) == {"mem_efficiency", "gen_efficiency", "mem_norm", "gen_norm"}
    for column, trace in by_column.items():
        _close(trace.y, m[column])
        assert len(trace.x) == len(m)
        circuit = column.split("_")[0]
        assert trace.name == {"mem": "memorising", "gen": "generalising"}[circuit]
        assert trace.line.color == plots.PALETTE[circuit]
    assert by_column["mem_efficiency"].xaxis == by_column["gen_efficiency"].xaxis == "x"
    assert by_column["mem_norm"].xaxis == "x2"
    assert [a.text for a in fig.layout.annotations[:2]] == ["efficiency", "norm"]
    assert sum(bool(t.showlegend) for t in fig.data) == 2  # one legend entry per circuit
    # Any other quantity on request; one measured for one circuit only is drawn alone.
    other = plots.plot_circuits(m, quantities=["logit_share"])
    assert [t.meta for t in other.data] == ["gen_logit_share"]
    with pytest.raises(ValueError, match="mem_"):
        plots.plot_circuits(m[["epoch", "train_loss"]])
    with pytest.raises(ValueError, match="margin"):
        plots.plot_circuits(m, quantities=["margin"])


def test_circuit_panel_joins_the_run_figures_only_when_columns_exist(analysis: Analysis) -> None:
    plain = analysis.measures[[c for c in analysis.measures if not c.startswith(("mem_", "gen_"))]]
    figs = run_figures(Analysis(analysis.path, plain, analysis.arrays, analysis.summary))
    assert "circuits" not in figs and "circuit_details" not in figs
    only_main = plain.assign(mem_norm=1.0, gen_norm=2.0)
    figs = run_figures(Analysis(analysis.path, only_main, analysis.arrays, analysis.summary))
    assert "circuits" in figs and "circuit_details" not in figs
    both = only_main.assign(gen_margin=3.0, mem_margin=0.5)
    figs = run_figures(Analysis(analysis.path, both, analysis.arrays, analysis.summary))
    assert {t.meta for t in figs["circuit_details"].data} == {"gen_margin", "mem_margin"}


def test_frame_indices() -> None:
    assert plots.frame_indices(0) == []
    assert plots.frame_indices(7, 50) == list(range(7))
    idx = plots.frame_indices(500, 50, keep=[3, 137])
    assert len(idx) <= 50 and idx[0] == 0 and idx[-1] == 499 and {3, 137} <= set(idx)
    assert idx == sorted(set(idx))


def test_slider_panels_have_one_frame_per_shown_checkpoint(analysis: Analysis) -> None:
    a = analysis.arrays
    epochs = a["epochs"].tolist()
    idx = [0, 2, 5, len(epochs) - 1]
    fig = plots.plot_fourier_norms(a["epochs"], a["embed_fourier_norms"], analysis.key_frequencies, idx)
    assert [f.name for f in fig.frames] == [str(epochs[i]) for i in idx]
    for f, i in zip(fig.frames, idx, strict=True):
        _close(f.data[0].y, a["embed_fourier_norms"][i])
        assert f"epoch {epochs[i]:,}" in f.data[0].hovertemplate
    _close(fig.data[0].y, a["embed_fourier_norms"][idx[-1]])  # opens on the last frame
    assert len(fig.layout.sliders[0].steps) == len(idx)
    # Key frequencies' cos and sin bars are highlighted.
    colors = list(fig.data[0].marker.color)
    p = a["embed_fourier_norms"].shape[1]
    hot = {i for i in range(p) if colors[i] == plots.PALETTE["key"]}
    assert hot == {2 * k - 1 for k in analysis.key_frequencies} | {2 * k for k in analysis.key_frequencies}

    clusters = plots.plot_neuron_clusters(a["epochs"], a["neuron_cluster"], analysis.key_frequencies, idx, n_freq=5)
    assert list(clusters.data[0].x) == ["1", "2", "3", "4", "5", "none"]
    d_mlp = a["neuron_cluster"].shape[1]
    for f, i in zip(clusters.frames, idx, strict=True):
        row = a["neuron_cluster"][i]
        want = [int((row == k).sum()) for k in range(1, 6)] + [int((row < 0).sum())]
        assert list(f.data[0].y) == want and sum(want) == d_mlp


def test_grid_panels_match_the_hooked_model(tiny_run: circuits.Run, analysis: Analysis) -> None:
    neurons = choose_neurons(analysis, 3)
    assert len(neurons) == 3 and len({n for n, _ in neurons}) == 3
    ids = [n for n, _ in neurons]
    epochs = tiny_run.epochs[::4]
    grid = grid_frames(tiny_run, epochs, ids)
    p, heads = tiny_run.config.task.p, tiny_run.config.model.n_heads
    assert grid["epochs"] == epochs
    assert grid["acts"].shape == (len(epochs), p, p, 3) and grid["attention"].shape == (len(epochs), p, p, heads)
    # The fast grid path equals the hooked model's cache.
    e = epochs[-1]
    _, cache = tiny_run.model(e, exact=True).run_with_cache(tiny_run.task.tokens)
    post = cache["blocks.0.mlp.hook_post"][:, -1][:, ids].reshape(p, p, 3)
    pattern = cache["blocks.0.attn.hook_pattern"][:, :, -1, 0].reshape(p, p, heads)
    torch.testing.assert_close(torch.from_numpy(grid["acts"][-1]), post, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(grid["attention"][-1]), pattern, rtol=1e-4, atol=1e-6)
    gelu, _ = grid_activations(stack_state_dicts([tiny_run.state_dict(e)]), p, ids, "gelu")
    assert gelu.shape == (1, p, p, 3)

    fig = plots.plot_neuron_activations(grid["epochs"], grid["acts"], ids, [k for _, k in neurons])
    assert len(fig.data) == 3 and [f.name for f in fig.frames] == [str(x) for x in epochs]
    for f, i in zip(fig.frames, range(len(epochs)), strict=True):
        for j in range(3):
            _close(f.data[j].z, grid["acts"][i, :, :, j])
            assert f"epoch {epochs[i]:,}" in f.data[j].hovertemplate
    att = plots.plot_attention_patterns(grid["epochs"], grid["attention"])
    assert len(att.data) == heads and all(t.zmin == 0 and t.zmax == 1 for t in att.data)
    _close(att.frames[0].data[1].z, grid["attention"][0, :, :, 1])


def test_comparison_overlays_runs(analysis: Analysis) -> None:
    m = analysis.measures
    runs = {"wd=1": m, "wd=0.3": m.assign(test_loss=m.test_loss * 2)}
    fig = plots.plot_comparison(runs, ["test_loss", "train_loss"], "Loss", "loss", log_y=True)
    assert [t.name for t in fig.data] == [
        "wd=1 · test loss", "wd=1 · train loss", "wd=0.3 · test loss", "wd=0.3 · train loss"
    ]
    _close(fig.data[2].y, (m.test_loss * 2).astype(np.float32))
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    assert fig.data[0].line.dash == "solid" and fig.data[1].line.dash == "dash"


def test_experiment_builders() -> None:
    sizes = [200, 400, 800, 1600, 3200]
    eff = pd.DataFrame(
        [{"dataset_size": d, "circuit": "mem", "efficiency": 4000 / d, "seed": s} for d in sizes for s in (0, 1)]
        + [{"dataset_size": d, "circuit": "gen", "efficiency": 2.5, "seed": s} for d in sizes for s in (0, 1)]
    )
    fig = plots.plot_efficiency_vs_dataset_size(eff)
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    assert set(lines) == {"memorising", "generalising"}
    _close(lines["memorising"].y, [4000 / d for d in sizes])
    crit = [a.text for a in fig.layout.annotations if "D_crit" in a.text]
    assert crit and crit[0] == "D_crit ≈ 1,600"  # 4000 / D = 2.5 at D = 1600
    with pytest.raises(ValueError, match="efficiency"):
        plots.plot_efficiency_vs_dataset_size(eff.drop(columns="efficiency"))

    ung = pd.DataFrame({"dataset_size": sizes * 2, "test_acc": [0.1, 0.2, 0.9, 1.0, 1.0] * 2,
                        "weight_decay": [1.0] * 5 + [0.3] * 5})
    fig = plots.plot_ungrokking(ung, critical_size=600)
    assert [t.name for t in fig.data] == ["wd=0.3", "wd=1"]
    _close(fig.data[1].y, [0.1, 0.2, 0.9, 1.0, 1.0])

    sweep = pd.DataFrame([
        {"dataset_size": d, "weight_decay": wd, "zone": "grokking" if d * wd >= 800 else "memorisation",
         "grok_epoch": 1000 + d * wd, "seed": s}
        for d in sizes for wd in (0.1, 0.3, 1.0) for s in (0, 1)
    ])
    zones = plots.plot_zone_map(sweep)
    (hm,) = zones.data
    assert list(hm.x) == ["200", "400", "800", "1600", "3200"] and list(hm.y) == ["0.1", "0.3", "1"]
    names = list(hm.colorbar.ticktext)
    z = np.asarray(hm.z)
    assert names[int(z[2, 4])] == "grokking" and names[int(z[0, 0])] == "memorisation"  # wd=1, D=3200 / wd=0.1, D=200
    ph = plots.plot_phase_diagram(sweep, "grok_epoch", log_color=True)
    (hm,) = ph.data
    _close(np.asarray(hm.customdata)[1, 2], 1000 + 800 * 0.3)  # mean over seeds at wd=0.3, D=800
    _close(np.asarray(hm.z)[1, 2], np.log10(1000 + 800 * 0.3))
