"""Every value a page shows from a file is escaped (issue 19, item 7): a crafted run or analysis
folder cannot put markup, let alone script, into a dashboard."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import circuits
from circuits.analysis import analyze, load_analysis
from circuits.dashboard.writers import _run_facts, _runs_table, write_run_dashboard

PAYLOAD = '<img src=x onerror="alert(1)">'


def _markup_outside_scripts(page: str) -> str:
    # JSON blocks in <script type="application/json"> are data, not markup (and "</" is escaped
    # in them); everything else is what the browser parses as HTML.
    return re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)


def _hostile_analysis(tiny_run: circuits.Run, tmp_path: Path):  # noqa: ANN202
    analysis = load_analysis(analyze(tiny_run, out=tmp_path / "a", key_freqs=[1, 3]).path)
    summary = dict(analysis.summary)
    # (key_frequencies stay ints: load_analysis's reader is item 6's; they are escaped too.)
    summary["n_checkpoints"] = PAYLOAD
    summary["phases"] = {"memorisation_end": PAYLOAD, "circuit_formation_end": 3, "cleanup_end": None}
    summary["final"] = {"epoch": PAYLOAD, "train_acc": PAYLOAD, "test_acc": PAYLOAD, "test_loss": PAYLOAD}
    return dataclasses.replace(analysis, summary=summary)


def test_facts_and_tables_escape_every_value(tiny_run: circuits.Run, tmp_path: Path) -> None:
    analysis = _hostile_analysis(tiny_run, tmp_path)
    config = tiny_run.config.to_dict()
    for part in ("task", "model", "train"):
        for key in config[part]:
            config[part][key] = PAYLOAD
    html_parts = _run_facts(analysis, config) + [_runs_table([analysis], [PAYLOAD])]
    text = "".join(html_parts)
    assert PAYLOAD not in text and "<img" not in text
    assert text.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;") >= 10


def test_a_run_page_from_hostile_folder_names_has_no_injected_markup(tiny_run: circuits.Run, tmp_path: Path) -> None:
    hostile = tmp_path / PAYLOAD.replace("/", "_") / PAYLOAD.replace("/", "_")
    shutil.copytree(tiny_run.path, hostile)
    result = analyze(circuits.load_run(hostile), out=tmp_path / f"out{PAYLOAD.replace('/', '_')}")
    page = write_run_dashboard(result.path, run=hostile).read_text()
    markup = _markup_outside_scripts(page)
    assert "<img" not in markup and "onerror=\"alert" not in markup
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in markup  # shown, as text
