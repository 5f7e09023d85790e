"""``python -m app``: run the Share style studio (see ``app.studio``)."""

import sys

from .studio import main

sys.exit(main())
