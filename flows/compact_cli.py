"""``mpemd compact``: merge each ``date=`` partition of a predictions root into one Parquet file.

A plain command, not a flow: it is storage upkeep that ``mpemd score`` already does inside its own
flow at the end of each run (``ScoreBucketParams.compact``), so it needs neither Prefect's run
records nor its start-up; the flags still come from a parameter model (``CompactParams``) like every
other command. No torch, no Prefect: pyarrow and fsspec only.
"""

from __future__ import annotations

import json

from flows.params import CompactParams


def cli_run(params: CompactParams) -> int:
    from tasks.scoring.compaction import compact_output

    summary = compact_output(params.out, params.model_version, lock_wait_s=params.lock_wait_s)
    print(json.dumps(summary, indent=2))
    return 0
