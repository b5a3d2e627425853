from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import mutation_check  # noqa: E402


@pytest.mark.parametrize("name", sorted(mutation_check.MUTATIONS))
def test_every_mutation_still_applies_to_exactly_one_line(name):
    """A refactor that moves a mutated line must update the check, not make it pass by applying nothing."""
    m = mutation_check.MUTATIONS[name]
    assert (ROOT / "custom_components" / m.file).read_text().count(m.old) == 1


def test_a_planted_bug_turns_its_tests_red_and_the_repository_is_untouched():
    before = (ROOT / "custom_components" / "losses" / "synthesis.py").read_text()
    result = mutation_check.run_one("attention_sign", mutation_check.MUTATIONS["attention_sign"])
    assert result["red"], result
    assert "test_losses.py" in result["summary"]
    assert (ROOT / "custom_components" / "losses" / "synthesis.py").read_text() == before


def test_a_mutation_whose_line_moved_is_reported_not_passed():
    moved = mutation_check.Mutation("losses/synthesis.py", "no such line\n", "x\n", ("tests/custom_components",), "")
    result = mutation_check.run_one("moved", moved)
    assert not result["red"] and "occurs 0 times" in result["summary"]
