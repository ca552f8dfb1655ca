"""``python -m gpt_helpers …``: see :mod:`gpt_helpers.cli`."""

import sys

from .cli import main

sys.exit(main())
