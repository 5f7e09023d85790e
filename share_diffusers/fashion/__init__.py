"""The embedded demo model: a small Flux trained on Fashion-MNIST, its judges and its demo styles.

- :mod:`.data`: the real photos (Debian's ``dataset-fashion-mnist``) and the class prompts;
- :mod:`.styles`: the demo styles as transformations of photos (inverted, tint, stripes, outlines);
- :mod:`.model`: the architecture, the shipped pipeline and styles (``load_demo_pipeline``);
- :mod:`.judges`: the class and style classifiers that score generated pictures;
- :mod:`.evaluation`: generate and score.
"""

from .model import DEMO_CALL, DEMO_PIPELINE_DIR, DEMO_STYLES_DIR, JUDGES_DIR, load_demo_pipeline

__all__ = ["DEMO_CALL", "DEMO_PIPELINE_DIR", "DEMO_STYLES_DIR", "JUDGES_DIR", "load_demo_pipeline"]
