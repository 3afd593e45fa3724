"""Shared test configuration. Service fixtures live in ``tests/fixtures/`` as plugins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SITN_SHARED_DIR", REPO.parent / "shared")) / "data"
EVENTS_CSV = SHARED_DATA / "amazon_movie_book_c2dsr" / "events.csv"

pytest_plugins = [f"tests.fixtures.{p.stem}" for p in sorted((REPO / "tests" / "fixtures").glob("[!_]*.py"))]


@pytest.fixture(scope="session")
def events_csv() -> Path:
    """The shipped real data set; it lives in ../shared and is never copied into the project."""
    if not EVENTS_CSV.is_file():
        pytest.skip(f"shared data set not found at {EVENTS_CSV}; place ../shared beside the checkout")
    return EVENTS_CSV
