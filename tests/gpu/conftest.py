"""Setup shared by the GPU test files."""

import os

import pytest


@pytest.fixture(autouse=True, scope="module")
def compiled_not_interpreted():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 is set: the GPU suite must run the compiled kernel (set TRITON_INTERPRET=0)")
