"""The Share style studio, a Gradio app (``app.studio``), runnable from the repository root.

    python -m app --help

Needs the ``app`` extra (``pip install -e ".[app]"``). The non-UI parts, ``app.styles`` (text forms
of prompts and styles) and ``app.engine`` (the pipeline work), import no Gradio.
"""
