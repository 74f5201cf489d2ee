"""``python -m dom0.xenlab build|run``."""
import sys

from .cli import main

sys.exit(main())
