"""What importing the `pipeline` package does to the process."""

import os
import subprocess
import sys

import pytest

REPORT = "import pipeline, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("0", "0")])
def test_import_asks_for_huge_pages_unless_the_environment_says_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    out = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
