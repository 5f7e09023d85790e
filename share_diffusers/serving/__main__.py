"""``python -m share_diffusers.serving``: the HTTP server (see :mod:`share_diffusers.serving.server`)."""

import sys

from .server import main

sys.exit(main())
