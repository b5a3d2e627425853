"""Fixtures shared by the end-to-end bundle tests."""

from __future__ import annotations

import pytest

from custom_components.apps.phantom_dataset import ensure_phantom

#: the tiny phantom of the end-to-end runs; a test module may set ``PHANTOM`` (same keys) to change it
DEFAULT_PHANTOM = {"task": "t1t2", "n_train": 2, "n_val": 1, "n_test": 1, "shape": (48, 48, 32), "seed": 3}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory, request):
    """A phantom data set (folder with ``datalist.json``), generated once per test module."""
    out = tmp_path_factory.mktemp("phantom")
    ensure_phantom(out, **{**DEFAULT_PHANTOM, **getattr(request.module, "PHANTOM", {})})
    return out
