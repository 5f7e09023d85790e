"""Thin launchers of the Share style studio, which lives in the package (:mod:`share_diffusers.studio`).

python -m app --help        # from the repository root; the same as ``share-diffusers app``
python app/space.py         # a Hugging Face Space's entry (app_file: app/space.py)
"""
