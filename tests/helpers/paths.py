"""Where things are: the checkout, the tests' own data (tests/data), the installed commands."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
CHECKOUT = TESTS.parent
DATA = TESTS / "data"

# The console scripts installed beside the interpreter that runs the tests (the venv's bin/).
AIRLOCKD = str(Path(sys.executable).with_name("airlockd"))
AIRLOCK = str(Path(sys.executable).with_name("airlock"))
