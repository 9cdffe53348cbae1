"""Protocols over many runs (Varma et al. 2023; Huang et al. 2024): each is one library function
that trains its runs as stacked ensembles into ordinary run folders under one output folder,
resumes when called again, and returns an :class:`ExperimentResult` (a pandas table, a Plotly
figure and headline numbers), also written as ``<protocol>.csv/.json/.html``.
"""

from circuits.experiments.diagram import phase_diagram
from circuits.experiments.efficiency import critical_dataset_size, reference_circuits
from circuits.experiments.emergence import emergence
from circuits.experiments.ungrokking import curve_events, semi_grokking, ungrokking
from circuits.experiments.zones import classify_zone, memorisation_capacity, zones
from circuits.experiments.members import ExperimentResult, Member, final_measures, run_members

__all__ = [
    "ExperimentResult",
    "Member",
    "classify_zone",
    "curve_events",
    "emergence",
    "memorisation_capacity",
    "phase_diagram",
    "semi_grokking",
    "ungrokking",
    "zones",
    "critical_dataset_size",
    "final_measures",
    "reference_circuits",
    "run_members",
    "sweep",
]
