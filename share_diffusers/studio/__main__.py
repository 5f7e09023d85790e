"""``python -m share_diffusers.studio``: run the Share style studio."""

import sys

from . import main

sys.exit(main())
