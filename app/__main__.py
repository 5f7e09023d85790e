"""``python -m app``: run the Share style studio (``share_diffusers.studio``), as ``share-diffusers app`` does."""

import sys

from share_diffusers.studio import main

sys.exit(main())
