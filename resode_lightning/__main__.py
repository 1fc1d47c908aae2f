"""``python -m resode_lightning``: the ``resode`` command."""

import sys

from resode_lightning.cli import main

sys.exit(main())
