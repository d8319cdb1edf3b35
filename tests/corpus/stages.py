"""Run the bad-input corpus through each stage exactly as users run it, and say what became of every item.

One runner per stage, each returning ``StageRun``: an ``Outcome`` per corpus file name (``ok`` with
the size the stage recorded, or ``rejected``/``error``/``skipped`` with its reason) and the counts
in and out. ``tests/test_reliability_corpus.py`` asserts on these; ``tests/corpus/reliability_table.py``
prints them as the table in ``docs/reliability.md``, so the table is the real behaviour.

- ingest: ``tasks.ingest.pipeline.ingest_ava`` (AVA layout: ``<image_id>.jpg`` + one label line per image);
- training data path: ``tasks.training.datasets.ManifestDataset`` over a manifest Parquet naming the files;
- scoring: ``tasks.scoring.listing.list_source`` + ``tasks.scoring.scorer.score_shards`` (what ``score-bucket`` runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from benchmarks.toy_data import manifest_table
from model.networks import backbone_config
from tasks.core import storage
from tasks.ingest.manifests import read_manifest_table
from tasks.ingest.pipeline import ingest_ava
from tasks.ingest.settings import IngestParams
from tasks.scoring.listing import cut_into_shards, list_source
from tasks.scoring.predictions import read_predictions
from tasks.scoring.scorer import ScoringConfig, score_shards
from tasks.training.datasets import (
    ManifestDataset,
    SkippedSample,
    collate_samples,
    read_manifest,
)
from tests.corpus.make_corpus import CorpusItem, make_image_corpus

# Any valid vote counts: the corpus is about images, the label corpus about labels.
VOTES = "0 1 2 3 4 5 4 3 2 1"
TRAIN_GEOMETRY = ("mobilenet_v3_small", 64)
SCORING_DATE = "2026-01-01"


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | rejected | error | skipped
    reason: str = ""
    width: int | None = None
    height: int | None = None

    def cell(self) -> str:
        if self.status == "ok":
            return f"ok {self.width}x{self.height}"
        return f"{self.status}: {self.reason[:70]}"


@dataclass
class StageRun:
    items: list[CorpusItem]
    outcomes: dict[str, Outcome]  # corpus file name -> what the stage did
    n_in: int
    n_out: int
    extra: dict = field(default_factory=dict)


def run_ingest(workdir: Path, full_decode: bool = False) -> StageRun:
    """The corpus as an AVA mirror (``<id>.jpg``) with a valid label line per image, through ``ingest_ava``."""
    src = workdir / "ingest-src"
    items = make_image_corpus(src / "images", layout="ava")
    lines = [f"{n} {it.image_id} {VOTES} 0 0 1" for n, it in enumerate(items, 1)]
    (src / "AVA.txt").write_text("\n".join(lines) + "\n")
    root = str(workdir / ("ingest-full" if full_decode else "ingest-root"))
    summary = ingest_ava(IngestParams(labels=str(src / "AVA.txt"), images=str(src / "images"), root=root,
                                      full_decode=full_decode, max_concurrency=2, backoff_s=0.01))
    usable = pa.concat_tables([read_manifest_table(root, s) for s in ("train", "val", "test")]).to_pylist()
    rejected = read_manifest_table(root, "rejected").to_pylist()
    by_id = {r["image_id"]: Outcome("ok", width=r["width"], height=r["height"]) for r in usable}
    by_id.update({r["image_id"]: Outcome("rejected", f"{r['stage']}: {r['reason']}") for r in rejected})
    outcomes = {it.name: by_id[it.image_id] for it in items if it.image_id in by_id}
    return StageRun(items, outcomes, len(lines), len(usable) + len(rejected), {"summary": summary, "root": root})


def corpus_dataset(workdir: Path, method: str = "mpemd", train: bool = True) -> tuple[list[CorpusItem], ManifestDataset]:
    """The corpus (its own odd names) behind a manifest Parquet, as the training loop reads it."""
    folder = workdir / "train-src"
    items = make_image_corpus(folder, layout="bucket")
    rows = [{"image_id": it.image_id, "uri": str(folder / it.name), "split": "train",
             "rating_counts": [int(v) for v in VOTES.split()], "n_ratings": 25, "score_mean": 5.5,
             "score_std": 2.0, "width": it.width or 1, "height": it.height or 1,
             "aspect_ratio": (it.height or 1) / (it.width or 1), "aspect_bin": "", "semantic_tags": [],
             "challenge_id": 0} for it in items]
    url = str(workdir / "train-manifest.parquet")
    storage.write_parquet_atomic(manifest_table(rows), url)
    dataset = ManifestDataset(read_manifest(url), backbone_config(*TRAIN_GEOMETRY), method, train=train, n_patches=2)
    return items, dataset


def run_training_path(workdir: Path) -> StageRun:
    """Every sample of the manifest through ``ManifestDataset`` and ``collate_samples``, as an epoch sees it."""
    items, dataset = corpus_dataset(workdir)
    samples = [dataset[(i, 0)] for i in range(len(dataset))]
    batch = collate_samples(samples)
    outcomes = {}
    for it, sample in zip(items, samples, strict=True):
        if isinstance(sample, SkippedSample):
            outcomes[it.name] = Outcome("skipped", sample.reason)
        else:
            _, h, w = dataset.load_image(sample["index"]).shape  # the decoded, displayed size
            outcomes[it.name] = Outcome("ok", width=w, height=h)
    return StageRun(items, outcomes, len(dataset), len(batch) + len(batch.skipped),
                    {"batch_shape": tuple(batch.images.shape)})


def run_scoring(workdir: Path, checkpoint: str, model_version: str) -> StageRun:
    """The corpus as a bucket folder, listed and scored in shards of 8 into Parquet parts."""
    folder = workdir / "score-src"
    items = make_image_corpus(folder, layout="bucket")
    listing = list_source(str(folder))
    out = str(workdir / "score-out")
    config = ScoringConfig(batch_size=8, progress=False)
    results = list(score_shards(cut_into_shards(listing.objects, 8), checkpoint=checkpoint, out=out,
                                date=SCORING_DATE, config=config))
    rows = read_predictions(out, model_version, latest=False).to_pylist()
    outcomes = {}
    for row in rows:
        name = Path(row["uri"]).name
        outcomes[name] = (Outcome("ok", width=row["width"], height=row["height"]) if row["status"] == "ok"
                          else Outcome("error", row["error"]))
    for uri in listing.skipped_examples:
        outcomes[Path(uri).name] = Outcome("skipped", "not an image by name or content (counted, not scored)")
    return StageRun(items, outcomes, len(items), len(rows) + listing.skipped_non_image,
                    {"results": results, "rows": rows, "out": out, "listing": listing})
