"""Where a sweep's stacks train: in this process, in local worker processes, or as Ray tasks.

A sweep is split into *stacks* by :func:`plan_stacks`: members that share shapes and schedule
train together as one stacked computation (:mod:`circuits.engine.ensemble`), up to
``max_ensemble`` each; a member the fused engine cannot stack (the reference engine) is a stack
of one. Every executor trains the same stacks with the same number of torch threads
(:func:`train_stack`), so the run folders they write are the same bits (design.md, "Sweeps");
they differ only in where the work happens:

* :class:`LocalExecutor`: in this process (one worker), or in up to ``workers`` worker processes
  at once with ``threads`` torch threads each, never more threads than cores in all;
* :class:`RayExecutor`: one Ray task per stack (``num_cpus=threads``) on an existing cluster
  (``address``, or ``RAY_ADDRESS``) or on a local one started for the sweep and shut down after.
  The run folders must be on storage every node sees.

A stack's outcome comes back as one :class:`MemberOutcome` per member; a failure (a refused
configuration, a diverged loss, an exception) is recorded on the members it touched and never
stops the other stacks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuits.errors import MissingExtra, ProtocolError

__all__ = ["StackJob", "MemberOutcome", "plan_stacks", "train_chunk", "train_stack", "torch_threads", "diverged_error",
           "analysis_phases", "LocalExecutor", "RayExecutor", "make_executor", "BACKENDS"]

#: The executors :func:`make_executor` knows.
BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class StackJob:
    """One stack to train: its members' configs and run folders, the torch threads to use, the
    device, and whether to analyse each finished member (default measures)."""

    configs: tuple[Any, ...]
    paths: tuple[str, ...]
    threads: int = 1
    device: str | None = None
    analyze: bool = False


@dataclass
class MemberOutcome:
    """What became of one member: ``status`` ``done``, ``diverged``, ``failed`` or ``interrupted``
    (Ctrl-C reached its worker; its state is saved), the error text, and (``analyze``) the
    analysis' phase boundaries."""

    path: str
    status: str
    error: str | None = None
    phases: dict[str, Any] = field(default_factory=dict)


def plan_stacks(configs: Sequence[Any], max_ensemble: int) -> list[list[int]]:
    """Split members (their configs, in order) into stacks: indices of members that train as one
    stacked computation. Members with the same stack key (shapes, schedule, engine) go together in
    order of appearance, ``max_ensemble`` at most; a reference-engine member is alone. The same
    split for every executor."""
    from circuits.engine.stacked import stack_key

    if max_ensemble < 1:
        raise ProtocolError(f"max_ensemble must be at least 1, got {max_ensemble}")
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        key = json.dumps(stack_key(config), sort_keys=True)
        if config.train.engine != "fused":
            key += f"#{i}"  # the reference engine trains one run at a time
        groups.setdefault(key, []).append(i)
    return [g[i : i + max_ensemble] for g in groups.values() for i in range(0, len(g), max_ensemble)]


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads, then restore the caller's count (the same thread
    count gives the same bits whichever executor runs a stack)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_chunk(
    configs: Sequence[Any],
    paths: Sequence[Path],
    on_step: Callable[[Any], None] | None = None,
    device: str | None = None,
    on_error: Callable[[Path, Exception], None] | None = None,
) -> None:
    """Train (or resume) one stack in this process: fused configs as one stacked ensemble,
    reference-engine ones each alone (they cannot stack). ``on_error(path, error)`` takes a
    reference member's failure and the next member goes on; without it the failure raises.
    The one place a stack meets the training loop, for every executor and for protocols."""
    from circuits.run import train, train_ensemble

    if configs[0].train.engine == "fused":
        train_ensemble(list(configs), list(paths), on_step=on_step, device=device)
        return
    for config, path in zip(configs, paths):
        try:
            train(config, out=path, on_step=on_step, device=device)
        except Exception as e:  # handed to on_error, or raised
            if on_error is None:
                raise
            on_error(path, e)


def train_stack(job: StackJob, on_step: Callable[[Any], None] | None = None) -> list[MemberOutcome]:
    """Train (or resume) one stack with ``job.threads`` torch threads; one outcome per member.

    Never raises for a member's own failure: a refused configuration or an error fails the
    members it touched, a non-finite loss marks the member diverged (its folder keeps the last
    finite checkpoint). Ctrl-C still stops it (KeyboardInterrupt is not an Exception)."""
    from circuits.errors import TrainingDiverged

    errors: dict[str, str] = {}
    configs, paths = list(job.configs), [Path(p) for p in job.paths]

    def record(path: Path, e: Exception) -> None:
        if not isinstance(e, TrainingDiverged):  # a divergence is read back from the folder's mark
            errors[str(path)] = _error_line(e)

    with torch_threads(job.threads):
        try:
            train_chunk(configs, paths, on_step=on_step, device=job.device, on_error=record)
        except TrainingDiverged:
            pass
        except Exception as e:  # noqa: BLE001 - the whole stack failed; each member records why
            for path in paths:
                errors.setdefault(str(path), _error_line(e))
        return [_outcome(path, errors.get(str(path)), job.analyze) for path in paths]


