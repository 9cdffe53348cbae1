"""Interop with TransformerLens 3.x: our checkpoints load into its ``HookedTransformer``.

We run on TransformerLens 4, but many grokking notebooks were written against the 3.x
``HookedTransformer``. These tests check, in a separate Python environment that has
``transformer-lens>=3,<4``, that

* a checkpoint written by :class:`circuits.store.RunStore` loads into a ``HookedTransformer`` of
  the same config with no unexpected keys and no missing parameters (only its buffers ``IGNORE``
  and ``mask`` may be missing, as our checkpoints hold parameters only), and gives the same
  logits on all ``p * p`` inputs;
* a ``HookedTransformer`` built with ``init_weights=True, seed=999`` (``init_mode="gpt2"``) starts
  from the same weights as our ``make_model``.

Why opt-in: TransformerLens 3 cannot live in the project's environment next to 4, so the tests
build a throwaway virtual environment (torch + transformer-lens 3.x + safetensors, cached in
``~/.cache/circuits-tl3-venv`` or ``$CIRCUITS_TL3_VENV`` and reused) and talk to it through
files and a subprocess. That needs the package index and minutes on a first run, so they run
only with ``CIRCUITS_TL3=1``::

    CIRCUITS_TL3=1 python -m pytest tests/test_interop_tl3.py --runslow -q -s
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuits.config import RunConfig, preset
from circuits.model import Transformer, make_model
from circuits.store import RunStore
from circuits.tasks import make_task

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("CIRCUITS_TL3") != "1",
        reason="builds a TransformerLens 3.x venv; enable with CIRCUITS_TL3=1",
    ),
]

TORCH_PIN = "torch==2.13.0"  # a local CPU wheel; an unpinned torch would pull a CUDA build
TL3_SPEC = "transformer-lens>=3,<4"
BUFFER_SUFFIXES = ("IGNORE", "mask")
INSTALL_TIMEOUT = 3600.0

# Runs inside the TransformerLens 3.x environment: argv[1] is the exchange folder.
TL3_SCRIPT = r'''
import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

work = Path(sys.argv[1])
spec = json.loads((work / "tl_config.json").read_text())
buffer_suffixes = tuple(spec.pop("buffer_suffixes"))


def is_buffer(name):
    return name.split(".")[-1] in buffer_suffixes


def params(model):
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not is_buffer(k)}


# The initial weights of a seeded HookedTransformer (init_mode left at its default).
fresh = HookedTransformer(HookedTransformerConfig(**spec, init_weights=True, seed=999))
save_file(params(fresh), str(work / "tl3_init.safetensors"))

# Our checkpoint, loaded strictly on parameters.
model = HookedTransformer(HookedTransformerConfig(**spec, init_weights=False))
state = load_file(str(work / "checkpoint.safetensors"))
result = model.load_state_dict(state, strict=False)
missing = sorted(result.missing_keys)
unexpected = sorted(result.unexpected_keys)
assert not unexpected, f"unexpected keys: {unexpected}"
assert all(is_buffer(k) for k in missing), f"missing parameters: {missing}"
model.eval()
with torch.no_grad():
    logits = model(load_file(str(work / "tokens.safetensors"))["tokens"])
save_file({"logits": logits.contiguous()}, str(work / "tl3_logits.safetensors"))
report = {
    "transformer_lens": version("transformer-lens"),
    "torch": torch.__version__,
    "missing": missing,
    "unexpected": unexpected,
    "buffers": sorted(n for n, _ in model.named_buffers()),
    "param_names": [n for n, _ in fresh.named_parameters()],
}
(work / "report.json").write_text(json.dumps(report, indent=1))
'''


def _run(cmd: list[str], what: str, timeout: float, cwd: Path | None = None) -> None:
    # The child must see only its own venv, not the one running pytest.
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _venv_dir() -> Path:
    override = os.environ.get("CIRCUITS_TL3_VENV")
    return Path(override) if override else Path.home() / ".cache" / "circuits-tl3-venv"


@pytest.fixture(scope="module")
def tl3_python() -> Path:
    """The python of a venv with TransformerLens 3.x, built once and reused (marker file)."""
    venv = _venv_dir()
    python = venv / "bin" / "python"
    marker = venv / ".circuits-tl3-ready"
    if marker.is_file() and python.is_file():
        print(f"\n[tl3] reusing {venv}")
        return python
    if venv.exists():
        if not (venv / "pyvenv.cfg").is_file():
            pytest.fail(f"{venv} exists and is not a venv; remove it or set CIRCUITS_TL3_VENV")
        shutil.rmtree(venv)  # a half-built venv from an interrupted run
    venv.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _run([sys.executable, "-m", "venv", str(venv)], "creating the venv", 300)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, TORCH_PIN], f"pip install {TORCH_PIN}", INSTALL_TIMEOUT)
    # Pin torch again so the resolver cannot swap it for another (CUDA) build.
    _run([*pip, TL3_SPEC, "safetensors", TORCH_PIN], f"pip install {TL3_SPEC}", INSTALL_TIMEOUT)
    marker.write_text("ok\n")
    print(f"\n[tl3] built {venv} in {time.perf_counter() - start:.0f} s")
    return python


#: The one-block model of Nanda et al. and Power et al.'s two blocks with LayerNorm (issue 22):
#: dropout changes nothing a checkpoint holds, so it is on here too.
CONFIGS = {
    "nanda": lambda: preset("nanda").replace(p=13),
    "power": lambda: preset("nanda").replace(p=13, n_layers=2, normalization="LN", dropout=0.1, engine="reference"),
}


def _config(kind: str = "nanda") -> RunConfig:
    return CONFIGS[kind]()


def _perturb(model: Transformer, seed: int) -> None:
    """A 'trained-ish' state: seeded noise on every parameter, so biases are nonzero too.

    The scale gives logits of a trained model's size (|logit| up to ~30), where float32
    rounding differences between two correct implementations stay within the 1e-5
    tolerance (about 5e-6 seen); much larger weights give logits ~1e3 and ulp-level misses.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.15 * torch.randn(param.shape, generator=gen))


