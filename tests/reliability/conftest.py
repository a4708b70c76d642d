"""Shared setup for the reliability tests (C.4 of docs/anchors.md; map in tests/README.md).

* tests/ and tests/kernels/ go on sys.path so the scheduler harness (test_scheduler) and the
  kernel simulation (test_decode.simulate) are reused, not copied.
* Kernels run in Triton's interpreter on a CPU-only machine (set before any @triton.jit).
* ``kit`` / ``device``: the kernel helpers of tests/kernels/conftest.py, loaded by path.
* ``gpu``-marked tests skip without CUDA (they need an H200-class GPU and vLLM's CUDA platform).
"""
import importlib.util
import os
import sys
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
for p in (TESTS, os.path.join(TESTS, "kernels")):
    if p not in sys.path:
        sys.path.insert(0, p)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _kernel_helpers():
    spec = importlib.util.spec_from_file_location(
        "dms_kernels_conftest", os.path.join(TESTS, "kernels", "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def kit() -> types.SimpleNamespace:
    k = _kernel_helpers()
    return types.SimpleNamespace(make_layout=k.make_layout, new_arena=k.new_arena,
                                 check_pages_conserved=k.check_pages_conserved,
                                 quantize_like_store=k.quantize_like_store)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="GPU test: needs CUDA (run on an H200 with vLLM installed)")
    for item in items:
        if not str(item.fspath).startswith(HERE):
            continue
        item.add_marker(pytest.mark.filterwarnings(
            "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
