from __future__ import annotations

import pytest

from custom_components.config.options import as_flag


@pytest.mark.parametrize("value", [True, "true", "True", " TRUE ", "1", 1, "yes", "y", "t", "on"])
def test_as_flag_reads_true_as_a_command_line_gives_it(value):
    assert as_flag(value) is True


@pytest.mark.parametrize("value", [False, "false", "False", "0", 0, "no", "n", "f", "off", "none", "null", "", None])
def test_as_flag_reads_false_as_a_command_line_gives_it(value):
    assert as_flag(value) is False


@pytest.mark.parametrize("value", ["maybe", "2", 2, "1.0", "truth"])
def test_as_flag_refuses_other_values_naming_the_option(value):
    with pytest.raises(ValueError, match=rf"resume must be true or false, got {value!r}"):
        as_flag(value, "resume")
