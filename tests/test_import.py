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
    with pytest.raises(ImportRefused, match="neither a TransformerLens Grokking demo save .* nor Nanda"):
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


# --- Nanda et al.'s full_run_data.pth -------------------------------------------------------
# Written here by a small copy of their training setup (their weight layout, their split rule
# with Python's random, full-batch AdamW, a state dict every save_every epochs, per-epoch
# losses over all p + 1 logits in float64), independent of circuits' model and trainer.


@dataclasses.dataclass
class Config:  # their code's config class, as pickle records it
    p: int = 11
    d_model: int = 16
    num_heads: int = 4
    d_mlp: int = 32
    fn_name: str = "add"
    frac_train: float = 0.3
    seed: int = 0
    save_every: int = 10
    num_epochs: int = 120
    lr: float = 1e-2
    weight_decay: float = 1.0
    act_type: str = "ReLU"
    use_ln: bool = False
    device: torch.device = torch.device("cpu")


class NandaTransformer(torch.nn.Module):
    """One layer, no LayerNorm, in their layout: [out, in] matrices, W_O [d_model, heads*d_head],
    W_E and W_U over the p + 1 tokens (the '=' token included in the output)."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        v, d, h, dh, m = c.p + 1, c.d_model, c.num_heads, c.d_model // c.num_heads, c.d_mlp
        g = torch.Generator().manual_seed(c.seed)

        def w(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=g) / shape[-1] ** 0.5)

        self.W_E, self.W_pos, self.W_U = w(d, v), w(3, d), w(d, v)
        self.W_Q, self.W_K, self.W_V, self.W_O = w(h, dh, d), w(h, dh, d), w(h, dh, d), w(d, h * dh)
        self.W_in, self.W_out = w(m, d), w(d, m)
        self.b_in, self.b_out = torch.nn.Parameter(torch.zeros(m)), torch.nn.Parameter(torch.zeros(d))
        self.h, self.dh = h, dh

    def state_dict_theirs(self) -> dict[str, torch.Tensor]:
        names = {"W_E": "embed.W_E", "W_pos": "pos_embed.W_pos", "W_U": "unembed.W_U", "W_Q": "blocks.0.attn.W_Q",
                 "W_K": "blocks.0.attn.W_K", "W_V": "blocks.0.attn.W_V", "W_O": "blocks.0.attn.W_O",
                 "W_in": "blocks.0.mlp.W_in", "W_out": "blocks.0.mlp.W_out", "b_in": "blocks.0.mlp.b_in",
                 "b_out": "blocks.0.mlp.b_out"}
        sd = {names[k]: v.detach().clone() for k, v in self.named_parameters()}
        sd["blocks.0.attn.mask"] = torch.tril(torch.ones(3, 3))
        return sd

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.W_E[:, tokens].permute(1, 2, 0) + self.W_pos
        q, k, v = (torch.einsum("hed,bpd->bhpe", W, x) for W in (self.W_Q, self.W_K, self.W_V))
        scores = torch.einsum("bhqe,bhke->bhqk", q, k) / self.dh**0.5
        scores = scores.masked_fill(~torch.tril(torch.ones(3, 3, dtype=torch.bool)), -1e10)
        z = torch.einsum("bhqk,bhke->bqhe", scores.softmax(-1), v).reshape(len(tokens), 3, -1)
        x = x + z @ self.W_O.T
        x = x + torch.relu(x @ self.W_in.T + self.b_in) @ self.W_out.T + self.b_out
        return x @ self.W_U


def _nanda_split(c: Config) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    import random

    pairs = [(i, j, c.p) for i in range(c.p) for j in range(c.p)]
    random.seed(c.seed)
    random.shuffle(pairs)
    div = int(c.frac_train * len(pairs))
    return pairs[:div], pairs[div:]


def _save_full_run_file(path: Path, c: Config, split_seed: int | None = None) -> NandaTransformer:
    """Train their way and torch.save their dict; ``split_seed`` trains on another split than
    the config records (a file whose split cannot be rebuilt)."""
    train, test = _nanda_split(dataclasses.replace(c, seed=c.seed if split_seed is None else split_seed))
    model = NandaTransformer(c)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.98))

    def loss(pairs: list) -> torch.Tensor:
        tokens = torch.tensor(pairs)
        labels = (tokens[:, 0] + tokens[:, 1]) % c.p
        return torch.nn.functional.cross_entropy(model(tokens)[:, -1].double(), labels)

    state_dicts, train_losses, test_losses = [], [], []
    for epoch in range(c.num_epochs):
        train_loss = loss(train)
        with torch.no_grad():
            test_losses.append(loss(test).item())
        train_losses.append(train_loss.item())
        if epoch % c.save_every == 0:
            state_dicts.append(model.state_dict_theirs())
        train_loss.backward()
        opt.step()
        opt.zero_grad()
    fake = types.ModuleType("transformers")
    Config.__module__ = fake.__name__
    fake.Config = Config
    sys.modules[fake.__name__] = fake
    try:
        torch.save({"config": c, "state_dicts": state_dicts, "train_losses": train_losses,
                    "test_losses": test_losses}, path)
    finally:
        del sys.modules[fake.__name__]
    return model


def test_nandas_full_run_data_imports_with_their_split_and_the_same_logits(tmp_path: Path) -> None:
    c = Config()
    src = tmp_path / "full_run_data.pth"
    _save_full_run_file(src, c)
    theirs = read_restricted(src)
    out = run_cli("import", str(src), "--out", str(tmp_path / "nanda"))
    assert out.returncode == 0, out.stderr
    run = circuits.load_run(tmp_path / "nanda")
    assert run.epochs == list(range(0, c.num_epochs, c.save_every))
    train, test = _nanda_split(c)
    assert run.task.train_idx.tolist() == [i * c.p + j for i, j, _ in train]
    assert run.task.test_idx.tolist() == [i * c.p + j for i, j, _ in test]
    assert run.config.model.train_biases and run.config.train.lr == c.lr
    # Every checkpoint gives their model's logits over the p answers.
    tokens = run.task.tokens
    ref = NandaTransformer(c)
    names = dict(zip(ref.state_dict_theirs(), [n for n, _ in ref.named_parameters()]))
    for epoch, sd in zip(run.epochs, theirs["state_dicts"]):
        ref.load_state_dict({names[k]: v for k, v in sd.items() if k in names})
        with torch.no_grad():
            expected = ref(tokens)[:, :, : c.p]
            got = run.model(epoch)(tokens)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float(theirs["state_dicts"][-1]["blocks.0.mlp.b_in"].abs().sum()) > 0  # the biases were trained
    source = json.loads((tmp_path / "nanda" / "source.json").read_text())
    assert source["format"] == "nanda_full_run_data" and source["op"] == "add"
    check = source["split_check"]
    assert check["confirmed"] and check["while_memorised"] and check["median_loss_ratio"] < 1.5
    # The recorded losses and circuits' own (one update apart, over p logits) agree.
    m = run.metrics.set_index("epoch")
    late = run.epochs[-1]
    assert m.loc[late, "train_loss"] == pytest.approx(theirs["train_losses"][late], rel=0.5)
    assert m.loc[late, "test_loss"] == pytest.approx(theirs["test_losses"][late], rel=0.5)
    analysis = circuits.analyze(run, out=tmp_path / "a")
    assert len(analysis.measures) == len(run.epochs)


def test_a_full_run_whose_split_cannot_be_rebuilt_is_refused(tmp_path: Path) -> None:
    c = Config()
    src = tmp_path / "full_run_data.pth"
    _save_full_run_file(src, c, split_seed=1)  # trained on another split than the config says
    out = run_cli("import", str(src), "--out", str(tmp_path / "nanda"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "not split by Nanda et al.'s rule" in out.stderr
    assert not (tmp_path / "nanda").exists()
    with pytest.raises(ImportRefused, match="fn_name"):
        import_run(src, tmp_path / "x", op="sub")
