"""Fixtures shared by several test modules: a throwaway CA and its PEM file; the interference lab."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

# The lab is built once per session and shared by every lab module (tests/test_lab*.py): a
# fixture imported into two modules would be two session fixtures, two labs with one set of names.
from tests.lab.world import env, lab  # noqa: F401


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)
