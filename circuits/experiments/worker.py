"""A sweep's local worker process: ``python -m circuits.experiments.worker``.

Each line of its stdin names a job file and a result file (a JSON pair); it reads the stack's
job (:func:`circuits.experiments.executors.job_to_json`), trains it with
:func:`~circuits.experiments.executors.train_stack`, writes the members' outcomes as JSON to the
result file and answers ``done`` on stdout. It stops at the end of its stdin. A fresh
interpreter: nothing of the caller's script is imported again.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from circuits.experiments.executors import job_from_json, train_stack
from circuits.store import atomic_write_bytes


def main() -> int:
    """Serve jobs from stdin until it closes; 0 then."""
    for line in sys.stdin:
        if not line.strip():
            continue
        job_file, result = json.loads(line)
        outcomes = train_stack(job_from_json(json.loads(Path(job_file).read_text())))
        atomic_write_bytes(Path(result), json.dumps([dataclasses.asdict(o) for o in outcomes]).encode())
        print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
