"""Science on a real run: the `quick` preset memorises first and generalises long after."""

from __future__ import annotations

import circuits


def test_quick_preset_groks(quick_run: circuits.Run) -> None:
    m = quick_run.metrics
    assert quick_run.is_complete
    first_train = int(m.epoch[m.train_acc >= 1.0].iloc[0])
    first_test = int(m.epoch[m.test_acc >= 0.99].iloc[0])
    # Grokking: perfect training accuracy comes well before test accuracy passes 99%.
    assert first_train < first_test / 2, (first_train, first_test)
    # Memorisation really happened: at 100% train accuracy the test accuracy is still low.
    assert m.test_acc[m.epoch == first_train].item() < 0.5
    assert m.test_acc.iloc[-1] >= 0.99 and m.test_loss.iloc[-1] < 0.01
    # The test loss rises during memorisation before it falls (the grokking signature).
    assert m.test_loss.max() > 1.5 * m.test_loss.iloc[0]
