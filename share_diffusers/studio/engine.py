"""The studio's work on the pipeline, without Gradio: generate, compare, previews, merge, delete, save,
and the map of the style bank (similarities, kept energy).

``StyleStudio`` wraps one ``ShareFluxPipeline``. Gradio runs events in worker threads, and a style
request is state on the transformer for the length of a call, so every pipeline use holds one lock; a
call is therefore bounded (:meth:`~share_diffusers.runtime.GenerationDefaults.check_call`: images, steps,
size and their product) and can be stopped between denoising steps.
"""

from __future__ import annotations

import math
import numbers
import random
import re
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..core.block_weights import BlockLayout
from ..core.errors import StyleError
from ..core.factors import FactorsSnapshot
from ..core.similarity import (
    GROUP_LABELS,
    NEAR_DUPLICATE_THRESHOLD,
    StyleMap,
    StyleSimilarity,
    group_order,
    kept_energy,
    style_map,
    style_similarity,
)
from ..hub import HubFileTooLargeError
from ..loader import MergeReport, prefetch_lora
from ..lora_files import refuse_pickle
from ..runtime import (
    DEFAULT_PROMPTS,
    MAX_SEED,
    GenerationDefaults,
    StyleSpec,
    call_arguments,
    check_seed,
    style_caption,
)

PREVIEW_PROMPT = DEFAULT_PROMPTS[0]
PREVIEW_SEED = 0
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_GENERIC_FILE_NAMES = ("pytorch_lora_weights", "adapter_model")
READ_ONLY_MESSAGE = "this studio is read-only: merging and deleting styles are turned off (started with --read-only)"
_ERROR_CHANGES_SHOWN = 6  # styles named in a merge report's error changes; the rest are counted
UNDO_NOTHING_MESSAGE = (
    "nothing to undo: only a merge can be undone, while it is the bank's last change (no delete since)"
)
# The page's words for the pipeline's "no Share factors loaded: call load_share_factors(...)" (no bank yet: a studio
# started without styles, or after undoing the merge that created the bank).
NO_STYLES_MESSAGE = "no styles held yet: merge a LoRA first"
DEFAULT_MAX_MERGE_MB = 200  # largest LoRA file the studio merges, uploaded or from the Hub (--max-upload-mb)


class GenerationStopped(ValueError):
    """A generation stopped on request (the page's Stop button) before it finished."""


def pick_seed(seed: float | None, randomize: bool) -> int:
    """The seed to use: a fresh random one, or ``seed`` checked to be a whole number in range."""
    if randomize:
        return random.randint(0, MAX_SEED)
    if seed is None:
        raise ValueError("enter a seed, or tick 'Randomize seed'")
    if isinstance(seed, bool) or not math.isfinite(seed) or seed != int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
    return int(seed)


def page_settings(steps: float, width: float, height: float, guidance: float) -> dict:
    """The page's steps, width, height and guidance as :meth:`StyleStudio.generate` takes them: steps and sides
    as ints, each refused unless a whole number (a slider sends floats; ``2.5`` steps must not run 2), guidance
    as given (checked by the call)."""
    sides = dict(width=_whole(width, "the width"), height=_whole(height, "the height"))
    return dict(steps=_whole(steps, "steps"), **sides, guidance=guidance)


