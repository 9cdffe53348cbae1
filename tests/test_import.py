"""``circuits import``: a TransformerLens Grokking demo save becomes a run folder, and a file
that would run code is refused with nothing executed (issue 21, item 5; design.md "Import").

The files are written here in the demo's layout (no download): ``torch.save`` of a dict with the
HookedTransformerConfig object, the checkpoints with TransformerLens' buffers, the epochs, the
per-epoch losses and the split indices."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

import circuits
from circuits.errors import RunFolderError
from circuits.importer import ImportRefused, import_run, read_restricted
from tests.conftest import run_cli


@dataclasses.dataclass
class HookedTransformerConfig:  # the demo's config class, as pickle records it
    n_layers: int
    d_model: int
    d_head: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    act_fn: str
    normalization_type: str | None
    seed: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"


def _save_demo_file(run: circuits.Run, path: Path) -> None:
    """torch.save a dict in the TransformerLens demo's layout, with its config class recorded
    under TransformerLens' module path (a stand-in module while saving)."""
    cfg = run.config
    fake = types.ModuleType("transformer_lens.HookedTransformerConfig")
    HookedTransformerConfig.__module__ = fake.__name__
    fake.HookedTransformerConfig = HookedTransformerConfig
    sys.modules[fake.__name__] = fake
    try:
        tl_cfg = HookedTransformerConfig(
            n_layers=1, d_model=cfg.model.d_model, d_head=cfg.model.d_head, n_heads=cfg.model.n_heads,
            d_mlp=cfg.model.d_mlp, d_vocab=cfg.d_vocab, d_vocab_out=cfg.d_vocab_out, n_ctx=3,
            act_fn="relu", normalization_type=None, seed=cfg.model.seed,
        )
        buffers = {"blocks.0.attn.mask": torch.tril(torch.ones(3, 3, dtype=torch.bool)),
                   "blocks.0.attn.IGNORE": torch.tensor(-1e5)}
        checkpoints = [{**run.state_dict(e), **buffers} for e in run.epochs]
        torch.save({
            "model": checkpoints[-1], "config": tl_cfg, "checkpoints": checkpoints,
            "checkpoint_epochs": list(run.epochs),
            "test_losses": [float(x) for x in run.metrics.test_loss], "train_losses": [float(x) for x in run.metrics.train_loss],
            "train_indices": run.task.train_idx, "test_indices": run.task.test_idx,
        }, path)
    finally:
        del sys.modules[fake.__name__]


def test_a_demo_save_imports_as_a_run_that_analyses_like_the_original(tiny_run: circuits.Run, tmp_path: Path) -> None:
    src = tmp_path / "grokking_demo.pth"
    _save_demo_file(tiny_run, src)
    out = run_cli("import", str(src), "--out", str(tmp_path / "imported"))
    assert out.returncode == 0, out.stderr
    run = circuits.load_run(tmp_path / "imported")
    assert run.epochs == tiny_run.epochs  # kept as the file gives them
    assert torch.equal(run.task.train_idx, tiny_run.task.train_idx)
    for e in run.epochs:
        assert all(torch.equal(v, tiny_run.state_dict(e)[k]) for k, v in run.state_dict(e).items())
    source = json.loads((tmp_path / "imported" / "source.json").read_text())
    assert source["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert source["config_fields"]["d_model"] == 32 and source["config_fields"]["dtype"] == "torch.float32"
    # Key frequencies and losses equal those computed from the original tensors.
    ours = circuits.analyze(run, out=tmp_path / "a1", key_freqs=None)
    original = circuits.analyze(tiny_run, out=tmp_path / "a2")
    assert ours.key_frequencies == original.key_frequencies
    pd.testing.assert_frame_equal(ours.measures, original.measures, check_exact=False, rtol=1e-9, atol=1e-12)
    # metrics.csv is evaluated from the checkpoints on the saved split.
    m = run.metrics.set_index("epoch")
    first = ours.measures.set_index("epoch")
    assert m.loc[run.epochs[-1], "train_loss"] == pytest.approx(first.loc[run.epochs[-1], "train_loss"], rel=1e-6)
    info = run_cli("info", str(tmp_path / "imported"))
    assert info.returncode == 0, info.stdout + info.stderr
    assert f"imported  from {src.resolve()}" in info.stdout
    # It analyses but does not train.
    with pytest.raises(RunFolderError, match="imported run"):
        circuits.train(run.config, out=tmp_path / "imported")


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            import os

            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil.pth"
    torch.save({"config": {}, "checkpoints": [Evil()], "checkpoint_epochs": [0]}, src)
    out = run_cli("import", str(src), "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "system object" in out.stderr and "does not build" in out.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()
    with pytest.raises(ImportRefused, match="system"):
        read_restricted(src)


def test_files_that_do_not_fit_are_named(tiny_run: circuits.Run, tmp_path: Path) -> None:
    src = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(3)}, src)
    with pytest.raises(ImportRefused, match="not a TransformerLens Grokking demo save"):
        import_run(src, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ImportRefused, match="not a torch.save file"):
        import_run(tmp_path / "junk.pth", tmp_path / "y")
    good = tmp_path / "demo.pth"
    _save_demo_file(tiny_run, good)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ImportRefused, match="not empty"):
        import_run(good, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(ImportRefused, match="split does not fit"):
        import_run(good, tmp_path / "z", op="div")  # division's table has no b = 0 pairs
