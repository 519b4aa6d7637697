"""Shared fixtures. The reference conformance data comes from the repository's own copy
(tests/data/reference, see its README), never from outside the clone."""

import pytest

import reference as reference_data


@pytest.fixture(scope="session")
def reference():
    """The reference conformance data: ``reference.golden(name)`` and ``reference.sd2_tensors()``."""
    return reference_data
