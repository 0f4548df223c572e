"""Doctests (``--doctest-modules`` over dqtool/) that write files get ``tmp``: a fresh folder
per docstring, removed when that docstring's examples are done."""

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _doctest_tmp(request, doctest_namespace):
    if type(request.node).__name__ != "DoctestItem":
        yield
        return
    folder = Path(tempfile.mkdtemp(prefix="dqtool-doctest-"))
    doctest_namespace["tmp"] = folder
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)
