"""Benchmark results are written whole or not at all."""

import json

import pytest

from benchmarks.publish import write_results


def test_results_are_written_as_json_and_markdown(tmp_path):
    markdown = write_results("bench", {"rows": [1, 2]}, "# Bench\n", tmp_path / "results")
    assert markdown == "# Bench\n"
    assert json.loads((tmp_path / "results" / "bench.json").read_text()) == {"rows": [1, 2]}
    assert (tmp_path / "results" / "bench.md").read_text() == "# Bench\n"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["bench.json", "bench.md"]


def test_a_failed_write_keeps_the_previous_results(tmp_path):
    write_results("bench", {"rows": [1]}, "# old\n", tmp_path)
    with pytest.raises(TypeError):
        write_results("bench", {"rows": [object()]}, "# new\n", tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text()) == {"rows": [1]}
    assert (tmp_path / "bench.md").read_text() == "# old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]