def diverged_error(mark: dict[str, Any]) -> str:
    """The error a diverged member records: where its loss went non-finite, at which lr."""
    return f"the train loss became non-finite at epoch {mark['epoch']} (lr {mark['lr']:g})"


def analysis_phases(run: Any) -> dict[str, Any]:
    """The phase boundaries of the run's default analysis (reused where it exists)."""
    from circuits.analysis import analyze as run_analysis

    return dict(run_analysis(run).summary.get("phases") or {})


def _outcome(path: Path, error: str | None, analyze: bool) -> MemberOutcome:
    from circuits.run import load_run
    from circuits.store import RunStore

    if error is not None:
        return MemberOutcome(str(path), "failed", error)
    mark = RunStore(path).diverged()
    if mark is not None:
        return MemberOutcome(str(path), "diverged", diverged_error(mark))
    run = load_run(path)
    if not run.is_complete:
        return MemberOutcome(str(path), "failed", "training stopped before the last epoch")
    phases: dict[str, Any] = {}
    if analyze:
        try:
            phases = analysis_phases(run)
        except Exception as e:  # noqa: BLE001 - the run is fine; only its phases are missing
            return MemberOutcome(str(path), "done", f"analysis failed: {_error_line(e)}")
    return MemberOutcome(str(path), "done", None, phases)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def job_to_json(job: StackJob) -> dict[str, Any]:
    """A job as plain JSON (a worker process reads it; no pickle crosses processes here)."""
    return {"configs": [c.to_dict() for c in job.configs], "paths": list(job.paths), "threads": job.threads,
            "device": job.device, "analyze": job.analyze}


def job_from_json(data: dict[str, Any]) -> StackJob:
    """Inverse of :func:`job_to_json`."""
    from circuits.config import RunConfig

    return StackJob(tuple(RunConfig.from_dict(c) for c in data["configs"]), tuple(data["paths"]),
                    int(data["threads"]), data["device"], bool(data["analyze"]))


Done = Callable[[int, list[MemberOutcome]], None]


