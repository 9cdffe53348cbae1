"""Progress measures as pure functions on tensors (Nanda et al. 2023 and the papers it cites),
and the registry of measure families that ``circuits analyze`` runs over every checkpoint.

One module per topic: ``losses`` (train/test, restricted, excluded), ``frequencies`` (key
frequencies, neuron clusters, Fourier norms), ``sparsity`` (Gini), ``norms`` (sum of squared
weights), ``phases`` (phase boundaries), ``circuits`` (the memorising / generalising split);
the opt-in lenses: ``per_frequency`` (Nanda et al.'s one-frequency excluded loss, the
cos(w(a+b-c)) fit, the neuron-level losses), ``rqi`` (Liu et al.'s representation quality)
and ``oinfo`` (Clauw et al.'s O-information of neuron groups).
``registry`` holds the measure families (``families`` registers the built-in ones) and
:func:`measure`, the one call that computes them for a model as the analysis does. ``llc`` is an
opt-in lens: the local learning coefficient by SGLD (:func:`estimate_llc`; needs the ``llc``
extra, devinterp, only when it samples).
"""

from circuits.measures.circuits import (
    circuit_efficiency,
    circuit_norms_sq,
    logit_parts,
    part_logit_stats,
    sum_direction_share,
)
from circuits.measures.frequencies import (
    CLUSTER_THRESHOLD,
    embed_fourier_norms,
    embed_key_frequencies,
    key_frequencies,
    neuron_clusters,
    neuron_frequency_fractions,
    neuron_logit_fourier_norms,
)
from circuits.measures.losses import (
    accuracy,
    cross_entropy,
    excluded_logits,
    excluded_loss,
    key_logit_fraction,
    restricted_logits,
    restricted_loss,
)
from circuits.measures.norms import weight_norm_sq, weight_norms_sq
from circuits.measures.phases import Phases, phase_boundaries
from circuits.measures.sparsity import gini
from circuits.measures import families as _families  # noqa: F401 - registers the built-in families
from circuits.measures.per_frequency import cos_fit, excluded_loss_per_frequency, neuron_level_losses
from circuits.measures.oinfo import o_information, ward_groups
from circuits.measures.rqi import rqi
from circuits.measures.llc import LLCEstimate, calibrate_llc, estimate_llc  # registers the opt-in llc family
from circuits.measures.registry import (
    ArraySpec,
    Column,
    Family,
    Result,
    families,
    measure,
    register,
    unregister,
)

__all__ = [
    "ArraySpec",
    "Column",
    "Family",
    "Result",
    "families",
    "measure",
    "register",
    "unregister",
    "CLUSTER_THRESHOLD",
    "LLCEstimate",
    "calibrate_llc",
    "estimate_llc",
    "Phases",
    "accuracy",
    "circuit_efficiency",
    "circuit_norms_sq",
    "cos_fit",
    "cross_entropy",
    "embed_fourier_norms",
    "embed_key_frequencies",
    "excluded_logits",
    "excluded_loss",
    "excluded_loss_per_frequency",
    "gini",
    "key_frequencies",
    "key_logit_fraction",
    "logit_parts",
    "neuron_clusters",
    "neuron_frequency_fractions",
    "neuron_level_losses",
    "neuron_logit_fourier_norms",
    "o_information",
    "part_logit_stats",
    "phase_boundaries",
    "restricted_logits",
    "restricted_loss",
    "rqi",
    "sum_direction_share",
    "weight_norm_sq",
    "ward_groups",
    "weight_norms_sq",
]
