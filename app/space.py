"""Entry of a Hugging Face Space (Gradio SDK): the style studio on the embedded demo model.

Space settings: ``sdk: gradio`` and ``app_file: app/space.py`` in the Space's README header, and a
``requirements.txt`` that installs this repository with its app extra (``.[app]``). Run locally:
``python app/space.py`` (extra arguments go to the studio, e.g. ``--model``). A Space reaches the app on
0.0.0.0:7860, or on ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` when set.
"""

import os
import sys
from pathlib import Path

# This repository's package comes first, installed or not (the script's own folder is app/).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from share_diffusers.studio import main  # noqa: E402

if __name__ == "__main__":
    host = os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0")
    port = os.environ.get("GRADIO_SERVER_PORT", "7860")
    sys.exit(main(["--host", host, "--port", port, *sys.argv[1:]]))