def _whole(value: float, what: str) -> int:
    """``value`` as an int when it is a whole real number; else refused, naming ``what``."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not real or value != int(value):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def merge_source(
    hub_id: str | None, upload: str | None, style_name: str | None, weight_name: str | None = None
) -> tuple[str, str | None]:
    """``(Hub id or uploaded file path, style name or None for the library's default)`` of a merge request.

    The Hub box takes Hub ids only, never paths on the server; an upload must be ``.safetensors``.
    ``weight_name`` (the "File in the repo" box) picks a file of the Hub repo, so it is refused beside an upload.
    """
    hub_id = (hub_id or "").strip()
    name = (style_name or "").strip() or None
    if hub_id and upload:
        raise ValueError("give a Hub repo id or upload a file, not both")
    if upload and (weight_name or "").strip():
        raise ValueError(
            f"'File in the repo' ({weight_name.strip()!r}) picks a file of a Hub repo; clear it to merge the upload"
        )
    if upload:
        path = Path(upload)
        refuse_pickle(path)
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{path.name}: only .safetensors LoRA files can be merged")
        if name is None and path.stem in _GENERIC_FILE_NAMES:
            raise ValueError(f"give a style name: the file name {path.name} says nothing about the style")
        return str(path), name or path.stem
    if not hub_id:
        raise ValueError("give a Hub repo id (user/name) or upload a .safetensors LoRA file")
    if not _HUB_ID.fullmatch(hub_id) or Path(hub_id).exists():
        raise ValueError(f"{hub_id!r} is not a Hub repo id like 'user/name'")
    return hub_id, name


def zip_folder(folder: str | Path, zip_path: str | Path) -> Path:
    """Zip ``folder`` (its files under a top folder of the same name); returns ``zip_path``."""
    folder, zip_path = Path(folder), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, Path(folder.name) / file.relative_to(folder))
    return zip_path


@dataclass
class StyleOverview:
    """The bank at one moment: pairwise similarities, the 2-D map, and what each style keeps of its LoRA.

    Attributes:
        similarity: cosine similarity of every pair of styles' weight updates.
        layout: the styles' coordinates on a 2-D map (close = similar).
        kept: per style, the share of its LoRA's energy held over all layers (``1 - error^2``).
        kept_by_group: per style and layer group (e.g. FLUX.1's ``transformer_blocks`` and
            ``single_transformer_blocks``), the same share.
    """

    similarity: StyleSimilarity
    layout: StyleMap
    kept: dict[str, float]
    kept_by_group: dict[str, dict[str, float]]

    def nearest(self, name: str) -> tuple[str, float] | None:
        """The other style most similar to ``name`` and their similarity (None when it is alone)."""
        names, matrix = self.similarity.names, self.similarity.matrix
        index = names.index(name)
        others = [j for j in range(len(names)) if j != index]
        if not others:
            return None
        best = max(others, key=lambda j: float(matrix[index, j]))
        return names[best], float(matrix[index, best])

    def markdown(self) -> str:
        """A table of the styles: kept energy overall and per layer group, and the most similar other style."""
        names = self.similarity.names
        if not names:
            return "No styles held yet: merge a LoRA."
        groups = {group for per_style in self.kept_by_group.values() for group in per_style}
        groups = sorted(groups, key=group_order)
        labels = [_escape(GROUP_LABELS.get(group, group)) for group in groups]
        lines = [
            "| style | kept | " + " | ".join(labels) + " | most similar |",
            "|---|---:|" + "---:|" * len(groups) + "---|",
        ]
        for name in names:
            cells = [f"{self.kept_by_group[name][g]:.1%}" if g in self.kept_by_group[name] else "-" for g in groups]
            nearest = self.nearest(name)
            similar = "-"
            if nearest is not None:
                other, value = nearest
                similar = f"{_escape(other)} ({value:.2f})"
                if value >= NEAR_DUPLICATE_THRESHOLD:
                    similar += " **near-duplicate**"
            lines.append(f"| {_escape(name)} | {self.kept[name]:.1%} | " + " | ".join(cells) + f" | {similar} |")
        lines += [
            "",
            "*kept*: the share of each style's LoRA energy the bank reproduces (1 - relative error²), over all "
            "layers and per group of layers; *most similar*: the cosine similarity of the two styles' weight "
            "updates (1: the same up to strength).",
        ]
        return "\n".join(lines)


def _escape(text: str) -> str:
    """Text shown literally in Markdown (a style named ``a|b`` or ``*x*`` must not break the table)."""
    return "".join("\\" + char if char in "\\`*_[]<>|#" else char for char in text)


@dataclass
class MergeOutcome:
    """A merge as the studio reports it: the library's report, and how the other styles' errors moved.

    A new style turns the shared bases, so the styles held before can lose part of what they kept
    (their stored errors become upper bounds, DESIGN 3); the report says by how much.

    Attributes:
        report: :meth:`ShareLoaderMixin.merge_lora`'s report on the new style.
        other_errors: per style held before, its relative error ``(before, after)`` the merge (after: a bound).

    How far each style's update moved (exact) is the report's ``moved``.
    """

    report: MergeReport
    other_errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        text = str(self.report)
        if not self.other_errors:
            return text
        changed = [
            (name, before, after)
            for name, (before, after) in self.other_errors.items()
            if _short(before) != _short(after)
        ]
        if not changed:
            return text + "; other styles' error unchanged"
        changed.sort(key=lambda item: item[1] - item[2])  # the largest increase first
        shown = [
            f"{name} {_short(old)} -> {_short(new)}"
            + (f" (moved {_percent(self.report.moved[name])})" if name in self.report.moved else "")
            for name, old, new in changed[:_ERROR_CHANGES_SHOWN]
        ]
        if len(changed) > _ERROR_CHANGES_SHOWN:
            shown.append(f"{len(changed) - _ERROR_CHANGES_SHOWN} more")
        return text + "; other styles' error: " + ", ".join(shown)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%" if fraction >= 0.001 else "<0.1%"


def _short(error: float) -> str:
    """A relative error in two significant digits, as the report shows it: 0.32, 1.2e-07."""
    return f"{error:.2g}"


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class StyleStudio:
    """A ``ShareFluxPipeline`` with the studio's operations and a cache of one preview image per style.

    Args:
        pipe: the pipeline; its styles are whatever it holds (demo styles, loaded factors, merges).
        defaults: image settings and limits (:func:`share_diffusers.runtime.defaults_for`).
        preview_prompt, preview_seed: what every style's preview shows.
        read_only: refuse :meth:`merge` and :meth:`delete` (a public studio whose visitors share one bank).
        max_merge_mb: a Hub LoRA file larger than this is refused before it is downloaded (uploads are
            limited by the web server: ``--max-upload-mb`` sets both).
    """

    def __init__(
        self,
        pipe,
        defaults: GenerationDefaults,
        preview_prompt: str = PREVIEW_PROMPT,
        preview_seed: int = PREVIEW_SEED,
        read_only: bool = False,
        max_merge_mb: float = DEFAULT_MAX_MERGE_MB,
    ):
        self.pipe = pipe
        self.defaults = defaults
        self.preview_prompt = preview_prompt
        self.preview_seed = preview_seed
        self.read_only = read_only
        self.max_merge_bytes = int(max_merge_mb * 2**20)
        self._lock = threading.RLock()
        self._previews: dict[str, Image.Image] = {}
        self._workdir = tempfile.TemporaryDirectory(prefix="share-studio-")
        # Bumped by every change of the bank made here: one saved zip serves every save of one version.
        self._bank_version = 0
        self._saved: tuple[tuple, Path] | None = None
        # The last merge while it is the bank's last change (a delete or undo clears it): its style and the bank
        # before it (None when it created the subspace). One bank more in memory at most.
        self._last_merge: tuple[str, FactorsSnapshot | None] | None = None

    def styles(self) -> list[str]:
        return self.pipe.list_styles()

    def block_layout(self) -> BlockLayout:
        """The model's blocks that per-block weights name."""
        share = self.pipe.share
        return share.block_layout if share is not None else BlockLayout.of(self.pipe.transformer)

    def blocks(self) -> str:
        """The model's blocks that per-block weights name, e.g. ``"double.0-18, single.0-37"`` (FLUX.1)."""
        return self.block_layout().describe()

    def generate(
        self,
        prompts: Sequence[str],
        styles: Sequence[StyleSpec],
        seed: int,
        style_scale: float = 1.0,
        steps: int | None = None,
        width: int | None = None,
        height: int | None = None,
        guidance: float | None = None,
        stop: threading.Event | None = None,
    ) -> list[Image.Image]:
        """One image per prompt, in one pipeline call; every image starts from the same noise (``seed``).

        Args:
            steps, width, height, guidance: the call's settings (None: the defaults), checked against the
                limits of ``defaults`` (:meth:`~share_diffusers.runtime.GenerationDefaults.check_call`).
            stop: when set (by another thread), the call ends before its next denoising step.

        Raises:
            ValueError: settings outside the limits; :class:`GenerationStopped` when ``stop`` was set.
        """
        if len(styles) != len(prompts):
            raise ValueError(f"got {len(styles)} styles for {len(prompts)} prompts")
        seed = check_seed(seed)
        arguments = call_arguments(
            self.pipe, self.defaults, len(prompts), steps=steps, width=width, height=height, guidance=guidance
        )
        total = arguments["num_inference_steps"]
        guidance = self.defaults.guidance if guidance is None else guidance
        self.defaults.check_call(len(prompts), total, arguments["width"], arguments["height"], guidance)
        # All-None must be passed as None: a pipeline with no styles loaded refuses any style list.
        style = None if all(spec is None for spec in styles) else list(styles)

        def check_stop(pipe, step: int, timestep, tensors: dict) -> dict:
            if stop.is_set():
                raise GenerationStopped(f"stopped after step {step + 1} of {total}")
            return tensors

        with self._lock:
            if stop is not None and stop.is_set():  # stopped while it waited for the pipeline
                raise GenerationStopped("stopped before it started")
            if style is not None and self.pipe.share_factors is None:
                raise StyleError(f"{NO_STYLES_MESSAGE} (or use the style none)")
            return self.pipe(
                prompt=list(prompts),
                style=style,
                style_scale=style_scale,
                **arguments,
                generator=[torch.Generator().manual_seed(seed) for _ in prompts],
                callback_on_step_end=None if stop is None else check_stop,
            ).images

    def compare(
        self, prompt: str, styles: Sequence[StyleSpec], seed: int, style_scale: float = 1.0, **settings
    ) -> list[tuple[Image.Image, str]]:
        """The same prompt and seed under each style, in one call; captions are the styles (and the
        strength, when not 1)."""
        if not styles:
            raise ValueError("pick at least one style to compare")
        images = self.generate([prompt] * len(styles), styles, seed, style_scale=style_scale, **settings)
        return list(zip(images, [style_caption(spec, style_scale) for spec in styles], strict=True))

    def previews(self) -> list[tuple[Image.Image, str]]:
        """``(image, caption)`` per style: the preview prompt and seed, and the reconstruction error."""
        with self._lock:
            names = self.styles()
            missing = [name for name in names if name not in self._previews]
            size = self.defaults.preview_size
            for chunk in _chunks(missing, self.defaults.max_batch):
                prompts = [self.preview_prompt] * len(chunk)
                images = self.generate(prompts, chunk, self.preview_seed, width=size, height=size)
                self._previews.update(zip(chunk, images, strict=True))
            factors = self.pipe.share_factors
            return [(self._previews[name], f"{name} · error {factors.style_error(name):.1e}") for name in names]

    def overview(self) -> StyleOverview:
        """Similarities, map and kept energy of the styles held now (``k x k`` numbers only: milliseconds)."""
        with self._lock:
            factors = self.pipe.share_factors
            if factors is None or not factors.styles:  # no factors yet, or every style deleted
                empty = StyleSimilarity([], torch.zeros(0, 0, dtype=torch.float64))
                return StyleOverview(empty, style_map(empty), {}, {})
            similarity = style_similarity(factors)
            kept = {name: max(0.0, 1.0 - factors.style_error(name) ** 2) for name in similarity.names}
            return StyleOverview(similarity, style_map(similarity), kept, kept_energy(factors))

    def merge(self, source: str, style_name: str | None = None, weight_name: str | None = None) -> MergeOutcome:
        """Merge a LoRA (Hub id or local file) as a new style; a failed merge changes nothing.

        A Hub LoRA is downloaded (at most ``max_merge_mb``) before the pipeline is taken, so generations go on
        meanwhile; the merge then reads the cache. Returns the library's report with the other styles' errors
        before and after (``str()``: one line).
        """
        if self.read_only:
            raise ValueError(READ_ONLY_MESSAGE)
        from_hub = _HUB_ID.fullmatch(source) is not None and not Path(source).exists()
        fetched: dict = {}
        if from_hub:
            try:
                fetched = prefetch_lora(source, weight_name, max_bytes=self.max_merge_bytes)
            except HubFileTooLargeError as error:
                raise HubFileTooLargeError(f"{error} (--max-upload-mb)") from None
        with self._lock:
            before = self._style_errors()
            bank = self.pipe.snapshot_share()
            report = self.pipe.merge_lora(
                source,
                weight_name=fetched.get("weight_name", weight_name),
                style_name=style_name,
                revision=fetched.get("commit"),  # the files fetched above, wherever the branch is now
                local_files_only=True if from_hub else None,
            )
            after = self._style_errors()
            self._bank_version += 1
            self._last_merge = (report.style_name, bank)
            # The new style can turn the shared bases, so every style's picture may move a little.
            self._previews.clear()
        errors = {name: (error, after[name]) for name, error in before.items() if name in after}
        return MergeOutcome(report, errors)

    def undo_merge(self) -> str:
        """Put the bank back as it was before the last merge (the merged style gone, every other style's bases and
        errors restored bit for bit: a delete would keep the turn the merge gave the shared bases).

        Only while that merge is the bank's last change (no delete since). Returns the undone style's name.
        """
        if self.read_only:
            raise ValueError(READ_ONLY_MESSAGE)
        with self._lock:
            if self._last_merge is None:
                raise ValueError(UNDO_NOTHING_MESSAGE)
            name, bank = self._last_merge
            self.pipe.restore_share(bank)
            self._bank_version += 1
            self._last_merge = None
            self._previews.clear()  # every style's picture moves back
            return name

    def _style_errors(self) -> dict[str, float]:
        factors = self.pipe.share_factors
        return {} if factors is None else {name: factors.style_error(name) for name in factors.style_names}

    def delete(self, name: str) -> None:
        """Delete a style; the others keep their reconstructions (and previews)."""
        if self.read_only:
            raise ValueError(READ_ONLY_MESSAGE)
        if not name:
            raise ValueError("choose a style to delete")
        with self._lock:
            if self.pipe.share_factors is None:
                raise StyleError(f"unknown style {name!r}; {NO_STYLES_MESSAGE}")
            self.pipe.delete_style(name)
            self._bank_version += 1
            self._last_merge = None  # no longer undoable: free the bank it kept
            self._previews.pop(name, None)

    def save_factors_zip(self) -> Path:
        """``pipe.save_share_factors`` zipped: ``.../share-factors.zip``, one file per version of the bank.

        Saving again before the bank changes returns the same zip, unwritten; a change (merge, delete)
        makes the next save replace it. The unzipped folder is removed once zipped.
        """
        with self._lock:
            if self.pipe.share_factors is None:
                raise StyleError(f"nothing to save: {NO_STYLES_MESSAGE}")
            key = (self._bank_version, tuple(self.styles()))
            if self._saved is not None and self._saved[0] == key and self._saved[1].is_file():
                return self._saved[1]
            version_dir = Path(tempfile.mkdtemp(prefix=f"bank-{self._bank_version}-", dir=self._workdir.name))
            folder = version_dir / "share-factors"
            try:
                self.pipe.save_share_factors(folder)
                archive = zip_folder(folder, folder.with_suffix(".zip"))
            except BaseException:
                shutil.rmtree(version_dir, ignore_errors=True)
                raise
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if self._saved is not None:  # Gradio serves its own copy of the earlier zip
                shutil.rmtree(self._saved[1].parent, ignore_errors=True)
            self._saved = (key, archive)
            return archive
