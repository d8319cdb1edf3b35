"""The data contracts of DESIGN.md as Arrow schemas: labels, rejected rows, fetch records, manifests,
predictions.

One definition each, imported by the modules that write them (``tasks.ingest.labels``,
``tasks.ingest.fetch``, ``tasks.ingest.manifests``, ``tasks.scoring.predictions``, the benchmarks'
toy data) and by ``tasks.analysis.sql``, which needs them only to give an empty root's views their
columns: this module imports pyarrow alone, so ``mpemd sql`` does not load pandas for them.
"""

from __future__ import annotations

import pyarrow as pa

# The votes of one image as a label line gives them; the manifests carry these columns unchanged.
VOTE_FIELDS = (
    pa.field("rating_counts", pa.list_(pa.int32(), 10)),
    pa.field("n_ratings", pa.int32()),
    pa.field("score_mean", pa.float64()),
    pa.field("score_std", pa.float64()),
)

LABEL_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("line_number", pa.int64()),
    *VOTE_FIELDS,
    ("semantic_tags", pa.list_(pa.int32())),
    ("challenge_id", pa.int32()),
])

# Every per-image table (manifests, rejected rows, fetch records) is keyed by these two columns.
IMAGE_KEY_FIELDS = (pa.field("image_id", pa.int64()), pa.field("uri", pa.string()))

# DESIGN.md's rejected row; fetch writes the same without the label line's number.
REJECTED_SCHEMA = pa.schema([
    *IMAGE_KEY_FIELDS,
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("line_number", pa.int64()),
])

# What fetching records of an image file (the fetch records and, after the contract, the manifests).
FILE_FIELDS = (
    pa.field("raw_width", pa.int32()),
    pa.field("raw_height", pa.int32()),
    pa.field("orientation", pa.int32()),  # EXIF orientation
    pa.field("format", pa.string()),
    pa.field("bytes", pa.int64()),
    pa.field("checksum", pa.string()),  # md5 of the file's bytes, hex
)

# DESIGN.md's manifest contract: the columns every manifest has (training reads these).
MANIFEST_CONTRACT_SCHEMA = pa.schema([
    *IMAGE_KEY_FIELDS,
    ("split", pa.string()),
    *VOTE_FIELDS,
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("aspect_ratio", pa.float64()),
    ("aspect_bin", pa.string()),
    ("semantic_tags", pa.list_(pa.int32())),
    ("challenge_id", pa.int32()),
])

# What ingest writes: the contract, then what fetching recorded of each image.
MANIFEST_SCHEMA = pa.schema([
    *MANIFEST_CONTRACT_SCHEMA,
    *FILE_FIELDS,
    ("source_uri", pa.string()),
    ("line_number", pa.int64()),
])

# One verified image as fetching records it (resumable state of ``tasks.ingest.fetch``).
IMAGE_SCHEMA = pa.schema([
    *IMAGE_KEY_FIELDS,
    ("source_uri", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    *FILE_FIELDS,
    ("verified", pa.string()),  # header | full
])

FETCH_REJECTED_SCHEMA = pa.schema([f for f in REJECTED_SCHEMA if f.name != "line_number"])

PREDICTION_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("image_id", pa.int64()),
    pa.field("model", pa.string(), nullable=False),  # nima | mpemd
    pa.field("patch_mode", pa.string()),  # warp (nima) | random | grid
    pa.field("n_patches", pa.int32()),
    pa.field("dist", pa.list_(pa.float32(), 10)),
    pa.field("score", pa.float64()),
    pa.field("score_std", pa.float64()),
    pa.field("width", pa.int32()),  # as displayed (after EXIF orientation)
    pa.field("height", pa.int32()),
    pa.field("aspect_ratio", pa.float64()),  # height / width
    pa.field("source_etag", pa.string()),
    pa.field("source_size", pa.int64()),  # listing facts: the fingerprint when there is no ETag
    pa.field("source_mtime", pa.float64()),
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # ok | error
    pa.field("error", pa.string()),  # "<stage>: <reason>" when status is error
])


def conform(data: pa.Table | pa.RecordBatch, schema: pa.Schema = PREDICTION_SCHEMA) -> pa.Table:
    """``data`` with exactly ``schema``'s columns, in its order and types: a column it lacks (a file of an
    older writer) reads as nulls, as every reader of the table sees it; columns it has beyond are dropped."""
    columns = [pa.chunked_array(data.column(f.name)) if f.name in data.schema.names
               else pa.chunked_array([pa.nulls(data.num_rows, f.type)], f.type) for f in schema]
    return pa.Table.from_arrays(columns, names=schema.names).cast(schema)
