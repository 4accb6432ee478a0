"""``python -m metering`` is the ``metering`` command."""

import sys

from metering.cli import main

sys.exit(main())
