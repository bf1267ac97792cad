"""Every benchmark script still imports against the code it measures (a renamed function broke one unseen)."""

import importlib
import pkgutil

import pytest

import benchmarks

# modules that are not scripts of this venv: a BentoML service that reads its model from the environment
NOT_SCRIPTS = {"bentoml_batching_service"}
SCRIPTS = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.ispkg and m.name not in NOT_SCRIPTS)


def test_the_benchmarks_are_found():
    assert {"serving", "overload", "soak", "http_path"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports(name):
    importlib.import_module(f"benchmarks.{name}")
