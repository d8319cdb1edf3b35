"""DuckDB queries, one question per ``.sql`` file (a package only so that installs ship the files;
``tasks.analysis.sql`` finds them beside the ``tasks`` package)."""
