"""Fixtures for cm-nets' tests (the small configurations live in cm_nets.testing)."""

import pytest
from cm_nets.testing import SMALL


@pytest.fixture(params=sorted(SMALL))
def small_preset(request):
    return request.param
