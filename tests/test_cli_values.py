"""One spelling of KEY=VALUE and of booleans for every command line (tasks/core/cli_values.py)."""

from __future__ import annotations

import argparse

import pytest

from tasks.analysis.sql import QueryParam
from tasks.core.cli_values import FALSE_WORDS, TRUE_WORDS, ValueFormatError, parse_bool, parse_key_values
from tasks.training.presets import resolve_config

WORDS = [(w, True) for w in TRUE_WORDS] + [(w, False) for w in FALSE_WORDS]


@pytest.mark.parametrize(("word", "value"), WORDS)
def test_every_command_line_reads_the_same_booleans(word, value):
    flag = QueryParam("flag", "BOOLEAN", False, None, "")
    for spelling in (word, word.upper()):
        assert parse_bool(spelling) is value
        assert flag.convert(spelling) is value  # mpemd sql --param flag=...
        assert resolve_config("paper", {"freeze_backbone": spelling}).freeze_backbone is value  # overrides


def test_a_bad_boolean_or_pair_says_what_it_wants():
    with pytest.raises(ValueError, match="expected a boolean"):
        QueryParam("flag", "BOOLEAN", False, None, "").convert("maybe")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_key_values(["lr"])
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--pair", type=lambda text: parse_key_values([text]))
    with pytest.raises(argparse.ArgumentError, match="KEY=VALUE"):  # argparse shows the message as is
        parser.parse_args(["--pair", "novalue"])
    with pytest.raises(ValueFormatError):
        parse_key_values(["=x"])


def test_pairs_keep_the_value_as_given():
    assert parse_key_values(["a=1", " b =x=y", "a=2"]) == {"a": "2", "b": "x=y"}
    assert resolve_config("paper", parse_key_values(["lr= 0.01 "])).lr == 0.01  # a number's spaces are not its value


def test_none_clears_only_a_field_that_may_be_none():
    """``--set amp=none`` is amp's own choice "none" (CPU runs use it); ``--set image_size=none`` clears
    an optional field."""
    from tasks.training.presets import TrainOverrides

    assert resolve_config("cpu-smoke", {"amp": "none"}).amp == "none"
    assert resolve_config("cpu-smoke", TrainOverrides(amp="none")).amp == "none"
    assert resolve_config("paper", {"image_size": "none"}).image_size is None
