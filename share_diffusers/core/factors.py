"""``ShareFactors``: the Share subspaces of every target layer of a model, and its bank of styles.

This is the object a checkpoint holds. It fits from adapters, merges one more adapter continually,
deletes and renames styles, and reports errors and storage. It knows nothing of models or files.

Device and dtype: every layer is held on the CPU in float32 (the checkpoint form, whatever device the
model runs on); fitting and merging compute in float64 on the CPU. Adapters may hold their factors on
any device and in any dtype: each LoRA layer is brought to the CPU in float64 once per merge, by
:meth:`~.adapters.LoraLayer.canonical`. Layers are independent, so fitting and merging run them on a
thread pool (torch releases the GIL in its kernels); results are gathered in layer order and swapped
in only when every layer is done.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from .adapters import FIT_DEVICE, CanonicalLora, LoraAdapter, all_finite, canonical_forms, resolve_fit_device
from .batched_merge import merge_class_key, merge_layers
from .errors import FactorValueError, ShapeMismatchError, ShareValueError, StyleError
from .subspace import (
    LAYER_TENSORS,
    STORE_DTYPE,
    LayerShare,
    RankRule,
    append_absent_style,
    delete_from_layer,
    empty_layer,
    fit_layer,
    merge_layer,
    on_device,
    replace_in_layer,
    to_fit,
    to_storage,
)

FLOAT32_MAX = torch.finfo(torch.float32).max  # the stored summaries' range

# Layers are merged in parallel: at FLUX.1 width a layer is a few skinny QRs (n x 48) and small products
# that several cores barely speed up, so the layers themselves are the parallelism. The cap is because
# part of each layer's time holds the GIL (Python and op dispatch, an estimated ~1 ms of ~7.5 ms single-
# threaded at 3072 x 3072), which bounds what more threads can give; 8 is a guess for 16-core hosts, not
# a measurement there. Merges batch the layers of one class (MERGE_CHUNK_BYTES), which cuts the torch calls
# made under the GIL about 4x at FLUX.1 width.
MAX_WORKERS = 8
# A merge computes the layers of one class (shape, k, the LoRA's rank...) in chunks with batched linear
# algebra, each chunk's QR input at most this big: at FLUX.1 width (3072 x 48 float64, 1.2 MB a layer) that
# is 6 layers. On a 2-core EPYC (benchmarks/bench_merge.py, 266 layers) 4 and 8 MB timed the same within
# noise, 1-2 MB gave back part of the gain, and 16-32 MB were slower: a batched QR streams the whole stack
# at each step, which then no longer stays in cache (3.2 ms a layer in batches of 32 against 2.0 alone).
MERGE_CHUNK_BYTES = 8 * 2**20

# The largest |weight| a style may take in a blend, after the overall scale. LoRA strengths that mean
# anything are near 1 (diffusers users set 0 to 2; "negative" styles and extrapolation go to a few
# units); past this a style swamps the base weights by orders of magnitude. Finite float32 weights far
# beyond it passed before and gave NaN images with no error (the tiny Flux turns NaN between 1e10 and
# 1e15; half-precision activations overflow far sooner), so requests are refused here, not in the model.
MAX_STYLE_WEIGHT = 1000.0

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def default_workers() -> int:
    """Threads used for per-layer work when none is given: ``MAX_WORKERS`` or the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, cpus or 1))


@dataclass(frozen=True)
class _FailedLayer:
    """The first layer of a merge chunk that failed, and its error (the merge raises the earliest in layer order)."""

    layer_name: str
    error: Exception


def map_layers(
    function: Callable[[_Item], _Result],
    items: Sequence[_Item],
    workers: int | None = None,
    desc: str = "",
    progress: bool = False,
) -> list[_Result]:
    """``[function(item) for item in items]`` on a pool of ``workers`` threads, in order, with a progress bar.

    The first failure in ``items`` order is raised once the layers before it are done; the layers not
    started yet are cancelled. ``workers=1`` runs everything in the calling thread, with torch's
    intra-op threads as they are; on the pool each worker runs its kernels single-threaded.
    """
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ShareValueError(f"workers must be >= 1, got {workers}")
    results: list[_Result] = []
    with tqdm(total=len(items), desc=desc, disable=not progress) as bar:
        if workers == 1 or len(items) <= 1:
            for item in items:
                results.append(function(item))
                bar.update()
            return results
        # The layers are the parallelism, so each worker runs its kernels single-threaded: workers that
        # opened OpenMP teams of their own oversubscribed the cores, and left later multi-threaded calls
        # in the main thread 3-4x slower (measured on 2 cores; far worse when other processes were busy).
        # torch.set_num_threads acts on the calling thread's OpenMP and MKL settings and on the default
        # that new threads start with; that default is put back afterwards.
        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(
            max_workers=min(workers, len(items)),
            thread_name_prefix="share-layers",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        try:
            futures = [pool.submit(function, item) for item in items]
            for future in futures:
                results.append(future.result())
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)
    return results


