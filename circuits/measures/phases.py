"""Phase boundaries of grokking: memorisation, circuit formation, cleanup (Nanda et al. 2023, §5.2).

The paper places the boundaries by eye (1.4k / 9.4k / 14k epochs in its mainline run). Here
they come from the curves by a written rule, so every run gets them the same way:

1. **Memorisation ends** at the peak of the test loss before it first falls below
   ``grokked_loss`` (the network has fit the training set and is as wrong as it gets on the
   rest; the paper's 1.4k is the test-loss peak).
2. **Circuit formation ends** when the test loss starts its sharp fall: the start of the last
   stretch, before the test loss first falls below ``grokked_loss``, in which the fall rate of
   log10(test loss) per epoch stays at or above ``frac`` (10%) of its largest value after the
   peak. Not the first epoch at which the rate reaches that level: the test loss often dips
   right after its peak (the overshoot of memorisation settling) and then lies on a plateau for
   hundreds of epochs, and that dip alone reaches 10-20% of the grokking fall's rate (quick-size
   runs at 45% data: formation "ended" 10-20 epochs after memorisation, cleanup 1,800 epochs
   before the test accuracy rose). On runs without such a dip (the nanda run, five nanda seeds,
   the old quick preset) both readings give the same epoch.
3. **Cleanup ends** when the sum of squared weights stops its steep fall: after the epoch where
   log(weight norm) falls fastest (at or after circuit formation's end), the first epoch at which
   its fall rate drops below ``cleanup_frac`` (25%) of that largest rate. (The norm keeps
   decaying slowly for the rest of training, so a lower fraction would push the end towards
   the run's last epoch.)

**Only the first grokking counts.** Long runs can leave the grokked state again: the 40k-epoch
nanda run spiked at epoch ~39.5k (a slingshot-like instability; test loss up from 1e-6 to
~1e-2 at the checkpoints, the weight norm dropping steeply from 893 to 733 and re-growing to
961). Taken over the whole run, the steepest norm fall was the spike's and cleanup "ended" at
39.7k instead of 11.3k. So all three boundaries are read from the *stable segment*: the
checkpoints from the start up to (not including) the first one, after the test loss first went
below ``grokked_loss``, at which the test loss exceeds ``spike_factor`` (100) times the lowest
test loss reached since then. The rates are computed on that segment alone, so a run is
analysed exactly as if its table had been cut just before the spike, and a run without such a
rise is analysed on all its checkpoints (identical to the rule without the cut). Why this
criterion:

- *A relative rise, not a return above* ``grokked_loss``: spikes are short, and at checkpoint
  spacing the nanda spike shows up as 8.7e-3, never above 0.1. Measured against the running
  minimum it is a rise by 10^4, while the ordinary post-grokking drift of that run is at most
  2.3x: a factor of 100 sits two orders of magnitude from both. The running minimum starts
  when the test loss first goes below ``grokked_loss``, so the grokking fall itself (which only
  sets new minima) can never trigger it, and a test loss that wobbles around ``grokked_loss``
  on its way down does not cut the steep fall short.
- *The test loss, not the norm's re-growth*: in the spike the norm falls steeply first and
  re-grows afterwards, so cutting at the first re-growth would keep the spurious fall; and the
  smoothed norm already turns upward on noise (by ~1e-7 per epoch at 37.2k in the nanda run),
  so a re-growth cut would need its own tolerance. The test-loss cut removes both the fall and
  the re-growth.

A spike during cleanup (before the norm's steep fall has settled) leaves cleanup_end None:
cleanup was interrupted, not finished. Rises of less than ``spike_factor`` are not treated as
spikes.

Rates are slopes between consecutive logged epochs, smoothed by a centred moving average over
``window`` points so a single noisy checkpoint cannot move a boundary. A boundary that the
curves have not reached yet (a run still memorising, or not grokked) is ``None``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["Phases", "crossing", "non_finite_epoch", "phase_boundaries", "stable_segment_end", "liu_phase", "LIU_PHASES"]


@dataclass(frozen=True)
class Phases:
    """Epochs that end memorisation, circuit formation and cleanup (None: not reached)."""

    memorisation_end: int | None
    circuit_formation_end: int | None
    cleanup_end: int | None

    def to_dict(self) -> dict[str, int | None]:
        """Plain dict for JSON."""
        return asdict(self)


def _fall_rate(epochs: np.ndarray, y: np.ndarray, window: int) -> np.ndarray:
    """Smoothed -dy/d(epoch), defined at each epoch (the slope to the next point)."""
    slope = -np.diff(y) / np.diff(epochs)
    slope = np.append(slope, slope[-1] if len(slope) else 0.0)
    if window > 1 and len(slope) >= window:
        kernel = np.ones(window) / window
        padded = np.pad(slope, (window // 2, window - 1 - window // 2), mode="edge")
        slope = np.convolve(padded, kernel, mode="valid")
    return slope


def stable_segment_end(test_loss: np.ndarray, grokked_loss: float = 0.1, spike_factor: float = 100.0) -> int:
    """Number of leading checkpoints before the run leaves the grokked state (see module doc).

    The first index, after the test loss first fell below ``grokked_loss``, at which the test
    loss exceeds ``spike_factor`` times its minimum since then; ``len(test_loss)`` when there is
    none (no such rise, or the run never grokked).
    """
    test_loss = np.asarray(test_loss, dtype=np.float64)
    below = np.nonzero(test_loss < grokked_loss)[0]
    if len(below) == 0:
        return len(test_loss)
    first = int(below[0])
    tail = test_loss[first:]
    rise = np.nonzero(tail > spike_factor * np.minimum.accumulate(tail))[0]
    return first + int(rise[0]) if len(rise) else len(test_loss)


def non_finite_epoch(epochs: np.ndarray, *curves: np.ndarray) -> int | None:
    """The first epoch at which any of ``curves`` is NaN or infinite (None: all finite)."""
    bad = np.zeros(len(epochs), dtype=bool)
    for c in curves:
        bad |= ~np.isfinite(np.asarray(c, dtype=np.float64))
    return int(np.asarray(epochs)[np.argmax(bad)]) if bad.any() else None


def phase_boundaries(
    epochs: np.ndarray,
    test_loss: np.ndarray,
    weight_norm_sq: np.ndarray,
    frac: float = 0.1,
    cleanup_frac: float = 0.25,
    window: int = 3,
    grokked_loss: float = 0.1,
    spike_factor: float = 100.0,
) -> Phases:
    """Detect the three boundaries from the test loss and the sum of squared weights.

    ``grokked_loss``: circuit formation and cleanup are only reported once the test loss has
    fallen below this value (otherwise the run has not grokked and their ends are None).
    ``spike_factor``: a rise of the test loss by more than this factor over its minimum since
    grokking ends the segment the boundaries are read from (module doc).
    """
    epochs = np.asarray(epochs, dtype=np.float64)
    test_loss = np.asarray(test_loss, dtype=np.float64)
    norm = np.asarray(weight_norm_sq, dtype=np.float64)
    bad = non_finite_epoch(epochs, test_loss, norm)
    if bad is not None:
        raise ValueError(
            f"the test loss or weight norm is not finite at epoch {bad}: phases are not read "
            "from a diverged curve"
        )
    # Read everything from the stable segment: as if the table stopped before a late spike.
    end = stable_segment_end(test_loss, grokked_loss, spike_factor)
    epochs, test_loss, norm = epochs[:end], test_loss[:end], norm[:end]
    if len(epochs) < 3:
        return Phases(None, None, None)
    grokked = np.nonzero(test_loss < grokked_loss)[0]
    # The memorisation peak is the one before the first grokking fall.
    peak = int(np.argmax(test_loss[: int(grokked[0]) + 1] if len(grokked) else test_loss))
    if peak == len(epochs) - 1 or test_loss[peak] <= test_loss[0]:
        # Still rising (or never rose above chance): memorisation has not visibly ended.
        return Phases(None, None, None)
    mem_end = int(epochs[peak])
    if len(grokked) == 0:
        return Phases(mem_end, None, None)
    log_test = np.log10(np.clip(test_loss, 1e-300, None))
    rate = _fall_rate(epochs, log_test, window)
    # The sharp fall is the last stretch above the threshold before the test loss is grokked; a
    # stretch that ends again (the post-peak dip) is not it.
    slow = np.nonzero(rate[peak : int(grokked[0])] < frac * rate[peak:].max())[0]
    start = peak + (int(slow[-1]) + 1 if len(slow) else 0)
    formation_end = int(epochs[start])
    log_norm = np.log(np.clip(norm, 1e-300, None))
    nrate = _fall_rate(epochs, log_norm, window)
    steepest = start + int(np.argmax(nrate[start:]))
    if nrate[steepest] <= 0:
        return Phases(mem_end, formation_end, None)
    settle = np.nonzero(nrate[steepest:] < cleanup_frac * nrate[steepest])[0]
    cleanup_end = int(epochs[steepest + int(settle[0])]) if len(settle) else None
    return Phases(mem_end, formation_end, cleanup_end)


def crossing(x: ArrayLike, y: ArrayLike, level: float) -> float | None:
    """First x where ``y`` crosses ``level``, interpolated linearly in log x (None: no crossing).

    The critical dataset size of Varma et al. (2023) is such a crossing of the memorising
    circuit's norm (or efficiency) curve over training-set sizes; the ungrokking threshold one
    of test accuracy."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float) - level
    for i in range(len(xs) - 1):
        if ys[i] == 0:
            return float(xs[i])
        if ys[i] * ys[i + 1] < 0:
            t = ys[i] / (ys[i] - ys[i + 1])
            return float(math.exp(math.log(xs[i]) + t * (math.log(xs[i + 1]) - math.log(xs[i]))))
    if len(ys) and ys[-1] == 0:
        return float(xs[-1])
    return None


