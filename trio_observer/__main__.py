"""``python -m trio_observer``: the same as the ``trio-observer`` command."""

import sys

from ._cli import main

sys.exit(main())
