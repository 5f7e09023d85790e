"""The Share style studio: a Gradio app to browse, blend, compare, merge and save Share styles on Flux.

    share-diffusers app --help          # or: python -m share_diffusers.studio --help

Needs the ``app`` extra (``pip install "share-diffusers[app]"``). Only :mod:`.ui` imports Gradio:
:mod:`.text` (the text boxes), :mod:`.engine` (the pipeline work, the style bank's overview) and
:mod:`.plots` (the style map, matplotlib) do not, and :mod:`.testing`
starts the studio in a subprocess for tests. Loading, defaults and the style syntax come from
:mod:`share_diffusers.runtime`.
"""


def main(argv=None) -> int:
    """Run the studio (see :func:`share_diffusers.studio.ui.main`)."""
    from ..runtime import import_diffusers_quietly

    import_diffusers_quietly()
    from .ui import main as ui_main

    return ui_main(argv)
