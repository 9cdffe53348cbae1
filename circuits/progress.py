"""Progress bars for notebooks and terminals, as ``on_step`` callbacks (the library never prints).

``circuits.train(config, on_step=progress_bar())`` shows a bar that renders as a widget in
Jupyter and as text in a terminal (``tqdm.auto``), with the latest train and test accuracy. The
same callback given to a protocol (``critical_dataset_size(..., on_step=progress_bar())``)
draws one bar per run or ensemble it trains, in turn. The CLI draws its own with rich; this is
the notebook's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(desc: str = "training", **tqdm_kwargs: Any) -> Callable[[Any], None]:
    """An ``on_step`` callback driving a ``tqdm.auto`` bar over the run's epochs; it closes
    itself at the last epoch, and a later run (the next group of a protocol) gets a new bar,
    numbered. ``tqdm_kwargs`` go to ``tqdm`` (``file=``, ``disable=``, ...)."""
    from tqdm.auto import tqdm

    state: dict[str, Any] = {"bar": None, "count": 0, "closed": False}

    def on_step(info: Any) -> None:
        bar = state["bar"]
        if bar is None or state["closed"] or info.epoch < bar.n:
            state["count"] += 1
            label = desc if state["count"] == 1 else f"{desc} #{state['count']}"
            bar = state["bar"] = tqdm(total=info.epochs, initial=info.start_epoch, desc=label, **tqdm_kwargs)
            state["closed"] = False
        bar.update(info.epoch - bar.n)
        if info.metrics:
            bar.set_postfix(train_acc=f"{info.metrics['train_acc']:.3f}", test_acc=f"{info.metrics['test_acc']:.3f}",
                            refresh=False)
        if info.epoch >= info.epochs:
            bar.close()
            state["closed"] = True

    return on_step