def _param_state(model: Transformer) -> dict[str, torch.Tensor]:
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k not in buffers}


@pytest.fixture(scope="module", params=list(CONFIGS))
def exchange(request: pytest.FixtureRequest, tl3_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Run the TL3 side once per model: our checkpoint and tokens in, its logits and initial
    weights out."""
    work = tmp_path_factory.mktemp("tl3")
    cfg = _config(request.param)
    m = cfg.model
    spec = {
        "n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads, "d_head": m.d_head,
        "d_mlp": m.d_mlp, "act_fn": m.act_fn, "normalization_type": None if m.normalization == "none" else "LN",
        "d_vocab": cfg.d_vocab, "d_vocab_out": cfg.d_vocab_out, "n_ctx": cfg.n_ctx,
        "attn_only": False, "device": "cpu", "buffer_suffixes": list(BUFFER_SUFFIXES),
    }
    (work / "tl_config.json").write_text(json.dumps(spec))

    model = make_model(cfg)
    _perturb(model, seed=1234)
    model.eval()
    tokens = make_task(cfg.task).tokens
    with torch.no_grad():
        logits = model(tokens)
    path = RunStore(work / "run").write_checkpoint(0, _param_state(model))
    shutil.copyfile(path, work / "checkpoint.safetensors")
    save_file({"tokens": tokens.contiguous()}, str(work / "tokens.safetensors"))
    save_file({"logits": logits.contiguous()}, str(work / "ours_logits.safetensors"))

    (work / "tl3_side.py").write_text(TL3_SCRIPT)
    start = time.perf_counter()
    _run([str(tl3_python), str(work / "tl3_side.py"), str(work)], "the TL3 script", 600, cwd=work)
    report = json.loads((work / "report.json").read_text())
    print(
        f"\n[tl3] transformer-lens {report['transformer_lens']}, torch {report['torch']}, "
        f"script {time.perf_counter() - start:.1f} s; missing keys {report['missing']}, "
        f"TL3 buffers {report['buffers']}"
    )
    return {"work": work, "report": report, "logits": logits, "kind": request.param}


def test_checkpoint_loads_strictly_and_logits_match(exchange: dict[str, object]) -> None:
    report = exchange["report"]
    assert report["transformer_lens"].split(".")[0] == "3"
    assert report["unexpected"] == []
    assert all(k.split(".")[-1] in BUFFER_SUFFIXES for k in report["missing"])

    ours = exchange["logits"]
    theirs = load_file(str(exchange["work"] / "tl3_logits.safetensors"))["logits"]
    assert theirs.shape == ours.shape  # [p*p, 3, p]
    print(f"[tl3] max |logit diff| {(theirs - ours).abs().max().item():.3g} "
          f"(logit scale {ours.abs().max().item():.3g})")
    torch.testing.assert_close(theirs[:, -1], ours[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # Not vacuous: the perturbed model's predictions are not constant.
    assert ours[:, -1].argmax(-1).unique().numel() > 1


def test_initial_weights_match_tl3(exchange: dict[str, object]) -> None:
    """Our gpt2 init draws what HookedTransformer(init_weights=True, seed=999) draws."""
    cfg = _config(exchange["kind"])
    assert cfg.model.init == "gpt2" and cfg.model.seed == 999
    ours = _param_state(make_model(cfg))
    theirs = load_file(str(exchange["work"] / "tl3_init.safetensors"))
    assert set(theirs) == set(ours)
    diffs = {k: (theirs[k] - ours[k]).abs().max().item() for k in ours}
    bitwise = all(torch.equal(theirs[k], ours[k]) for k in ours)
    print(f"[tl3] initial weights bitwise equal: {bitwise}; max |diff| per tensor {diffs}")
    # Same draws need the same parameter order (TL initialises in named_parameters order).
    assert [n for n, _ in make_model(cfg).named_parameters()] == exchange["report"]["param_names"]
    for name in ours:
        torch.testing.assert_close(
            theirs[name], ours[name], atol=1e-7, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )
