"""Entry of a Hugging Face Space (Gradio SDK): the style studio on the embedded demo model.

Space settings: ``sdk: gradio`` and ``app_file: app/space.py`` in the Space's README header, and a
``requirements.txt`` that installs this repository with its app extra (``.[app]``). Run locally:
``python app/space.py`` (extra arguments go to the studio, e.g. ``--model``).

Address: on a Space (its ``SPACE_ID`` variable is set) the app listens on 0.0.0.0:7860, where the Space's
proxy reaches it; anywhere else on 127.0.0.1 (this machine only), as ``share-diffusers app`` does.
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``, when set, choose the address and port in both cases.

Merging and deleting stay on by default, on a Space too: merging a LoRA by its Hub id and seeing it beside
the others is what the Space is there to show. Every visitor shares one bank, so one visitor's merge or
delete is seen by all until the Space restarts (it starts again from the shipped demo styles). A Space
that should not allow that sets the variable ``SHARE_STUDIO_READ_ONLY=1`` (the studio's ``--read-only``:
generate, compare and save only).
"""

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# This repository's package comes first, installed or not (the script's own folder is app/).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from share_diffusers.studio import main  # noqa: E402

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def studio_arguments(environ: Mapping[str, str], extra: Sequence[str] = ()) -> list[str]:
    """The studio's command line for this environment: host and port (0.0.0.0 only on a Space), then
    ``--read-only`` if ``SHARE_STUDIO_READ_ONLY`` says so, then ``extra``.

    Raises:
        ValueError: ``SHARE_STUDIO_READ_ONLY`` is neither a yes nor a no (a Space meant to be read-only must not
            start open to merges because of a misspelt value).
    """
    on_space = bool(environ.get("SPACE_ID"))
    host = environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_space else "127.0.0.1")
    port = environ.get("GRADIO_SERVER_PORT") or "7860"
    arguments = ["--host", host, "--port", port]
    read_only = environ.get("SHARE_STUDIO_READ_ONLY", "").strip().lower()
    if read_only not in _TRUE + _FALSE:
        raise ValueError(
            f"SHARE_STUDIO_READ_ONLY={environ['SHARE_STUDIO_READ_ONLY']!r} is neither of {', '.join(_TRUE)} "
            f"(read-only) nor of {', '.join(_FALSE[1:])} (merges allowed)"
        )
    if read_only in _TRUE:
        arguments.append("--read-only")
    return [*arguments, *extra]


if __name__ == "__main__":
    try:
        arguments = studio_arguments(os.environ, sys.argv[1:])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(main(arguments))
