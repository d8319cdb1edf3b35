"""Print the corpus table of ``docs/reliability.md`` from the real behaviour of every stage.

    .venv/bin/python -m tests.corpus.reliability_table > /tmp/table.md

Each cell is what the stage really did with the item in this run (see ``tests/corpus/stages.py``);
the test suite asserts the same outcomes, so the table cannot drift from the code unnoticed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tasks.ingest.labels import parse_labels_text
from tests.corpus.make_corpus import label_corpus_lines, make_label_corpus
from tests.corpus.stages import StageRun, run_ingest, run_scoring, run_training_path
from tests.scoring_fixtures import make_checkpoint


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def image_table(runs: dict[str, StageRun]) -> str:
    names = list(runs)
    lines = ["| file | what it is | expected | " + " | ".join(names) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    first = next(iter(runs.values()))
    for it in first.items:
        want = f"ok {it.width}x{it.height}" if it.expect == "ok" else f"refused ({it.reason_contains})"
        cells = [_escape(runs[n].outcomes[it.name].cell()) if it.name in runs[n].outcomes else "**missing**"
                 for n in names]
        lines.append(f"| `{_escape(it.name)}` | {it.kind} | {want} | " + " | ".join(cells) + " |")
    lines.append("| **count in / out** | | | " + " | ".join(f"{runs[n].n_in} / {runs[n].n_out}" for n in names) + " |")
    return "\n".join(lines)


def label_table() -> str:
    parsed = parse_labels_text(make_label_corpus(), uri="AVA.txt")
    rejected = {r["line_number"]: r for r in parsed.rejected.to_pylist()}
    labelled = set(parsed.labels.column("line_number").to_pylist())
    lines = ["| line | expected | parser |", "| --- | --- | --- |"]
    for n, line in enumerate(label_corpus_lines(), 1):
        if n in rejected:
            got = f"rejected ({rejected[n]['stage']}): {rejected[n]['reason']}"
        elif n in labelled:
            got = "labelled"
        else:
            got = "skipped (blank line: not an image)"
        shown = repr(line.text)[1:-1] or "(empty)"
        want = line.expect + (f" ({line.reason_contains})" if line.reason_contains else "")
        lines.append(f"| `{_escape(shown)}` | {want} | {_escape(got)} |")
    lines.append(f"| **lines in / rows out** | | {parsed.n_lines} / {parsed.labels.num_rows + parsed.rejected.num_rows} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        version = make_checkpoint(work / "model.pt")
        runs = {
            "ingest (header check)": run_ingest(work),
            "ingest (--full-decode)": run_ingest(work, full_decode=True),
            "training data path": run_training_path(work),
            "scoring": run_scoring(work, str(work / "model.pt"), version),
        }
        print(image_table(runs))
        print()
        print(label_table())


if __name__ == "__main__":
    main()
