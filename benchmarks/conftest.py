"""pytest set-up for the benchmarks: collect the `bench_*.py` files (pytest.ini's default pattern
only finds `test_*.py`), so `pytest benchmarks` / `make bench` runs every benchmark module. The
benchmarks skip themselves without CUDA; they are never part of the default test run (tests/)."""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):      # an explicit path is collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None
