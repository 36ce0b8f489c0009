"""The documentation site's generated pages: the parameter reference is the Config's, never typed beside it."""

from __future__ import annotations

from dataclasses import fields

from kd.docs_site import as_page, entry_points_taking, parameter_reference
from pipelines.config import LIMITS, Config


def test_the_parameter_reference_has_one_row_per_config_field_with_its_default_range_help_and_reuse_keys():
    page = parameter_reference()
    rows = {line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `")}
    assert list(rows) == [f.name for f in fields(Config)], "every field, in the Config's order, and nothing else"
    defaults = Config()
    for f in fields(Config):
        row = rows[f.name]
        assert f.metadata["help"].replace("|", "\\|") in row
        assert f.name == "cache_dir" or f"`{getattr(defaults, f.name)}`" in row
        assert f.name not in LIMITS or str(LIMITS[f.name]) in row
        assert (", ".join(f.metadata["reuse"]) or "none") in row
    assert "/work/" not in page and "/home/" not in page, "no machine path (cache_dir's default is the checkout's)"


def test_each_parameter_lists_the_mlproject_entry_points_that_take_it():
    taking = entry_points_taking()
    assert "evaluate" not in taking.get("temperature", []) and "teacher" in taking["epochs"] and "main" in taking["fold_workers"]
    rows = {line.split(" | ")[0].strip("| `"): line for line in parameter_reference().splitlines() if line.startswith("| `")}
    assert rows["epochs"].endswith(f"| {', '.join(taking['epochs'])} |")
    assert rows["comparison"].endswith("| report |") and rows["tracking_wait_s"].endswith("| `kd` only |")


def test_repository_links_become_site_links():
    text = "see [the record](BENCHMARKS.md), [a table](docs/comparison-brain-yes-no/comparison.md) and [it](RELIABILITY.md#top)"
    assert as_page(text) == (
        "see [the record](benchmarks-record.md), [a table](comparison-brain-yes-no/comparison.md) and [it](reliability-record.md#top)"
    )
