"""Phase boundaries of grokking: memorisation, circuit formation, cleanup (Nanda et al. 2023, §5.2).

The paper places the boundaries by eye (1.4k / 9.4k / 14k epochs in its mainline run). Here
they come from the curves by a written rule, so every run gets them the same way:

1. **Memorisation ends** at the peak of the test loss (the network has fit the training set and
   is as wrong as it gets on the rest; the paper's 1.4k is the test-loss peak).
2. **Circuit formation ends** when the test loss starts its sharp fall: the first epoch after
   the peak at which the fall rate of log10(test loss) per epoch reaches ``frac`` (10%) of its
   largest value after the peak.
3. **Cleanup ends** when the sum of squared weights stops its steep fall: after the epoch where
   log(weight norm) falls fastest (at or after circuit formation's end), the first epoch at which
   its fall rate drops below ``cleanup_frac`` (25%) of that largest rate. (The norm keeps
   decaying slowly for the rest of training, so a lower fraction would push the end towards
   the run's last epoch.)

Rates are slopes between consecutive logged epochs, smoothed by a centred moving average over
``window`` points so a single noisy checkpoint cannot move a boundary. A boundary that the
curves have not reached yet (a run still memorising, or not grokked) is ``None``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Phases", "phase_boundaries"]


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


def phase_boundaries(
    epochs: np.ndarray,
    test_loss: np.ndarray,
    weight_norm_sq: np.ndarray,
    frac: float = 0.1,
    cleanup_frac: float = 0.25,
    window: int = 3,
    grokked_loss: float = 0.1,
) -> Phases:
    """Detect the three boundaries from the test loss and the sum of squared weights.

    ``grokked_loss``: circuit formation and cleanup are only reported once the test loss has
    fallen below this value (otherwise the run has not grokked and their ends are None).
    """
    epochs = np.asarray(epochs, dtype=np.float64)
    test_loss = np.asarray(test_loss, dtype=np.float64)
    norm = np.asarray(weight_norm_sq, dtype=np.float64)
    if len(epochs) < 3:
        return Phases(None, None, None)
    peak = int(np.argmax(test_loss))
    if peak == len(epochs) - 1 or test_loss[peak] <= test_loss[0]:
        # Still rising (or never rose above chance): memorisation has not visibly ended.
        return Phases(None, None, None)
    mem_end = int(epochs[peak])
    below = np.nonzero(test_loss[peak:] < grokked_loss)[0]
    if len(below) == 0:
        return Phases(mem_end, None, None)
    log_test = np.log10(np.clip(test_loss, 1e-300, None))
    rate = _fall_rate(epochs, log_test, window)
    after = rate[peak:]
    start = peak + int(np.nonzero(after >= frac * after.max())[0][0])
    formation_end = int(epochs[start])
    log_norm = np.log(np.clip(norm, 1e-300, None))
    nrate = _fall_rate(epochs, log_norm, window)
    steepest = start + int(np.argmax(nrate[start:]))
    if nrate[steepest] <= 0:
        return Phases(mem_end, formation_end, None)
    settle = np.nonzero(nrate[steepest:] < cleanup_frac * nrate[steepest])[0]
    cleanup_end = int(epochs[steepest + int(settle[0])]) if len(settle) else None
    return Phases(mem_end, formation_end, cleanup_end)
