"""The data behind a run page's per-checkpoint panels, and the run page's figures.

Which neurons to show, their activations over the (a, b) grid at the shown checkpoints, and
every figure of the run dashboard (Nanda et al. 2023, "Progress measures for grokking via
mechanistic interpretability", §4-5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go

from circuits import plots

if TYPE_CHECKING:
    from circuits.analysis import Analysis
    from circuits.run import Run

MAX_FRAMES = 50
#: Bytes of quantised heatmap frames a run page may hold (15 MB limit; plotly.js takes 1.5 MB).
GRID_BUDGET = 7_000_000


def choose_neurons(analysis: Analysis, n: int = 4) -> list[tuple[int, int]]:
    """``n`` neurons worth watching, as ``(neuron, frequency or -1)``.

    For each key frequency in turn, the neuron of that cluster (at the last checkpoint) whose
    variance is most concentrated in it; then the most concentrated neurons left over.
    """
    if "neuron_cluster" not in analysis.arrays:  # analysed without the neurons measures
        return []
    cluster = np.asarray(analysis.arrays["neuron_cluster"])
    best = np.asarray(analysis.arrays["neuron_best_frac"])
    if not len(cluster):
        return []
    last_c, last_b = cluster[-1], best[-1]
    chosen: list[tuple[int, int]] = []
    for k in analysis.key_frequencies:
        members = np.nonzero(last_c == k)[0]
        if len(members) and len(chosen) < n:
            i = int(members[np.argmax(last_b[members])])
            chosen.append((i, int(k)))
    for i in np.argsort(-last_b, kind="stable"):
        if len(chosen) >= n:
            break
        if int(i) not in {c[0] for c in chosen}:
            chosen.append((int(i), int(last_c[i])))
    return chosen


def grid_activations(
    params: Mapping[str, Any], p: Any, neurons: Sequence[int], act_fn: str = "relu"
) -> tuple[Any, Any]:
    """MLP activations of a few ``neurons`` and the attention to a, over the (a, b) grid.

    ``p``: the task (its elements and '=' token; :data:`circuits.grid.Layout`), or a modular
    task's modulus.

    ``params`` are stacked checkpoints (:func:`circuits.grid.stack_state_dicts`).
    Returns ``(acts [ckpt, a, b, len(neurons)], attention [ckpt, a, b, head])``: equal to the
    hooked model's ``blocks.0.mlp.hook_post[:, -1, neurons]`` and
    ``blocks.0.attn.hook_pattern[:, :, -1, 0]`` (tested). Only the chosen neurons' columns of
    W_in are used, so every product is small: the attention output is projected onto them
    before it is summed over (a, b).
    """
    import torch
    import torch.nn.functional as F

    from circuits.grid import grid_layout, grid_pattern

    n, eq = grid_layout(p)  # a task, or a modular task's p
    pattern = grid_pattern(params, p)  # [k, a, b, h, 3]
    W_E, W_pos = params["embed.W_E"], params["pos_embed.W_pos"]
    W_V, W_O = params["blocks.0.attn.W_V"], params["blocks.0.attn.W_O"]
    b_V, b_O = params["blocks.0.attn.b_V"], params["blocks.0.attn.b_O"]
    idx = torch.tensor([int(n) for n in neurons], dtype=torch.long)
    W_in, b_in = params["blocks.0.mlp.W_in"][..., idx], params["blocks.0.mlp.b_in"][..., idx]
    OI = torch.einsum("khem,kmn->khen", W_O, W_in)  # W_O then W_in: [k, h, d_head, n]
    r0 = W_E[:, :n] + W_pos[:, None, 0]
    r1 = W_E[:, :n] + W_pos[:, None, 1]
    r2 = W_E[:, eq] + W_pos[:, 2]
    v0 = torch.einsum("ktd,khde->kthe", r0, W_V) + b_V[:, None]
    v1 = torch.einsum("ktd,khde->kthe", r1, W_V) + b_V[:, None]
    v2 = torch.einsum("kd,khde->khe", r2, W_V) + b_V
    a0 = torch.einsum("kthe,khen->kthn", v0, OI)  # value of a, as seen by the neurons
    a1 = torch.einsum("kthe,khen->kthn", v1, OI)
    a2 = torch.einsum("khe,khen->khn", v2, OI)
    const = torch.einsum("kd,kdn->kn", r2 + b_O, W_in) + b_in  # residual of '=' itself
    pre = (
        torch.einsum("kabh,kahn->kabn", pattern[..., 0], a0)
        + torch.einsum("kabh,kbhn->kabn", pattern[..., 1], a1)
        + torch.einsum("kabh,khn->kabn", pattern[..., 2], a2)
        + const[:, None, None]
    )
    post = F.relu(pre) if act_fn == "relu" else F.gelu(pre)
    return post, pattern[..., 0]


def family_figures(analysis: Analysis) -> dict[str, go.Figure]:
    """A curve panel for each measure family beyond the built-in ones that the analysis
    computed (``family:<name>``): a newly registered measure shows up with no edit here."""
    from circuits.analysis import BUILTIN_MEASURES
    from circuits.measures import families

    phases = analysis.summary.get("phases")
    computed = analysis.summary.get("measures", [])
    figs = {}
    for f in families():
        if f.name in BUILTIN_MEASURES or f.name not in computed:
            continue
        cols = {c.name: f"{c.name} ({c.unit})" if c.unit else c.name for c in f.columns
                if c.name in analysis.measures}
        units = {c.name: c.unit for c in f.columns}
        if cols:
            figs[f"family:{f.name}"] = plots.plot_measure_columns(analysis.measures, cols, f.doc or f.name, phases,
                                                                  units)
    return figs


def grid_frames(
    run: Run, epochs: Sequence[int], neurons: Sequence[int], batch_size: int = 16
) -> dict[str, Any]:
    """Neuron activations and attention over the (a, b) grid at ``epochs`` of ``run``.

    Returns ``epochs`` (those whose checkpoint loaded; a damaged one is skipped), ``acts``
    ``[frame, p, p, len(neurons)]`` and ``attention`` ``[frame, p, p, head]``
    (:func:`grid_activations`).
    """
    import torch

    from circuits.grid import stack_state_dicts
    from circuits.errors import CheckpointError

    layout, act_fn = run.config.task, run.config.model.act_fn
    keep: list[int] = []
    acts: list[np.ndarray] = []
    attn: list[np.ndarray] = []
    sds: list[Any] = []

    def flush() -> None:
        if sds:
            with torch.no_grad():
                post, pattern = grid_activations(stack_state_dicts(sds), layout, neurons, act_fn)
            acts.append(post.float().numpy())
            attn.append(pattern.float().numpy())
            sds.clear()

    for epoch in epochs:
        try:
            sds.append(run.state_dict(int(epoch)))
        except CheckpointError:
            continue
        keep.append(int(epoch))
        if len(sds) == batch_size:
            flush()
    flush()
    n_heads, n = run.config.model.n_heads, layout.n_elements
    return {
        "epochs": keep,
        "acts": np.concatenate(acts) if acts else np.zeros((0, n, n, len(neurons)), np.float32),
        "attention": np.concatenate(attn) if attn else np.zeros((0, n, n, n_heads), np.float32),
    }


def frame_budget(p: int, panels: int, max_frames: int) -> int:
    """How many grid frames fit the page's byte budget for ``panels`` p x p heatmaps (at least 2)."""
    per_frame = p * p * max(panels, 1) * 4 / 3  # one byte a value, base64
    return max(2, min(max_frames, int(GRID_BUDGET // per_frame)))


def frame_epochs(analysis: Analysis, max_frames: int) -> list[int]:
    """The epochs the slider shows: evenly spread, always including the phase boundaries."""
    epochs = [int(e) for e in np.asarray(analysis.arrays["epochs"])]
    phases = analysis.summary.get("phases") or {}
    marks = [v for v in phases.values() if v is not None]
    keep = [epochs.index(m) for m in marks if m in epochs]
    return [epochs[i] for i in plots.frame_indices(len(epochs), max_frames, keep)]


def run_figures(
    analysis: Analysis, grid: Mapping[str, Any] | None = None, max_frames: int = MAX_FRAMES,
    neurons: Sequence[tuple[int, int]] = (),
) -> dict[str, go.Figure]:
    """Every panel of the run dashboard, by name; per-checkpoint panels share their frames.

    ``grid`` is :func:`grid_frames`'s result (without it the activation and attention panels
    are left out); ``neurons`` the ``(neuron, frequency)`` pairs it was computed for.
    """
    m, a = analysis.measures, analysis.arrays
    phases = analysis.summary.get("phases")
    key = [int(k) for k in analysis.key_frequencies]
    figs: dict[str, go.Figure] = {
        "losses": plots.plot_losses(m, phases),
        "accuracies": plots.plot_accuracies(m, phases),
    }
    if "embed_fourier_norms" in a:
        figs["fourier_heatmap"] = plots.plot_fourier_heatmap(a["epochs"], a["embed_fourier_norms"], key)
    figs["gini"] = plots.plot_gini(m, phases)
    figs["weight_norms"] = plots.plot_weight_norms(m, phases)
    figs["key_share"] = plots.plot_key_share(m, phases)
    figs.update(family_figures(analysis))
    main, rest = plots.circuit_quantities(m)
    if main or rest:
        figs["circuits"] = plots.plot_circuits(m, phases)
        if main and rest:
            figs["circuit_details"] = plots.plot_circuits(
                m, phases, rest, title="Memorising vs generalising circuit: the other measures"
            )
    epochs = [int(e) for e in np.asarray(a["epochs"])]
    if grid is not None and len(grid["epochs"]):
        shown = [int(e) for e in grid["epochs"]]
    else:
        shown = frame_epochs(analysis, max_frames)
    idx = [epochs.index(e) for e in shown if e in epochs]
    if "embed_fourier_norms" in a:
        figs["embed_fourier"] = plots.plot_fourier_norms(a["epochs"], a["embed_fourier_norms"], key, idx)
        figs["neuron_logit_fourier"] = plots.plot_fourier_norms(
            a["epochs"], a["neuron_logit_fourier_norms"], key, idx,
            title="Neuron-logit map W_L = W_out W_U in the Fourier basis", what="‖W_L‖",
        )
    if "neuron_cluster" in a:
        p = int(np.asarray(a["embed_fourier_norms"]).shape[-1]) if "embed_fourier_norms" in a else None
        n_freq = (p - 1) // 2 if p is not None else None
        figs["clusters"] = plots.plot_neuron_clusters(a["epochs"], a["neuron_cluster"], key, idx, n_freq=n_freq)
    if grid is not None and len(grid["epochs"]):
        figs["neurons"] = plots.plot_neuron_activations(
            grid["epochs"], grid["acts"], [n for n, _ in neurons], [k for _, k in neurons]
        )
        figs["attention"] = plots.plot_attention_patterns(grid["epochs"], grid["attention"])
    return figs
