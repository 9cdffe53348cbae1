"""Figure builders: analysis tables and arrays -> plotly ``Figure``. No IO, no torch.

Every panel of the dashboards is one ``plot_*`` function that a notebook calls the same way::

    analysis = circuits.analyze(run)
    plots.plot_losses(analysis.measures, analysis.summary["phases"]).show()
    plots.plot_fourier_heatmap(analysis.arrays["epochs"], analysis.arrays["embed_fourier_norms"],
                               analysis.key_frequencies).show()

The measures are those of Nanda et al. (2023), "Progress measures for grokking via mechanistic
interpretability" (restricted and excluded loss §5.1, Gini sparsity and weight norm §5.1, the
phases §5.2, Fourier norms and neuron clusters §4); the experiment panels follow Varma et al.
(2023), "Explaining grokking through circuit efficiency". Arrays may be numpy arrays or CPU
torch tensors. One colour means one thing on every panel: :data:`PALETTE`.

Per-checkpoint panels (``plot_fourier_norms``, ``plot_neuron_clusters``,
``plot_neuron_activations``, ``plot_attention_patterns``) carry one plotly frame per shown
checkpoint, named by its epoch, and their own slider; the dashboard drives all of them from
one epoch slider instead.
"""

from circuits.plots.curves import (
    circuit_columns,
    circuit_quantities,
    plot_accuracies,
    plot_circuits,
    plot_fourier_heatmap,
    plot_gini,
    plot_key_share,
    plot_losses,
    plot_measure_columns,
    plot_weight_norms,
)
from circuits.plots.experiments import (
    plot_capacity,
    plot_emergence,
    plot_comparison,
    plot_efficiency_vs_dataset_size,
    plot_phase_diagram,
    plot_reference_circuits,
    plot_sweep_curve,
    plot_ungrokking,
    plot_zone_map,
)
from circuits.plots.snapshots import (
    plot_attention_patterns,
    plot_fourier_norms,
    plot_neuron_activations,
    plot_neuron_clusters,
)
from circuits.plots.style import (
    LINE,
    PALETTE,
    PHASE_COLORS,
    RUN_COLORS,
    SPLIT_LABELS,
    SPLITS,
    ZONE_COLORS,
    frame_indices,
    phase_spans,
)

__all__ = [
    "PALETTE",
    "RUN_COLORS",
    "LINE",
    "SPLITS",
    "SPLIT_LABELS",
    "PHASE_COLORS",
    "ZONE_COLORS",
    "plot_sweep_curve",
    "frame_indices",
    "phase_spans",
    "plot_losses",
    "plot_accuracies",
    "plot_fourier_heatmap",
    "plot_gini",
    "plot_weight_norms",
    "plot_key_share",
    "plot_measure_columns",
    "circuit_columns",
    "circuit_quantities",
    "plot_circuits",
    "plot_fourier_norms",
    "plot_neuron_clusters",
    "plot_neuron_activations",
    "plot_attention_patterns",
    "plot_comparison",
    "plot_efficiency_vs_dataset_size",
    "plot_reference_circuits",
    "plot_capacity",
    "plot_emergence",
    "plot_ungrokking",
    "plot_zone_map",
    "plot_phase_diagram",
]
