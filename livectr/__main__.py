"""``python -m livectr`` is the ``livectr`` command (how ``livectr run`` starts its stages)."""

import sys

from livectr.cli import main

sys.exit(main())
