"""What a TransformerLens notebook types without thinking (issue 21, "What failed"): each cell
that failed when the TransformerLens Grokking demo was ported is a test here."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import circuits
from circuits.config import ModelConfig
from circuits.model import make_model
from tests.conftest import tiny_config


def test_run_with_cache_gives_an_activation_cache_with_its_helpers(tiny_run: circuits.Run) -> None:
    from transformer_lens import ActivationCache

    model, task = tiny_run.model(), tiny_run.task
    logits, cache = model.run_with_cache(task.tokens)
    assert isinstance(cache, ActivationCache)
    assert torch.equal(cache["pattern", 0], cache["blocks.0.attn.hook_pattern"])
    assert torch.equal(cache["post", 0, "mlp"], cache["blocks.0.mlp.hook_post"])
    # decompose_resid: the parts add up to the final residual stream, whose unembedding is
    # the logits (no LayerNorm).
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out"]
    torch.testing.assert_close(stack.sum(0), cache["blocks.0.hook_resid_post"], rtol=1e-5, atol=1e-5)
    resid, _ = cache.accumulated_resid(return_labels=True)
    torch.testing.assert_close(resid[-1], cache["blocks.0.hook_resid_post"])
    # logit_attrs: each part's contribution to the answer's logit sums to the logit.
    attrs = cache.logit_attrs(stack[:, :, -1], tokens=task.labels)
    torch.testing.assert_close(attrs.sum(0), logits[torch.arange(len(task.labels)), -1, task.labels],
                               rtol=1e-4, atol=1e-4)
    heads = cache.stack_head_results(layer=-1)
    torch.testing.assert_close(heads.sum(0), cache["blocks.0.hook_attn_out"] - model.blocks[0].attn.b_O,
                               rtol=1e-4, atol=1e-5)
    assert cache.stack_activation("post").shape[0] == 1


def test_cfg_is_a_hooked_transformer_config_view(tiny_run: circuits.Run) -> None:
    model = tiny_run.model()
    cfg = model.cfg
    p = tiny_run.config.task.p
    assert (cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx) == (p + 1, p, 3)
    assert (cfg.attn_only, cfg.normalization_type, cfg.positional_embedding_type) == (False, None, "standard")
    assert cfg.device == torch.device("cpu") and cfg.dtype == torch.float32
    assert (cfg.d_model, cfg.n_heads, cfg.d_head, cfg.seed) == (32, 4, 8, tiny_run.config.model.seed)
    assert isinstance(model.config, ModelConfig) and model.config == tiny_run.config.model
    with pytest.raises(AttributeError, match="read-only"):
        cfg.d_model = 64
    assert cfg.to_dict()["d_vocab"] == p + 1


def test_stacked_weights_and_factored_circuits(tiny_run: circuits.Run) -> None:
    model = tiny_run.model()
    block = model.blocks[0]
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        assert torch.equal(getattr(model, name)[0], getattr(block.attn, name)), name
    for name in ("W_in", "W_out", "b_in", "b_out"):
        assert torch.equal(getattr(model, name)[0], getattr(block.mlp, name)), name
    assert torch.equal(model.b_U, model.unembed.b_U)
    torch.testing.assert_close(model.OV.AB, model.W_V @ model.W_O)
    torch.testing.assert_close(model.QK.AB, model.W_Q @ model.W_K.transpose(-2, -1))


def test_forward_return_types(tiny_run: circuits.Run) -> None:
    model, task = tiny_run.model(), tiny_run.task
    with torch.no_grad():
        logits = model(task.tokens)
        loss = model(task.tokens, return_type="loss")
        both = model(task.tokens, return_type="both")
        per = model(task.tokens, return_type="loss", loss_per_token=True)
        assert model(task.tokens, return_type=None) is None
    want = F.cross_entropy(logits[:, -1].double(), task.labels)
    assert loss.dtype == torch.float64 and torch.allclose(loss, want)
    assert torch.equal(both[0], logits) and torch.allclose(both[1], want)
    assert per.shape == (len(task.labels),) and torch.allclose(per.mean(), want)
    with pytest.raises(ValueError, match="return_type"):
        model(task.tokens, return_type="probs")
    bare = circuits.Transformer(tiny_run.config.model, 12, 11)
    with pytest.raises(ValueError, match="labels="):
        bare(task.tokens, return_type="loss")
    assert torch.isfinite(bare(task.tokens, return_type="loss", labels=task.labels))


def test_run_model_counts_from_the_end_says_its_epoch_and_warns_on_substitution(tiny_run: circuits.Run) -> None:
    epochs = tiny_run.epochs
    last, second = tiny_run.model(-1), tiny_run.model(-2)
    assert (last.epoch, second.epoch) == (epochs[-1], epochs[-2])
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), tiny_run.model().state_dict().values()))
    with pytest.raises(IndexError, match="checkpoints"):
        tiny_run.model(-len(epochs) - 1)
    missing = epochs[-1] - 3
    with pytest.warns(UserWarning, match=f"no checkpoint at epoch {missing}; using the nearest"):
        near = tiny_run.model(missing)
    assert near.epoch == tiny_run.nearest_epoch(missing)
    with pytest.raises(KeyError, match="nearest"):
        tiny_run.model(missing, exact=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tiny_run.model(epochs[2]).epoch == epochs[2]  # an exact epoch does not warn


def test_models_iterates_every_checkpoint_with_one_module(tiny_run: circuits.Run) -> None:
    seen, modules = [], set()
    for model in tiny_run.models():
        modules.add(id(model))
        seen.append(model.epoch)
        sd = tiny_run.state_dict(model.epoch)
        assert torch.equal(model.W_E, sd["embed.W_E"]) and torch.equal(model.W_U, sd["unembed.W_U"])
    assert seen == tiny_run.epochs and len(modules) == 1
    assert [m.epoch for m in tiny_run.models([-1, 0])] == [tiny_run.epochs[-1], 0]


def test_state_dicts_load_strictly(tiny_run: circuits.Run) -> None:
    model = make_model(tiny_run.config)
    model.load_state_dict(tiny_run.state_dict(tiny_run.epochs[-1]))  # strict: parameters only
    # A TransformerLens state dict carries the mask and IGNORE buffers: still a strict load.
    with_buffers = {**tiny_run.state_dict(0), "blocks.0.attn.mask": torch.ones(3, 3, dtype=torch.bool),
                    "blocks.0.attn.IGNORE": torch.tensor(-1e5)}
    model.load_state_dict(with_buffers)
    assert torch.equal(model.W_E, tiny_run.state_dict(0)["embed.W_E"])
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in with_buffers.items() if k != "unembed.W_U"})


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_training_works_with_grad_disabled(engine: str, tmp_path: Path) -> None:
    # The first line of many TransformerLens notebooks.
    before = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        run = circuits.train(tiny_config(engine=engine, epochs=20), out=tmp_path / engine)
    finally:
        torch.set_grad_enabled(before)
    assert run.epochs[-1] == 20
    assert not torch.equal(run.state_dict(20)["embed.W_E"], run.state_dict(0)["embed.W_E"])


def test_bad_epochs_and_shapes_get_errors_that_say_what_was_expected(tiny_run: circuits.Run, tmp_path: Path) -> None:
    from circuits.measures import restricted_logits, restricted_loss

    analysis = circuits.analyze(tiny_run, out=tmp_path / "a", key_freqs=[1])
    with pytest.raises(KeyError, match="no checkpoint at epoch 1234; the nearest is"):
        analysis.clusters(epoch=1234)
    model, task = tiny_run.model(), tiny_run.task
    with torch.no_grad():
        logits = model(task.tokens)  # [batch, pos, classes]: all positions
    with pytest.raises(ValueError, match=r"got shape \(121, 3, 11\).*logits\[:, -1\]"):
        restricted_logits(logits, task, [1])
    assert restricted_loss(logits[:, -1], task.labels, task, [1]).item() > 0


def test_submodules_are_attributes_and_tab_completion_offers_them() -> None:
    assert circuits.fourier.fourier_basis(5).shape == (5, 5)
    assert circuits.measures.restricted_loss is not None
    for name in ("fourier", "measures", "tasks", "plots", "train", "load_run", "analyze"):
        assert name in dir(circuits)
    with pytest.raises(AttributeError):
        circuits.no_such_thing  # noqa: B018


def test_the_docs_name_the_quick_presets_real_run_folder() -> None:
    # The README and the docs used run names no command produces (quick-2b16e754).
    import re

    from circuits.config import preset
    from circuits.run import default_run_dir

    real = default_run_dir(preset("quick")).name
    root = Path(__file__).resolve().parent.parent
    for doc in (root / "README.md", root / "docs" / "dashboard.md", root / "circuits" / "run.py"):
        names = set(re.findall(r"quick-[0-9a-f]{8}", doc.read_text()))
        assert names <= {real}, (doc.name, names, real)


def test_analyze_says_where_it_writes(tiny_run: circuits.Run, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="circuits.analysis"):
        first = circuits.analyze(tiny_run, out=tmp_path / "a", key_freqs=[1])
        circuits.analyze(tiny_run, out=tmp_path / "a", key_freqs=[1])
    lines = [r.getMessage() for r in caplog.records if r.name == "circuits.analysis"]
    assert first.path == tmp_path / "a"
    assert lines[0] == f"analysing {tiny_run.path} into {(tmp_path / 'a').resolve()}"
    assert lines[1].endswith("(reusing what is there)")


def test_a_progress_bar_for_notebooks_and_terminals(tmp_path: Path) -> None:
    import io

    sink = io.StringIO()
    run = circuits.train(tiny_config(epochs=20), out=tmp_path / "r", on_step=circuits.progress_bar(file=sink, mininterval=0))
    text = sink.getvalue()
    assert run.epochs[-1] == 20 and "20/20" in text and "test_acc=" in text
    # One callback over several runs in turn (a protocol's groups): a fresh bar for each.
    sink = io.StringIO()
    bar = circuits.progress_bar(desc="group", file=sink, mininterval=0)
    circuits.train(tiny_config(epochs=10), out=tmp_path / "g1", on_step=bar)
    circuits.train(tiny_config(epochs=15, seed=1), out=tmp_path / "g2", on_step=bar)
    text = sink.getvalue()
    assert "group: 100%" in text and "10/10" in text
    assert "group #2: 100%" in text and "15/15" in text
