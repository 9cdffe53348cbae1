"""Figures -> one self-contained HTML file: the run, comparison and experiment dashboards.

``write_run_dashboard(analysis)`` writes ``dashboard.html`` beside ``measures.csv`` (``circuits
analyze`` calls it; so does ``circuits dashboard RUN_DIR``). The file embeds plotly.js and every
number it shows: it opens from ``file://`` with no network. Per-checkpoint panels share one
epoch slider; their frames are downsampled to at most :data:`MAX_FRAMES` checkpoints (the page
says so), and large heatmap frames are stored as 8-bit levels of their own range (1/255 of the
range, below what a colour scale shows), so a 500-checkpoint p = 113 run stays under 15 MB.

Panels follow Nanda et al. (2023), "Progress measures for grokking via mechanistic
interpretability"; the experiment page follows Varma et al. (2023), "Explaining grokking through
circuit efficiency". The figures themselves come from :mod:`circuits.plots`.
"""


from circuits.dashboard.figures import (
    MAX_FRAMES,
    choose_neurons,
    grid_activations,
    grid_frames,
    run_figures,
)
from circuits.dashboard.render import plotly_js
from circuits.dashboard.writers import (
    DASHBOARD_FILE,
    comparison_name,
    write_comparison_dashboard,
    write_experiment_dashboard,
    write_figure_page,
    write_run_dashboard,
)

__all__ = [
    "DASHBOARD_FILE",
    "MAX_FRAMES",
    "choose_neurons",
    "comparison_name",
    "plotly_js",
    "grid_activations",
    "grid_frames",
    "run_figures",
    "write_run_dashboard",
    "write_comparison_dashboard",
    "write_experiment_dashboard",
    "write_figure_page",
]
