"""Untrusted files and names: output paths cannot leave their root, and credentials never leak.

Elsewhere: a planted malicious pickle never executes (tests/test_checkpoint.py::
test_malicious_pickle_does_not_execute); hostile SQL parameters are bound, never spliced
(tests/test_sql.py::test_hostile_strings_are_bound_as_values); the decompression-bomb limit
(tests/test_reliability_corpus.py, docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, checkpoint_bytes, load_checkpoint
from model.networks import build_model
from tasks.core import storage
from tasks.ingest.synth import synthesize_ava
from tasks.scoring.listing import list_source
from tasks.scoring.predictions import read_predictions
from tasks.scoring.scorer import ScoringConfig, score_shards
from tasks.training.loop import run_paths
from tests.corpus.make_corpus import hostile_object_keys
from tests.scoring_fixtures import image_bytes, make_checkpoint

DATE = "2026-03-04"


# One torch thread: bitwise-equal runs across processes, and a 2-core machine is not oversubscribed.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _crafted_checkpoint(version: object) -> bytes:
    """A checkpoint that is valid in every way but its model_version (which names the output folder)."""
    checkpoint = torch.load(io.BytesIO(checkpoint_bytes(build_model("mobilenet_v3_small", "none"))), weights_only=True)
    checkpoint["model_version"] = version
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("version", ["../../escaped", "/abs/path", "a/b", "..", "", 7])
def test_a_crafted_model_version_cannot_move_the_output(tmp_path: Path, version: object) -> None:
    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(_crafted_checkpoint(version))
    with pytest.raises(CheckpointError, match="invalid model_version"):
        load_checkpoint(crafted.read_bytes())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "1.jpg").write_bytes(image_bytes(1, 40, 30))
    with pytest.raises(CheckpointError):
        list(score_shards([list_source(str(tmp_path / "src")).objects], checkpoint=str(crafted),
                          out=str(tmp_path / "a" / "b" / "out"), date=DATE, config=ScoringConfig(progress=False)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.pt", "src"]  # nothing written anywhere


@pytest.mark.parametrize("run_id", ["../escaped", "/abs", "a/b", "..", "", "x\\y"])
def test_a_run_id_is_one_path_segment(run_id: str) -> None:
    with pytest.raises(ValueError, match="one path segment"):
        run_paths("/data", run_id)
    assert run_paths("/data", "nima-20260101-abc").run_dir == "/data/runs/nima-20260101-abc"


@pytest.mark.s3
def test_hostile_object_keys_stay_inside_the_output_prefix(s3_bucket: str, tmp_path: Path) -> None:
    """Keys with '..', leading slashes, '.' and empty segments are scored as what they are (object
    names); every object the run writes lies under the output prefix, and nothing lands on local disk."""
    fs, _ = storage.filesystem(s3_bucket)
    bucket = s3_bucket[5:]
    keys = [f"in/{key}" for key, _ in hostile_object_keys()]
    for i, key in enumerate(keys):
        fs.pipe_file(f"{bucket}/{key}", image_bytes(i, 40, 30))
    checkpoint = str(tmp_path / "model.pt")
    version = make_checkpoint(checkpoint)
    before = set(fs.find(bucket))
    local_before = sorted(Path.cwd().iterdir())
    listing = list_source(f"{s3_bucket}/in")
    list(score_shards([listing.objects], checkpoint=checkpoint, out=f"{s3_bucket}/out", date=DATE,
                      config=ScoringConfig(progress=False)))
    fs.invalidate_cache()
    written = set(fs.find(bucket)) - before
    # the parts, and the version's schema record (tasks.scoring.predictions.record_schema) beside its dates
    schema_record = f"{bucket}/out/model_version={version}/_schema.json"
    assert written and all(p.startswith(f"{bucket}/out/model_version={version}/date={DATE}/") or p == schema_record
                           for p in written)
    assert sorted(Path.cwd().iterdir()) == local_before
    rows = read_predictions(f"{s3_bucket}/out", version, latest=False).to_pylist()
    # One row per key PLANTED (not per key the listing happened to return): a key lost or doubled fails.
    assert len(rows) == len(keys) == len(listing.objects)
    assert sorted(r["uri"] for r in rows) == sorted(f"{s3_bucket}/{key}" for key in keys)
    assert {r["status"] for r in rows} == {"ok"}


SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAMPEMDLEAKCHECK42",
    "AWS_SECRET_ACCESS_KEY": "mpemd-secret-leak-check-Zq9vX",
    "PREFECT_API_KEY": "pnu_mpemdleakcheckapikey0000000000000",
}


@pytest.mark.s3
@pytest.mark.slow
def test_credentials_never_reach_outputs_logs_or_artifacts(prefect_harness, s3_bucket, tmp_path, monkeypatch,
                                                           caplog, capfd) -> None:
    import s3fs
    from prefect.client.orchestration import get_client

    from flows.analyze_errors import PredictionSetChoice, analyze_errors
    from flows.ingest_ava import ingest_ava_flow
    from flows.score_bucket import score_bucket

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # new clients sign with the secret keys
    caplog.set_level(logging.INFO)
    src = tmp_path / "ava"
    synthesize_ava(str(src), 12, seed=3, workers=1)
    sorted((src / "images").iterdir())[0].write_bytes(b"<html>403</html>")  # a rejected row in ingest
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(src), f"{s3_bucket[5:]}/raw", recursive=True)
    root = f"{s3_bucket}/root"
    ingest_ava_flow(labels=f"{s3_bucket}/raw/AVA.txt", images=f"{s3_bucket}/raw/images", root=root,
                    max_concurrency=2)
    storage.write_bytes_atomic(f"{root}/ava/images/999.jpg", b"\xff\xd8 broken")  # an error row in scoring
    versions = {}
    for method in ("nima", "mpemd"):
        path = tmp_path / f"{method}.pt"
        versions[method] = make_checkpoint(path, seed=len(method), method=method, stage=method)
        storage.write_bytes_atomic(f"{root}/models/{method}.pt", path.read_bytes())
        score_bucket(source=f"{root}/ava/images", checkpoint=f"{root}/models/{method}.pt",
                     out=f"{root}/predictions", date=DATE, batch_size=4)
    analyze_errors(
        root=root, split=None, headline_min_n=1,
        nima=PredictionSetChoice(model_version=versions["nima"], label="NIMA"),
        mpemd=PredictionSetChoice(model_version=versions["mpemd"], label="MPEMD"))

    fs.invalidate_cache()
    outputs = {p: fs.cat_file(p) for p in fs.find(s3_bucket[5:])}
    assert any("/predictions/" in p for p in outputs) and any("/reports/" in p for p in outputs)
    error_rows = read_predictions(f"{root}/predictions", versions["nima"], latest=False).to_pylist()
    assert any(r["status"] == "error" for r in error_rows)

    async def artifacts() -> list:
        async with get_client() as client:
            return await client.read_artifacts()

    texts = [repr(a.data) + repr(a.description) for a in asyncio.run(artifacts())]
    captured = capfd.readouterr()
    logs = caplog.text + captured.out + captured.err
    assert "score-bucket" in logs and len(texts) >= 3
    for name, secret in SECRETS.items():
        leaks = [p for p, data in outputs.items() if secret.encode() in data]
        assert not leaks, f"{name} in {leaks}"
        assert secret not in logs, name
        assert not any(secret in t for t in texts), name
        assert all(secret not in str(r["error"]) for r in error_rows), name
