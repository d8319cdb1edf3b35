"""tasks package: units of work on data (no Prefect). Importing ``model`` first tunes the allocator."""

import model  # noqa: F401  (keeps freed tensor memory in the process: model/allocator.py)
