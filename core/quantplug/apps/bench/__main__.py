"""``python -m quantplug.apps.bench``: the bench without the ``quantplug`` entry point."""

import os
import sys

from quantplug.apps.bench.command import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.exit(main())