class LocalExecutor:
    """Stacks in this process (``workers`` 1), or spread over ``workers`` worker processes
    (``python -m circuits.experiments.worker``, fresh interpreters that take one stack at a time,
    so a user's script needs no ``if __name__ == "__main__"`` guard, and a worker that dies fails
    only the stack it held)."""

    name = "local"

    def __init__(self, workers: int = 1, threads: int | None = None) -> None:
        if workers < 1:
            raise ProtocolError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        #: Torch threads per stack when a caller does not set them (the cores shared among the workers).
        self.threads = threads if threads is not None else max(1, _cores() // workers)

    def run(self, jobs: Sequence[StackJob], on_done: Done, on_start: Callable[[int], None] | None = None,
            on_step: Callable[[Any], None] | None = None) -> None:
        """Train every job; ``on_done(i, outcomes)`` as each finishes (in this process)."""
        if self.workers == 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                if on_start is not None:
                    on_start(i)
                on_done(i, train_stack(job, on_step))
            return
        import subprocess
        import sys
        import tempfile

        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # idle OpenMP threads must not spin beside the others
        with tempfile.TemporaryDirectory(prefix="circuits-sweep-") as tmp:
            queue = list(range(len(jobs)))
            workers: list[_Worker] = []
            try:
                for k in range(min(self.workers, len(jobs))):
                    log = Path(tmp) / f"worker{k}.log"
                    with open(log, "wb") as err:
                        proc = subprocess.Popen([sys.executable, "-m", "circuits.experiments.worker"], env=env,
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
                    workers.append(_Worker(proc, log))
                busy: dict[int, _Worker] = {}
                while queue or busy:
                    for w in workers:
                        if queue and w not in busy.values() and w.alive:
                            i = queue.pop(0)
                            w.send(jobs[i], Path(tmp) / f"{i}.job.json", Path(tmp) / f"{i}.out.json")
                            busy[i] = w
                            if on_start is not None:
                                on_start(i)
                    if not busy:  # every worker died with jobs left: they fail with its reason
                        for i in queue:
                            on_done(i, _read_outcomes(jobs[i], workers[0].proc.poll(), Path(tmp) / "none", workers[0].log))
                        queue.clear()
                        break
                    i, w = _first_finished(busy)
                    del busy[i]
                    on_done(i, w.outcomes(jobs[i]))
            except BaseException:
                # Ctrl-C here: each worker stops as Ctrl-C stops a run (it saves, then exits). A
                # terminal's Ctrl-C reached them already; a second SIGINT only sets the same flag.
                import signal

                for w in workers:
                    if w.alive:
                        w.proc.send_signal(signal.SIGINT)
                for w in workers:
                    try:
                        w.proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        w.proc.kill()
                raise
            finally:
                for w in workers:
                    w.close()


class _Worker:
    """A worker process that trains one job per line of its stdin and answers a line when done."""

    def __init__(self, proc: Any, log: Path) -> None:
        self.proc, self.log = proc, log
        self.result: Path | None = None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, job: StackJob, job_file: Path, result: Path) -> None:
        job_file.write_text(json.dumps(job_to_json(job)))
        self.result = result
        try:
            self.proc.stdin.write(json.dumps([str(job_file), str(result)]) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died; its answer (none) fails the job below

    def outcomes(self, job: StackJob) -> list[MemberOutcome]:
        line = self.proc.stdout.readline()  # "done", or EOF when the process died
        code = 0 if line.strip() == "done" else (self.proc.wait() if self.proc.poll() is None else self.proc.returncode)
        return _read_outcomes(job, code, self.result, self.log)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a worker that will not stop is killed
                self.proc.kill()


def _first_finished(busy: dict[int, _Worker]) -> tuple[int, _Worker]:
    """The first busy worker with an answer (or an exit) to read; waits for one."""
    import select

    while True:
        ready, _, _ = select.select([w.proc.stdout for w in busy.values()], [], [])
        for i, w in busy.items():
            if w.proc.stdout in ready:
                return i, w


def _read_outcomes(job: StackJob, code: int | None, result: Path | None, log: Path) -> list[MemberOutcome]:
    if code == 0 and result is not None and result.is_file():
        return [MemberOutcome(**o) for o in json.loads(result.read_text())]
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    if lines and "TrainingInterrupted" in lines[-1]:
        # Ctrl-C reached the worker: its members saved their state and resume on a rerun.
        return [MemberOutcome(p, "interrupted", lines[-1].split(": ", 1)[-1].strip()) for p in job.paths]
    why = f"the worker process exited with code {code}" + (f": {lines[-1].strip()}" if lines else "")
    return [MemberOutcome(p, "failed", why) for p in job.paths]


class RayExecutor:
    """One Ray task per stack, on the cluster at ``address`` (or ``RAY_ADDRESS``), else on a local
    Ray instance started for the sweep (``cores`` CPUs, on 127.0.0.1, no dashboard, usage
    statistics off) and shut down afterwards."""

    name = "ray"

    def __init__(self, address: str | None = None, cores: int | None = None, threads: int | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise MissingExtra(
                "the ray backend needs Ray; install it with pip install 'circuits[ray]' "
                "(or run the sweep with --backend local)"
            ) from None
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cores = cores
        #: Torch threads (Ray CPUs) per stack when a caller does not set them.
        self.threads = threads if threads is not None else 1

    def run(self, jobs: Sequence[StackJob], on_done: Done, on_start: Callable[[int], None] | None = None,
            on_step: Callable[[Any], None] | None = None) -> None:
        """Submit every job as a Ray task; ``on_done(i, outcomes)`` here as each finishes."""
        import ray

        started = False
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(num_cpus=self.cores or _cores(), include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
            started = True
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            need = max((job.threads for job in jobs), default=1)
            if need > cpus:  # Ray would wait forever for a node that large
                raise ProtocolError(f"a stack asks for {need} CPUs (--threads) but the Ray cluster has {cpus:g}; "
                                    "use fewer --threads")
            remote = ray.remote(max_retries=0)(train_stack)
            refs = {}
            for i, job in enumerate(jobs):
                refs[remote.options(num_cpus=max(1, job.threads)).remote(job)] = i
                if on_start is not None:
                    on_start(i)
            try:
                while refs:
                    ready, _ = ray.wait(list(refs), num_returns=1)
                    for ref in ready:
                        i = refs.pop(ref)
                        try:
                            outcomes = ray.get(ref)
                        except ray.exceptions.RayError as e:  # the task itself died (a lost node, OOM)
                            outcomes = [MemberOutcome(p, "failed", _error_line(e)) for p in jobs[i].paths]
                        on_done(i, outcomes)
            except BaseException:
                for ref in refs:
                    ray.cancel(ref, force=True)
                raise
        finally:
            if started:
                ray.shutdown()


def make_executor(backend: str, workers: int = 1, address: str | None = None,
                  cores: int | None = None, threads: int | None = None) -> LocalExecutor | RayExecutor:
    """The executor called ``backend`` (``local`` or ``ray``); ``threads`` per stack by default."""
    if backend == "local":
        return LocalExecutor(workers, threads)
    if backend == "ray":
        return RayExecutor(address, cores, threads)
    raise ProtocolError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
