"""Emergence in a multi-task mixture (Huang et al. 2024, §5 and App. B).

Huang et al. mix 3,000 modular-addition examples with 3,000-6,000 pure-memorisation examples
(other inputs, random labels, told apart by the operator token) and find that the addition task
generalises only in far larger models than it needs alone (about 1,570 times the size; the
amount of memorisation data barely moves the threshold), and that giving each task its own half
of the FFN (App. B) brings the threshold back down. :func:`emergence` trains that grid over
model widths and amounts of memorisation data (``TaskConfig.mix_mem``; 0 is the operation
alone) and reports the operation's best test accuracy per cell, and the emergence size per
amount: the smallest width whose mean best test accuracy reaches ``threshold``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from circuits.config import RunConfig, preset
from circuits.errors import ProtocolError
from circuits.experiments.efficiency import _seeded, _seeds
from circuits.experiments.members import ExperimentResult, Member, check_grid, interval_by, member_table, run_members, write_result
from circuits.experiments.zones import width_config
from circuits.trainer import StepInfo

__all__ = ["emergence", "parameter_count"]


def parameter_count(config: RunConfig) -> int:
    """The number of trained weights of a run config's model (frozen biases not counted)."""
    from circuits.model import make_model

    model = make_model(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def emergence(
    out: str | Path,
    widths: Sequence[int],
    mem_sizes: Sequence[int],
    base: RunConfig | None = None,
    seeds: int | Sequence[int] = 3,
    split_mlp: bool = False,
    threshold: float = 0.9,
    on_group: Callable[[int, int, int], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    device: str | None = None,
    executor: Any = None,
) -> ExperimentResult:
    """Train the operation of ``base`` with ``m`` memorisation pairs mixed in, for every width
    and every ``m`` of ``mem_sizes`` (0: alone), over ``seeds``; on the reference engine (the
    mixture's ``[a, op, b, =]`` inputs need it; the runs alone use it too, so every cell has
    the same computation). ``split_mlp`` gives each task its own half of the MLP (App. B; the
    runs alone are not split). Default base: the nanda preset with 3,000 training pairs
    (Huang et al.'s D_add).

    Table: one row per run with ``best_test_acc`` (the highest test accuracy it logged, Huang
    et al.'s measurement), the final numbers of :func:`final_measures` (``op_train_acc`` and
    ``mem_train_acc`` for mixtures) and ``n_params``. Summary: per amount of memorisation data,
    the best test accuracy by width (mean, 95% interval), the emergence width and parameter
    count, and its ratio to the operation alone's when 0 is in ``mem_sizes``.
    """
    base = (base or preset("nanda").replace(train_size=3000)).replace(engine="reference")
    if not 0 < threshold <= 1:
        raise ProtocolError(f"threshold must lie in (0, 1], got {threshold}")
    widths, mem_sizes = check_grid("width", widths), check_grid("memorisation size", mem_sizes)
    members = []
    for s in _seeds(seeds):
        for w in widths:
            for m in mem_sizes:
                cfg = _seeded(width_config(base, w), s, mix_mem=m, split_mlp=bool(split_mlp and m))
                members.append(Member(f"emg-w{w}-m{m}-s{s}", cfg, (("d_model", w), ("mem_size", m), ("seed", s))))
    runs = run_members(members, out, on_group=on_group, on_step=on_step, device=device,
                       executor=executor)
    table = member_table(members, runs)
    table["best_test_acc"] = [float(r.metrics.test_acc.max()) for r in runs]
    counts = {w: parameter_count(width_config(base, w)) for w in widths}
    table["n_params"] = table.d_model.map(counts)
    by_amount: dict[str, dict] = {}
    for m, part in table.groupby("mem_size"):
        cells = interval_by(part, "d_model", "best_test_acc")
        reached = [int(w) for w, c in sorted(cells.items(), key=lambda kv: int(kv[0]))
                   if c["mean"] is not None and c["mean"] >= threshold]
        width = reached[0] if reached else None
        by_amount[str(int(m))] = {
            "best_test_acc_by_width": cells,
            "mem_train_acc_by_width": interval_by(part, "d_model", "mem_train_acc") if "mem_train_acc" in part else None,
            "emergence_width": width,
            "emergence_params": counts[width] if width is not None else None,
        }
    alone = by_amount.get("0", {}).get("emergence_params")
    for v in by_amount.values():
        v["params_vs_alone"] = (v["emergence_params"] / alone) if alone and v["emergence_params"] else None
    summary = {
        "p": base.task.p, "op": base.task.op, "train_size_op": base.task.n_train_op, "threshold": threshold,
        "split_mlp": bool(split_mlp), "widths": sorted(counts), "n_params_by_width": {str(k): v for k, v in counts.items()},
        "by_mem_size": by_amount,
    }
    from circuits.plots import plot_emergence

    result = ExperimentResult(table, plot_emergence(table, threshold), summary)
    return write_result(result, out, "emergence")
