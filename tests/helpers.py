"""Constants shared by several test modules (fixtures live in conftest.py). Import as ``from helpers import ...``:
pytest puts this folder on ``sys.path``."""

import inspect
import json
import textwrap

TEXT = (inspect.getsource(json.decoder) + inspect.getsource(textwrap)).encode()
"""A small training corpus: real Python source from the standard library, the same bytes on every machine with
the same Python."""
