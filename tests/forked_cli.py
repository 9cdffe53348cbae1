"""Run ``circuits ARGS`` in a fresh process forked from one that has already imported the package.

A command run as ``python -m circuits.cli`` spends about 3.5 s importing torch and TransformerLens
before it does anything; the suite runs about a hundred commands, so that import was a fifth of
CI's time. Here a multiprocessing fork server imports them once and every command runs in its own
child process forked from it: a separate process as a user's would be (its own file locks, signal
handlers, exit code, stdout and stderr, working folder and environment), started warm.

``CIRCUITS_TEST_CLI=subprocess`` runs every command as a plain ``python -m circuits.cli`` instead.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# What a command imports before it computes: loaded once in the fork server. Nothing here runs a
# torch operation at import, so no OpenMP thread pool exists yet when the server forks.
PRELOAD = [
    "torch", "numpy", "pandas", "transformer_lens", "einops", "safetensors.torch", "plotly.graph_objects",
    "circuits", "circuits.cli", "circuits.cli_common", "circuits.cli_experiments", "circuits.trainer",
    "circuits.analysis", "circuits.dashboard", "circuits.experiments", "circuits.importer",
]

_context: multiprocessing.context.BaseContext | None = None


def _server() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def _child(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The command, in the forked child: what ``python -m circuits.cli ARGS`` would do."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [str(Path(cwd) / "circuits"), *args]
    from circuits.cli import main

    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, exit 1
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``circuits ARGS`` run in a warm child process; the result as ``subprocess.run`` gives it."""
    if os.environ.get("CIRCUITS_TEST_CLI") == "subprocess":
        return subprocess.run([sys.executable, "-m", "circuits.cli", *args], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="circuits-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        out.touch()
        err.touch()
        child = _server().Process(target=_child, args=(list(args), str(cwd), env, str(out), str(err)), daemon=False)
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(["circuits", *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(["circuits", *args], child.exitcode, out.read_text(), err.read_text())
