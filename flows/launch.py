"""The ``mpemd`` console script: ``mpemd sql ...`` goes straight to ``flows.sql_cli``; everything else
to ``flows.cli``, which builds every flow command's flags from its pydantic parameter model.

Why a launcher: importing ``flows.cli`` (pydantic and the parameter models of every flow) costs
~0.17 s, paid by each ``mpemd sql`` call, which needs none of it. The sql subcommand is the same
either way (``flows.cli`` registers ``sql_cli``'s arguments); ``mpemd -v sql`` takes the full path.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sql"]:
        from flows import sql_cli

        return sql_cli.main(argv[1:])
    from flows import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
