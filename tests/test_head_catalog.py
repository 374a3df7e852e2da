"""The head catalog: names, opening, removing."""
import re

import pytest

from pipelines.cli import cli
from pipelines.errors import HeadError
from pipelines.fitting import fit_head
from pipelines.head_catalog import check_head_name, default_head_name, find_head, list_heads, open_head, remove_head


def test_default_names_are_unique_even_within_one_second():
    names = {default_head_name("section") for _ in range(50)}
    assert len(names) == 50
    assert all(re.fullmatch(r"section-\d{8}-\d{6}-[0-9a-f]{4}", name) for name in names)
    assert check_head_name(default_head_name("a label/with spaces")).startswith("a-label-with-spaces-")


def test_bad_names_are_refused():
    for name in ("", "-x", "../x", "a" * 101, "a b"):
        with pytest.raises(HeadError, match="must be 1-100 letters"):
            check_head_name(name)


def test_open_checks_the_card_against_the_catalog_row(fitted_copy):
    [row] = list_heads(fitted_copy)
    head = open_head(fitted_copy, row.head)
    assert (head.card.name, head.card.model, head.card.layer) == (row.head, row.model, row.layer)
    with pytest.raises(HeadError, match="no head named 'nope' \\(heads: section-head\\)"):
        open_head(fitted_copy, "nope")


def test_remove_is_a_version_and_older_versions_still_see_the_head(fitted_copy):
    [row] = list_heads(fitted_copy)
    before = fitted_copy.latest_version()
    version = remove_head(fitted_copy, row.head)
    assert version == before + 1 and fitted_copy.log()[-1].operation == "remove-head"
    assert list_heads(fitted_copy) == []
    assert find_head(fitted_copy, row.head, version=before).head == row.head
    assert (fitted_copy.root / row.artifact / "head.json").is_file()  # files stay for older versions
    with pytest.raises(HeadError, match="no head named"):
        remove_head(fitted_copy, row.head)
    again = fit_head(fitted_copy, label="section", name=row.head, epochs=1)  # the name is free again
    assert again.head == row.head and again.path != str(fitted_copy.root / row.artifact)


def test_heads_rm_from_the_command_line(fitted_copy):
    from click.testing import CliRunner

    [row] = list_heads(fitted_copy)
    result = CliRunner().invoke(cli, ["-w", str(fitted_copy.root), "heads", "rm", row.head])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"removed head {row.head} (warehouse version ")
    listed = CliRunner().invoke(cli, ["-w", str(fitted_copy.root), "heads"])
    assert listed.exit_code == 0 and listed.output == ""
    missing = CliRunner().invoke(cli, ["-w", str(fitted_copy.root), "heads", "rm", row.head])
    assert missing.exit_code == 1 and missing.stderr.startswith(f"Error: no head named '{row.head}'")