@contextmanager
def _naming_layer(layer_name: str) -> Iterator[None]:
    """Errors of one layer's maths carry the layer's name (and a failed decomposition becomes a ShareError)."""
    try:
        yield
    except FactorValueError as error:
        raise FactorValueError(f"{layer_name}: {error}") from None
    except torch.linalg.LinAlgError as error:
        raise FactorValueError(f"{layer_name}: the update could not be decomposed ({error})") from None


@dataclass
class ShareConfig:
    """How a Share subspace is fitted.

    Args:
        rank: ``k``, basis vectors per layer; 32 (the paper's Flux setting) unless ``variance`` is given.
        variance: choose ``k`` per layer as the smallest count explaining this fraction of the energy.
        max_rank: cap on ``k`` when ``variance`` is used.
        pseudo_rank: ``p``, rank of each style's core (paper: 8 for Flux; ``p = k`` keeps full cores).
        center: paper-literal centring: fit the basis about the adapters' mean and keep that mean as an
            anchor core added to every style (never dropped).
        normalize: weight every adapter to unit energy per layer, so weak styles are not drowned.
    """

    rank: int | None = None
    variance: float | None = None
    max_rank: int = 64
    pseudo_rank: int = 8
    center: bool = False
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.rank is None and self.variance is None:
            self.rank = 32  # the paper's Flux setting
        for name in ("rank", "max_rank", "pseudo_rank"):
            value = getattr(self, name)
            if value is None and name == "rank":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ShareValueError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))  # numpy integers become plain ints (the JSON takes those)
        if self.variance is not None:
            if not _is_real(self.variance) or not math.isfinite(float(self.variance)):
                raise ShareValueError(f"variance must be a number, got {self.variance!r}")
            self.variance = float(self.variance)
        for name in ("center", "normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ShareValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        try:
            RankRule(rank=self.rank, variance=self.variance, max_rank=self.max_rank)
        except ValueError as error:
            raise ShareValueError(str(error)) from None
        if self.max_rank < 1:
            raise ShareValueError(f"max_rank must be >= 1, got {self.max_rank}")
        if self.pseudo_rank < 1:
            raise ShareValueError(f"pseudo_rank p must be >= 1, got {self.pseudo_rank}")

    @property
    def rule(self) -> RankRule:
        return RankRule(rank=self.rank, variance=self.variance, max_rank=self.max_rank)


@dataclass
class StyleInfo:
    """One style held in the bank: its name and where it came from.

    ``source`` is provenance (repo, revision, file, alpha...); ``source_bytes`` is the size of the
    LoRA's factors as given (for storage comparisons).
    """

    name: str
    source: dict = field(default_factory=dict)
    rank: int = 0
    num_parameters: int = 0
    source_bytes: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FactorsSnapshot:
    """A bank as it was (:meth:`ShareFactors.snapshot`), to put back with :meth:`ShareFactors.restore`: the undo of
    a merge, which moves the shared bases and with them every other style's reconstruction.

    It holds the layer states themselves, not copies: a merge, delete or fine-tuning builds new ``LayerShare``
    objects and never writes into the old ones, so a snapshot costs only the memory of the layers that later
    changes replace: at most one more bank (about 110 MiB at FLUX.1 size, 20 styles, k = 32).
    """

    config: ShareConfig
    layers: dict[str, LayerShare]
    styles: tuple[StyleInfo, ...]
    base_model: str | None
    conv_layers: frozenset[str]
    storage_dtype: torch.dtype

    @property
    def style_names(self) -> list[str]:
        return [style.name for style in self.styles]


def validate_style_name(name: object, taken: Sequence[str]) -> str:
    """Check a new style name: a non-empty string that the style syntax can address, not already in ``taken``.

    The CLI and the app write blends as ``"name=weight,name2=weight2"`` and per-block weights as
    ``"name[double=1]"``, and read ``none`` as no style, so a name holds no ``=``, ``,``, ``[`` or ``]``, no
    control character (newlines, tabs...), no leading or trailing whitespace, and is not ``none`` in any case.
    """
    if not isinstance(name, str) or not name.strip():
        raise StyleError(f"style name must be a non-empty string, got {name!r}")
    bad = next((c for c in name if c in "=,[]" or unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise StyleError(
            f"style name {name!r} contains {bad!r}; names cannot hold '=', ',', '[', ']' or control characters "
            "(the style syntax is 'name=weight,name2=weight2', per-block weights 'name[double=1]')"
        )
    # Invisible characters (zero-width space, BOM...) would make two names that look the same; a lone surrogate
    # (a file name that was not UTF-8) cannot be written to the checkpoint's JSON or an exported LoRA.
    hidden = next((c for c in name if unicodedata.category(c) in ("Cf", "Cs")), None)
    if hidden is not None:
        raise StyleError(
            f"style name {name!r} contains the invisible or non-UTF-8 character {hidden!r}; use visible text"
        )
    if name.strip().lower() == "none":
        raise StyleError(f"style name {name!r} is reserved: the style syntax reads it as no style")
    if name != name.strip():
        raise StyleError(f"style name {name!r} starts or ends with whitespace; use {name.strip()!r}")
    if name in taken:
        raise StyleError(f"a style named {name!r} already exists; pick another name or delete it first")
    same = next((other for other in taken if _same_text(other, name)), None)
    if same is not None:  # e.g. a macOS file name (NFD) against the same name typed (NFC)
        raise StyleError(
            f"a style named {same!r} already exists (the same text in another Unicode form); pick another name"
        )
    return name


def _same_text(first: str, second: str) -> bool:
    """The same characters once composed (Unicode NFC): 'café' typed and 'café' from a macOS file name."""
    return unicodedata.normalize("NFC", first) == unicodedata.normalize("NFC", second)


def _is_real(value: object) -> bool:
    """A real number (Python, numpy or 0-d torch), not a bool."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_style_weight(name: str, weight: object, scale: float = 1.0) -> float:
    """A blend weight as a float: a finite real number with ``|weight * scale| <= MAX_STYLE_WEIGHT``."""
    if not _is_real(weight) or not math.isfinite(float(weight)):
        raise StyleError(f"blend weight for style {name!r} must be a finite number, got {weight!r}")
    value = float(weight) * float(scale)
    if abs(value) > MAX_STYLE_WEIGHT:
        raise StyleError(
            f"style {name!r} would get weight {value:g} (weight {float(weight):g} x scale {float(scale):g}); "
            f"style weights must lie within +-{MAX_STYLE_WEIGHT:g} (larger ones overflow the model's activations)"
        )
    return value


def _canonical_of_style(adapter: LoraAdapter, name: str, layer_name: str) -> CanonicalLora | None:
    """The style ``name``'s update on ``layer_name`` (None where its LoRA has none), refused naming the style
    when it holds NaN or Inf or its energy ``||dW||^2`` is beyond float32 (the summaries the bank stores would
    overflow, and with several LoRAs "the LoRA's scale is out of range" did not say which one)."""
    if layer_name not in adapter.layers:
        return None
    try:
        entry = adapter.layers[layer_name].canonical()
    except FactorValueError as error:
        raise FactorValueError(f"style {name!r}: {error}") from None
    return _storable_energy(entry, f"style {name!r}")


def _storable_energy(entry: CanonicalLora, who: str) -> CanonicalLora:
    """``entry``, refused (``who``: what the message starts with) when its energy ``||dW||^2`` is beyond float32:
    the summaries the bank stores would overflow (and at 1e200 linalg.eigh failed to converge)."""
    if entry.energy > FLOAT32_MAX:
        raise FactorValueError(
            f"{who}: its update's energy ||dW||^2 = {entry.energy:.3g} is beyond float32's range; "
            "the LoRA's scale (alpha / rank) is out of range"
        )
    return entry


def _check_storable(
    layer: LayerShare, layer_name: str, what: str, hint: str = "the LoRA's scale (alpha / rank) is out of range"
) -> LayerShare:
    """Refuse a layer state (in storage dtype) holding NaN or Inf; ``what`` says what produced it."""
    for tensor_name in LAYER_TENSORS:
        tensor = getattr(layer, tensor_name)
        if tensor is not None and not all_finite(tensor):
            raise FactorValueError(f"{layer_name}: {what} gives {tensor_name} values beyond float32's range; {hint}")
    return layer


class ShareFactors:
    """Per-layer Share state for a whole model plus the ordered list of styles.

    Every layer holds one core slice per style, in the order of :attr:`styles`; a style that does not
    touch a layer has a zero core there.
    """

    def __init__(
        self,
        config: ShareConfig,
        layers: dict[str, LayerShare],
        styles: list[StyleInfo],
        base_model: str | None = None,
        conv_layers: set[str] | None = None,
    ):
        self.config = config
        self.layers = layers
        self.styles = styles
        self.base_model = base_model
        self.conv_layers = set(conv_layers or ())  # 1x1 convolutions: exported LoRAs use (a, b, 1, 1) kernels
        self.storage_dtype = torch.float32  # dtype of bases and cores on disk (see save_factors)
        # (folder, tensor file) of the checkpoint these factors were loaded from or last saved to: a save into that
        # folder refuses to overwrite a checkpoint another process saved meanwhile (see save_factors).
        self.checkpoint_version: tuple[Path, str] | None = None

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        adapters: Sequence[LoraAdapter],
        names: Sequence[str],
        config: ShareConfig | None = None,
        base_model: str | None = None,
        progress: bool = False,
        workers: int | None = None,
    ) -> ShareFactors:
        """Fit a subspace from ``t >= 1`` adapters at once (DESIGN 2).

        Args:
            adapters: the LoRAs; ranks, alphas and layer sets may differ; factors on any device, any dtype.
            names: one unique, non-empty style name per adapter.
            config: ``k``, ``p`` and options; defaults to ``ShareConfig()`` (k=32, p=8).
            base_model: id of the model the LoRAs were trained for, recorded in the checkpoint.
            progress: show a progress bar over layers.
            workers: threads fitting layers in parallel; default :func:`default_workers`.
        """
        config = config or ShareConfig()
        if len(adapters) == 0:
            raise ShareValueError("fitting needs at least one adapter")
        if len(adapters) != len(names):
            raise ShareValueError(f"got {len(adapters)} adapters but {len(names)} names")
        taken: list[str] = []
        for name in names:
            taken.append(validate_style_name(name, taken))
        strays = [type(adapter).__name__ for adapter in adapters if not isinstance(adapter, LoraAdapter)]
        if strays:
            raise ShareValueError(f"fit takes LoraAdapters (lora_files.load_lora), got {strays[0]}")
        shapes = _layer_shapes(adapters, names)

        def fit_one(layer_name: str) -> LayerShare:
            with _naming_layer(layer_name):
                pairs = zip(adapters, names, strict=True)
                entries = [_canonical_of_style(adapter, name, layer_name) for adapter, name in pairs]
                if all(entry is None or entry.energy == 0 for entry in entries):
                    n_out, d_in = shapes[layer_name]
                    layer = empty_layer(n_out, d_in, len(adapters), config.pseudo_rank, config.center, config.normalize)
                else:
                    layer = fit_layer(entries, config.rule, config.pseudo_rank, config.center, config.normalize)
            return _check_storable(to_storage(layer), layer_name, "fitting the LoRAs")

        layer_names = sorted(shapes)
        fitted = map_layers(fit_one, layer_names, workers, desc="fitting layers", progress=progress)
        layers = dict(zip(layer_names, fitted, strict=True))
        for index, name in enumerate(names):
            if not any(bool(layer.norm[index] > 0) for layer in fitted):
                raise FactorValueError(f"the LoRA for style {name!r} is zero on every layer: the LoRA's update is zero")
        styles = [_style_info(adapter, name) for adapter, name in zip(adapters, names, strict=True)]
        conv_layers = {key for adapter in adapters for key, lora in adapter.layers.items() if lora.conv}
        return cls(config, layers, styles, base_model, conv_layers)

    @classmethod
    def empty(
        cls, layer_shapes: dict[str, tuple[int, int]], config: ShareConfig | None = None, base_model: str | None = None
    ) -> ShareFactors:
        """A subspace with no style yet over the given layers ``name -> (n_out, d_in)``."""
        config = config or ShareConfig()
        layers = {
            name: to_storage(empty_layer(n, d, 0, config.pseudo_rank, config.center, config.normalize))
            for name, (n, d) in layer_shapes.items()
        }
        return cls(config, layers, [], base_model)

    # -- styles ---------------------------------------------------------------------------------

    @property
    def style_names(self) -> list[str]:
        return [style.name for style in self.styles]

    def snapshot(self) -> FactorsSnapshot:
        """The bank as it is now, for :meth:`restore` (shares the layer states, see :class:`FactorsSnapshot`)."""
        return FactorsSnapshot(
            config=copy.deepcopy(self.config),
            layers=dict(self.layers),
            styles=tuple(copy.deepcopy(self.styles)),  # renames and provenance edits change StyleInfo in place
            base_model=self.base_model,
            conv_layers=frozenset(self.conv_layers),
            storage_dtype=self.storage_dtype,
        )

    def restore(self, snapshot: FactorsSnapshot) -> None:
        """Put the bank back as it was when ``snapshot`` was taken: its styles, bases, cores and errors, bit for bit."""
        self.config = copy.deepcopy(snapshot.config)
        self.layers = dict(snapshot.layers)
        self.styles = list(copy.deepcopy(snapshot.styles))
        self.base_model = snapshot.base_model
        self.conv_layers = set(snapshot.conv_layers)
        self.storage_dtype = snapshot.storage_dtype

    def style_index(self, name: str) -> int:
        if not isinstance(name, str):  # a blend's key or an argument of another type (None, 3, a tensor)
            raise StyleError(f"a style name is a string, got {name!r} ({type(name).__name__})")
        for index, style in enumerate(self.styles):
            if style.name == name:
                return index
        composed = [index for index, style in enumerate(self.styles) if _same_text(style.name, name)]
        if len(composed) == 1:  # the name typed in another Unicode form than the one held
            return composed[0]
        known = ", ".join(repr(n) for n in self.style_names) or "none"
        raise StyleError(f"unknown style {name!r}; styles held: {known}")

    def merge(
        self,
        adapter: LoraAdapter,
        name: str,
        progress: bool = False,
        workers: int | None = None,
        batch_layers: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        """Add one adapter as a new style, continually (DESIGN 3), without the adapters merged before.

        Cost per layer is one QR of ``n x (k + r)`` plus ``O(t k^2 p)`` re-projection: it does not grow
        with the styles held except through that small term. All layers are computed first (on
        ``workers`` threads, default :func:`default_workers`) and swapped in at the end, so an error
        leaves the factors exactly as they were. Layers the adapter adds are created with zero cores
        for the earlier styles. The adapter's factors may be on any device and in any dtype.

        ``batch_layers`` (default) merges the layers of one shape class together with batched linear
        algebra (:func:`~.batched_merge.merge_layers`, the same maths as one layer at a time to float64
        rounding) in chunks spread over the threads; False merges every layer on its own
        (:func:`~.subspace.merge_layer`, the reference the batched path is tested against).

        ``device``: where the maths runs, in float64: the CPU by default (``FIT_DEVICE``); on an accelerator
        (``"cuda"``) the same steps run there on copies of the stored layers and the LoRA's factors, in one
        thread, and the results come back to the CPU in float32 as the factors hold them.
        """
        fit_device = resolve_fit_device(device)
        if fit_device != FIT_DEVICE:
            workers = 1  # one stream of kernels; threads would only contend for the GIL
        validate_style_name(name, self.style_names)
        if not isinstance(adapter, LoraAdapter):
            raise ShareValueError(f"merge takes a LoraAdapter (lora_files.load_lora), got {type(adapter).__name__}")
        if not adapter.layers:
            raise ShareValueError(f"adapter for style {name!r} has no layers")
        for layer_name, lora in adapter.layers.items():
            if layer_name in self.layers and self.layers[layer_name].shape != lora.shape:
                raise ShapeMismatchError(
                    f"size mismatch for {layer_name}: the LoRA's update has shape {lora.shape} but the "
                    f"Share factors hold shape {self.layers[layer_name].shape}"
                )
        rule = self.config.rule
        t = len(self.styles)

        def merge_one(layer_name: str) -> LayerShare:
            with _naming_layer(layer_name):
                layer = self._layer_or_empty(layer_name, adapter, t, fit_device)
                lora = adapter.layers.get(layer_name)
                entry = _storable_energy(lora.canonical(fit_device), f"merging style {name!r}") if lora else None
                merged = to_storage(merge_layer(layer, entry, rule))
            # The stored (float32) state must be finite, or the checkpoint could never be loaded or merged into.
            return _check_storable(merged, layer_name, f"merging style {name!r}")

        names = sorted(set(self.layers) | set(adapter.layers))
        if batch_layers:

            def one_by_one(chunk: list[str]) -> list[LayerShare] | _FailedLayer:
                merged = []
                for layer_name in chunk:
                    try:
                        absent = layer_name not in adapter.layers and _held_in(self.layers[layer_name], STORE_DTYPE)
                        # Untouched stored layers: a zero core appended in float32 gives the same bits as
                        # merge_layer's round trip through float64 (and their stored values were finite already).
                        merged.append(append_absent_style(self.layers[layer_name]) if absent else merge_one(layer_name))
                    except Exception as error:  # re-raised by merge() if no earlier layer fails
                        return _FailedLayer(layer_name, error)
                return merged

            def merge_chunk(chunk: list[str]) -> list[LayerShare] | _FailedLayer:
                if len(chunk) == 1 or all(layer_name not in adapter.layers for layer_name in chunk):
                    return one_by_one(chunk)
                try:
                    entries = canonical_forms([adapter.layers[layer_name] for layer_name in chunk], fit_device)
                    energies = torch.stack([entry.S for entry in entries]).square().sum(-1).tolist()
                    if min(energies) == 0.0:  # a zero update on some layer: handled as absent there, one by one
                        return one_by_one(chunk)
                    layers = [self._layer_or_empty(layer_name, adapter, t, fit_device) for layer_name in chunk]
                    merged = merge_layers(layers, entries, rule, dtype=STORE_DTYPE)
                    return merged if fit_device == FIT_DEVICE else [to_storage(layer) for layer in merged]
                except (FactorValueError, torch.linalg.LinAlgError):
                    # One layer at a time, so that the error names the first layer it comes from.
                    return one_by_one(chunk)

            chunks = self._merge_chunks(names, adapter, workers)
            done = map_layers(merge_chunk, chunks, workers, desc=f"merging {name}", progress=progress)
            failures = [result for result in done if isinstance(result, _FailedLayer)]
            if failures:
                # Chunks interleave layers of different classes: the error of the first layer in layer order, as
                # the per-layer path raises it.
                raise min(failures, key=lambda failure: failure.layer_name).error
            by_name = {
                layer_name: layer
                for chunk, layers in zip(chunks, done, strict=True)
                for layer_name, layer in zip(chunk, layers, strict=True)
            }
            merged = [by_name[layer_name] for layer_name in names]
        else:
            merged = map_layers(merge_one, names, workers, desc=f"merging {name}", progress=progress)
        if not any(bool(layer.norm[-1] > 0) for layer in merged):
            raise FactorValueError(
                f"the LoRA for style {name!r} is zero on every layer it touches: the LoRA's update is zero, "
                "nothing to merge"
            )
        self.layers = dict(zip(names, merged, strict=True))
        self.styles = [*self.styles, _style_info(adapter, name)]
        self.conv_layers |= {key for key, lora in adapter.layers.items() if lora.conv}

    def _layer_or_empty(
        self, layer_name: str, adapter: LoraAdapter, num_styles: int, device: torch.device = FIT_DEVICE
    ) -> LayerShare:
        """The stored layer, or a new one with no basis yet for a layer the adapter adds (float64, ``k = 0``), on
        ``device``."""
        layer = self.layers.get(layer_name)
        if layer is not None:
            return on_device(layer, device)
        n_out, d_in = adapter.layers[layer_name].shape
        config = self.config
        return empty_layer(n_out, d_in, num_styles, config.pseudo_rank, config.center, config.normalize, device)

    def _merge_chunks(self, names: list[str], adapter: LoraAdapter, workers: int | None) -> list[list[str]]:
        """``names`` cut into the chunks :meth:`merge` computes together: layers of one merge class (shape, ``k``,
        dtypes, the LoRA's rank there...), at most ``MERGE_CHUNK_BYTES`` of QR input each and about as many chunks
        as ``workers`` per class (at least two layers each); chunks in the order of their first layer."""
        t = len(self.styles)
        classes: dict[tuple, list[str]] = {}
        for layer_name in names:
            lora = adapter.layers.get(layer_name)
            if lora is None:  # a stored layer the style does not touch
                key: tuple = ("absent",)
            else:
                layer = self._layer_or_empty(layer_name, adapter, t)
                key = (*merge_class_key(layer, lora.rank), lora.up.dtype, lora.down.dtype, lora.up.device)
            classes.setdefault(key, []).append(layer_name)
        threads = max(1, default_workers() if workers is None else workers)
        chunks = []
        for key, members in classes.items():
            if key[0] == "absent":
                size = len(members)
            else:
                lora = adapter.layers[members[0]]
                n_out, d_in = lora.shape
                stack_bytes = 8 * max(n_out, d_in) * (key[1] + lora.rank)  # key[1]: the layers' k
                # Enough chunks to keep the threads busy, but never single layers when the budget allows two.
                size = max(1, min(MERGE_CHUNK_BYTES // stack_bytes, max(2, math.ceil(len(members) / threads))))
            chunks += [members[start : start + size] for start in range(0, len(members), size)]
        return sorted(chunks, key=lambda chunk: chunk[0])

    def replace_style(
        self, name: str, cores: dict[str, tuple[torch.Tensor, torch.Tensor]], source: dict | None = None
    ) -> None:
        """Give style ``name`` new factors in the fixed bases: the paper's Step 3 fine-tuning of a style's coefficients.

        Args:
            cores: ``layer name -> (core_out, core_in)``, each ``(k, p)``, for layers the style touches;
                layers left out keep the style's cores.
            source: recorded under ``"fine_tuned"`` in the style's provenance (steps, data...); an
                earlier fine-tuning's record moves to its ``"previous"``.

        Bases and the other styles do not change at all. Every layer is checked and computed before
        any is swapped in, so an error leaves the factors as they were.
        """
        index = self.style_index(name)
        new_layers = dict(self.layers)
        for layer_name, (core_out, core_in) in cores.items():
            layer = self.layers.get(layer_name)
            if layer is None:
                raise ShapeMismatchError(f"the factors hold no layer {layer_name!r}")
            if not bool(layer.present[index]):
                raise StyleError(f"style {name!r} does not touch {layer_name}; fine-tuning keeps the layers it touches")
            try:
                new_layers[layer_name] = to_storage(replace_in_layer(layer, index, core_out, core_in))
            except (ShapeMismatchError, FactorValueError) as error:
                raise type(error)(f"{layer_name}: {error}") from None
            _check_storable(
                new_layers[layer_name], layer_name, f"the new factors of style {name!r}", "they are out of range"
            )
        self.layers = new_layers
        if source is not None:
            previous = self.styles[index].source.get("fine_tuned")
            record = {**source, "previous": previous} if previous else dict(source)
            self.styles[index].source = {**self.styles[index].source, "fine_tuned": record}

    def delete_style(self, name: str) -> None:
        """Remove a style; the other styles' reconstructions are untouched."""
        index = self.style_index(name)
        self.layers = {key: to_storage(delete_from_layer(layer, index)) for key, layer in self.layers.items()}
        self.styles = [style for i, style in enumerate(self.styles) if i != index]

    def rename_style(self, old: str, new: str) -> None:
        index = self.style_index(old)
        validate_style_name(new, [n for n in self.style_names if n != old])
        self.styles[index].name = new

    def style_vector(self, blend: dict[str, float]) -> torch.Tensor:
        """``(t,)`` weights over the bank for a blend ``{name: weight}``.

        Every name must be held and every weight a finite number within ``+-MAX_STYLE_WEIGHT``.
        """
        if not isinstance(blend, dict):
            raise StyleError(f"a blend is a {{name: weight}} dict, not {type(blend).__name__}")
        weights = torch.zeros(len(self.styles), dtype=torch.float64)
        for name, weight in blend.items():
            weights[self.style_index(name)] += check_style_weight(name, weight)
        return weights

    # -- numbers --------------------------------------------------------------------------------

    def delta_weight(self, layer_name: str, style: str | dict[str, float]) -> torch.Tensor:
        """Dense reconstructed ``dW`` (float64, ``(n_out, d_in)``) of a style or blend on one layer."""
        blend = {style: 1.0} if isinstance(style, str) else style
        return to_fit(self.layers[layer_name]).delta_weight(self.style_vector(blend))

    def layer_errors(self, name: str) -> dict[str, float]:
        """Relative Frobenius error of a style on each layer it touches."""
        index = self.style_index(name)
        return {key: float(layer.error[index]) for key, layer in self.layers.items() if layer.norm[index] > 0}

    def style_error(self, name: str) -> float:
        """Relative Frobenius error of a style over all its layers: ``sqrt(sum err^2) / sqrt(sum ||dW||^2)``."""
        index = self.style_index(name)
        squared_error = sum(float(layer.error[index] * layer.norm[index]) ** 2 for layer in self.layers.values())
        energy = sum(float(layer.norm[index]) ** 2 for layer in self.layers.values())
        return math.sqrt(squared_error / energy) if energy > 0 else 0.0

    def explained_variance(self) -> dict[str, float]:
        """Per layer, the share of the (weighted) adapters' energy that the two-sided projection keeps (before
        the rank-p cut: what the summaries hold plus what the cuts dropped)."""
        result = {}
        for key, layer in self.layers.items():
            weights = 1.0 / layer.norm.clamp_min(1e-30) if layer.normalize else torch.ones_like(layer.norm)
            total = float(((weights * layer.norm) ** 2 * (layer.norm > 0)).sum())
            kept = float(torch.trace(layer.gram_out)) + float(layer.truncated.sum())
            result[key] = kept / total if total > 0 else 0.0
        return result

    def ranks(self) -> dict[str, int]:
        """``k`` per layer."""
        return {key: layer.k for key, layer in self.layers.items()}

    def storage_numbers(self) -> int:
        """Numbers stored on disk for all layers (bases, cores, summaries)."""
        return sum(layer.storage_numbers() for layer in self.layers.values())

    def formula_numbers(self) -> int:
        """The format's size formula: per layer ``k (n + d)`` basis numbers plus ``2 k p`` per style."""
        return sum(
            layer.k * sum(layer.shape) + 2 * layer.k * layer.pseudo_rank * layer.num_styles
            for layer in self.layers.values()
        )

    def source_bytes(self) -> int:
        """Bytes of the LoRA factors the styles came from, as given (their dtypes)."""
        return sum(style.source_bytes for style in self.styles)


def _held_in(layer: LayerShare, dtype: torch.dtype) -> bool:
    """Whether every tensor of the layer has ``dtype``."""
    tensors = [getattr(layer, name) for name in LAYER_TENSORS]
    return all(tensor.dtype == dtype for tensor in tensors if tensor is not None)


def _style_info(adapter: LoraAdapter, name: str) -> StyleInfo:
    source_bytes = sum(
        layer.up.numel() * layer.up.element_size() + layer.down.numel() * layer.down.element_size()
        for layer in adapter.layers.values()
    )
    return StyleInfo(
        name=name,
        source=dict(adapter.source),
        rank=adapter.rank,
        num_parameters=adapter.num_parameters(),
        source_bytes=source_bytes,
    )


def _layer_shapes(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Union of the adapters' layers with their ``(n_out, d_in)``; shapes must agree across adapters."""
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for adapter, name in zip(adapters, names, strict=True):
        if not adapter.layers:
            raise ShareValueError(f"adapter for style {name!r} has no layers")
        for layer_name, lora in adapter.layers.items():
            if layer_name in shapes and shapes[layer_name] != lora.shape:
                raise ShapeMismatchError(
                    f"size mismatch for {layer_name}: style {name!r} has an update of shape {lora.shape} "
                    f"but style {owner[layer_name]!r} has {shapes[layer_name]}"
                )
            shapes.setdefault(layer_name, lora.shape)
            owner.setdefault(layer_name, name)
    return shapes