#: Liu et al.'s (2022) phase names, in their Table 1's order.
LIU_PHASES = ("comprehension", "grokking", "memorization", "confusion")


def liu_phase(
    epochs: ArrayLike,
    train_acc: ArrayLike,
    test_acc: ArrayLike,
    threshold: float = 0.9,
    budget: int = 100_000,
    gap: int = 1_000,
) -> dict[str, int | str | bool | None]:
    """Liu et al.'s phase of one run (2022, "Towards Understanding Grokking", App. A, Table 1).

    Record the first step at which train and validation (test) accuracy exceed ``threshold``
    (90%) within ``budget`` steps (10^5): both, within ``gap`` (10^3) steps of each other:
    **comprehension**; both, further apart: **grokking**; train only: **memorization**;
    neither: **confusion**. A run whose test accuracy crosses but whose train accuracy does not
    is outside the table (``unclassified``). A run logged for fewer steps than ``budget`` is
    classified on its own length and flagged ``truncated`` (science.md, "Statistics"): a
    "memorization" it gets may be a grokking that the budget would have seen.

    Returns ``{"phase", "train_step", "test_step", "truncated"}`` (steps None when not crossed).
    """
    e = np.asarray(epochs, dtype=float)
    tr, te = np.asarray(train_acc, dtype=float), np.asarray(test_acc, dtype=float)
    within = e <= budget

    def first(acc: np.ndarray) -> int | None:
        hit = np.nonzero(within & (acc > threshold))[0]
        return int(e[hit[0]]) if len(hit) else None

    train_step, test_step = first(tr), first(te)
    if train_step is not None and test_step is not None:
        phase = "comprehension" if test_step - train_step < gap else "grokking"
    elif train_step is not None:
        phase = "memorization"
    elif test_step is None:
        phase = "confusion"
    else:
        phase = "unclassified"
    truncated = bool(len(e) == 0 or e[-1] < budget)
    return {"phase": phase, "train_step": train_step, "test_step": test_step, "truncated": truncated}
