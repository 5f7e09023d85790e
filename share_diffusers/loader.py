"""``ShareLoaderMixin``: Share factors and styles on a diffusers pipeline, in diffusers' loader style.

The methods are thin: validate, fetch files with ``huggingface_hub``, convert with diffusers, then
hand over to the core (:class:`~share_diffusers.core.ShareModel`). The pipeline's denoiser must be
its ``transformer`` attribute (Flux); other pipelines can reuse the mixin by overriding
``share_targets`` and ``_share_denoiser``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from diffusers.utils.torch_utils import is_compiled_module
from torch import nn

from .core import (
    FactorsSnapshot,
    LoraAdapter,
    ShareConfig,
    ShareFactors,
    ShareModel,
    load_factors,
    save_factors,
    style_as_lora,
)
from .core.errors import (
    FactorValueError,
    ShapeMismatchError,
    ShareStateError,
    ShareValueError,
    StyleError,
)
from .core.factors import validate_style_name
from .core.inject import find_targets, remove_share
from .core.layer import ShareLinear
from .core.model import StyleSpec, check_factors_fit, renamed_in_spec, spelt_as_held
from .core.similarity import style_drift, warn_near_duplicates
from .flux_lora import (
    ALL_LORA_LAYERS,
    FLUX_ATTENTION_TARGETS,
    FluxLora,
    convert_flux_lora,
    is_peft_transformer_adapter,
    split_by_layers,
)
from .hub import check_size, peft_adapter_config_path, push_share_factors, resolve_lora_file, resolve_share_factors
from .lora_files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DIFFUSERS_LORA_NAME,
    MAX_ADAPTER_CONFIG_BYTES,
    read_adapter_config,
    read_safetensors,
    save_lora,
    style_name_for,
)

logger = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What :meth:`ShareLoaderMixin.merge_lora` did.

    Attributes:
        style_name: the new style.
        error: relative Frobenius error of the style's ``dW`` over the Share targets.
        layers_merged: LoRA layers that went into the subspace.
        outside_energy_fraction: share of the LoRA's energy (``sum ||dW||_F^2``) that Share does not hold:
            transformer layers outside the targets and parts outside the transformer (text encoder).
        outside: energy fraction per layer or component left out, largest first.
        source: provenance recorded in the checkpoint.
        near_duplicates: held styles whose cosine similarity to the new one is at least
            ``NEAR_DUPLICATE_THRESHOLD`` (0.95), most similar first (each also raised as a
            :class:`~share_diffusers.core.similarity.NearDuplicateStyleWarning`).
        dropped_keys: keys of the file that went nowhere, neither merged nor measured (a bias of zeros, a
            norm's ``.diff``, tensors that are no LoRA factor), as diffusers' converter names them.
        moved: per style held before, how far its update moved relative to its size (the merge turned the shared
            bases; :func:`~share_diffusers.core.similarity.style_drift`, exact). Undo with :meth:`restore_share`.
    """

    style_name: str
    error: float
    layers_merged: int
    outside_energy_fraction: float
    outside: dict[str, float] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    near_duplicates: dict[str, float] = field(default_factory=dict)
    dropped_keys: list[str] = field(default_factory=list)
    moved: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"merged {self.style_name!r}: {self.layers_merged} layers, relative error {self.error:.2e}"
        if self.outside:
            top = ", ".join(f"{name} {fraction:.1%}" for name, fraction in list(self.outside.items())[:3])
            text += f"; {self.outside_energy_fraction:.1%} of the LoRA's energy is outside the Share targets ({top})"
        if self.near_duplicates:
            similar = ", ".join(f"{name!r} ({value:.3f})" for name, value in self.near_duplicates.items())
            text += f"; near-duplicate of {similar} (cosine similarity)"
        if self.dropped_keys:
            text += f"; {len(self.dropped_keys)} key(s) of the file left out, e.g. {self.dropped_keys[0]!r}"
        return text


class ShareLoaderMixin:
    """Load, merge, select, fuse, save and export Share styles on a pipeline's denoiser."""

    share_targets: str | tuple[str, ...] = FLUX_ATTENTION_TARGETS
    _share: ShareModel | None = None
    _default_style: StyleSpec | list[StyleSpec] = None
    _default_style_scale: float = 1.0

    @property
    def _share_denoiser(self) -> nn.Module:
        """The transformer, the original module when it was compiled (``pipe.transformer = torch.compile(...)``):
        its layers keep their names there (the compiled wrapper prefixes them with ``_orig_mod.``), and the
        compiled one runs the same modules, Share layers included."""
        return unwrap_compiled(self.transformer)

    @property
    def share(self) -> ShareModel | None:
        """The denoiser's :class:`ShareModel` (layers, factors, per-call style state), or None before any factors.

        The same object as ``ShareModel.of(pipe.transformer)``. Use it for what the pipeline does not
        wrap: ``with pipe.share.styles(["ink", "neon"]): ...`` around any call, training, inspection.
        """
        return self._share

    def new_share_subspace(
        self, target_modules: str | list[str] | None = None, config: ShareConfig | None = None
    ) -> ShareModel:
        """Inject an empty Share subspace into the denoiser (styles come later: trained or merged).

        Args:
            target_modules: which linears Share covers (PEFT rule); default the attention linears.
            config: ``k``, ``p`` and options (default ``ShareConfig()``: k=32, p=8).
        """
        if self._share is not None:
            raise ShareStateError("this pipeline already holds Share factors; remove_share() first")
        self._check_no_peft_adapters()
        self._check_plain_denoiser()
        targets = self._choose_targets(target_modules, {})
        share = ShareModel.inject(self._share_denoiser, target_modules=targets, config=config or ShareConfig())
        share.factors.base_model = self._base_model_id()
        self._share = share
        return share

    @property
    def share_factors(self) -> ShareFactors | None:
        """The Share factors in use (None before loading or merging any)."""
        return self._share.factors if self._share is not None else None

    # -- loading and saving ---------------------------------------------------------------------

    def load_share_factors(
        self,
        repo_id_or_path: str | os.PathLike,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        """Load a Share checkpoint (local folder or Hub repo) into the denoiser, replacing any held now.

        The factors are checked against the denoiser (every layer present, every shape equal) before
        the pipeline changes.
        """
        folder, weights = resolve_share_factors(
            repo_id_or_path,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        factors = load_factors(folder, weights_path=weights)
        if factors.styles and factors.base_model and not same_base_model(factors.base_model, self._base_model_id()):
            logger.info(
                "Share factors were made for %s; this pipeline is %s", factors.base_model, self._base_model_id()
            )
        self._check_no_peft_adapters()
        if self._share is None:
            self._check_plain_denoiser()
        check_factors_fit(self._share_denoiser, factors)
        self.remove_share()
        self._share = ShareModel.inject(self._share_denoiser, factors)

    def save_share_factors(self, save_directory: str | os.PathLike) -> Path:
        """Write the factors (atomically) to a folder; returns the path of its ``share_config.json``."""
        return save_factors(self._require_share().factors, save_directory)

    def push_share_factors_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload the factors with a model card (styles, sources, k, p, errors); returns the commit URL (the pull
        request's with ``create_pr``). ``revision``: a branch, created if needed (default: main)."""
        return push_share_factors(
            self._require_share().factors,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )

    # -- merging --------------------------------------------------------------------------------

    def merge_lora(
        self,
        repo_id_or_path: str | os.PathLike,
        weight_name: str | None = None,
        style_name: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        target_modules: str | list[str] | None = None,
        config: ShareConfig | None = None,
    ) -> MergeReport:
        """Merge a LoRA (Hub id or local file, any format diffusers converts) as a new style, continually.

        Args:
            style_name: defaults to the repo or file name.
            target_modules: only when no subspace exists yet: which layers Share covers (PEFT rule, or
                ``"all-lora-layers"`` for every transformer linear this LoRA touches). Defaults to the
                attention linears.
            config: ``k``, ``p`` and options of a new subspace (default ``ShareConfig()``: k=32, p=8).

        A PEFT adapter (a folder, or a Hub repo, with ``adapter_config.json`` and ``adapter_model.safetensors``)
        is read with its config's scale. The LoRA's parts outside the Share layers are reported (energy
        fraction), not merged; keys that go nowhere are listed in the report's ``dropped_keys``. A failed
        merge leaves the pipeline and its styles exactly as they were. A new style whose update has cosine
        similarity at least ``NEAR_DUPLICATE_THRESHOLD`` (0.95) with a held style's (a rescaled copy has 1)
        is merged all the same, with a :class:`~share_diffusers.core.similarity.NearDuplicateStyleWarning`
        naming both styles, and listed in the report's ``near_duplicates``.
        """
        path, source = resolve_lora_file(
            repo_id_or_path,
            weight_name,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        name = style_name if style_name is not None else style_name_for(repo_id_or_path, path)
        try:
            validate_style_name(name, self.list_styles())
        except StyleError as error:
            if style_name is not None:
                raise
            raise StyleError(f"{error} (the name comes from {path.name}); pass style_name=...") from None
        creating = self._share is None
        if not creating and (target_modules is not None or config is not None):
            raise ShareValueError("target_modules and config apply only when the first LoRA creates the subspace")
        # Everything about the file is checked before the pipeline changes: its layout and values (finite
        # factors and alphas), its fit to the transformer, and its canonical forms (cached, reused by the merge).
        tensors, metadata = read_safetensors(path)
        hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        adapter_config = _peft_adapter_config(path, source, hub) if is_peft_transformer_adapter(tensors) else None
        converted = convert_flux_lora(tensors, metadata, origin=path.name, adapter_config=adapter_config)
        denoiser = self._share_denoiser
        _check_lora_fits(denoiser, converted.transformer, path.name)
        energies = converted.energies()
        if energies and not any(energy > 0 for energy in energies.values()):
            raise FactorValueError(
                f"{path.name}: the LoRA's update is zero on every transformer layer; nothing to merge"
            )
        if creating:
            self._check_no_peft_adapters()
            self._check_plain_denoiser()
            targets = self._choose_targets(target_modules, converted.transformer)
        try:
            if creating:
                share = ShareModel.inject(denoiser, target_modules=targets, config=config or ShareConfig())
                share.factors.base_model = self._base_model_id()
            else:
                share = self._share
            inside, outside = split_by_layers(converted.transformer, share.layers)
            if not inside:
                raise ShapeMismatchError(_no_share_layer_message(path.name, converted, share.layers, creating))
            before = share.snapshot()  # references, not copies: to measure how far the other styles move
            try:
                share.merge(LoraAdapter(inside, source=source), name)
            except FactorValueError as error:
                raise FactorValueError(f"{path.name}: {error}") from None
        except BaseException:
            if creating:  # the subspace this call created goes away with the failure, however far it got
                created = ShareModel.of(denoiser)
                if created is not None:
                    created.remove()
                remove_share(denoiser)
            raise
        self._share = share
        duplicates = warn_near_duplicates(share.factors, name, stacklevel=2)
        total = sum(energies.values()) + sum(converted.other_energy.values())
        outside_energy = {name: energies[name] for name in outside}
        outside_energy.update(converted.other_energy)
        fractions = {k: v / total for k, v in sorted(outside_energy.items(), key=lambda item: -item[1]) if total > 0}
        report = MergeReport(
            style_name=name,
            error=share.factors.style_error(name),
            layers_merged=len(inside),
            outside_energy_fraction=sum(fractions.values()),
            outside=fractions,
            source=source,
            near_duplicates=duplicates,
            dropped_keys=list(converted.dropped),
            moved=style_drift(before, share.factors),
        )
        logger.info("%s", report)
        if converted.dropped:
            logger.warning(
                "%s: %d key(s) not merged: %s", path.name, len(converted.dropped), ", ".join(converted.dropped[:5])
            )
        return report

    def _choose_targets(self, target_modules, lora_layers: dict) -> str | list[str]:
        if target_modules == ALL_LORA_LAYERS:
            # Exact names as one anchored regex: PEFT's list rule matches suffixes, so a LoRA touching the
            # top-level proj_out would also wrap every single_transformer_blocks.N.proj_out.
            return "|".join(f"(?:{re.escape(name)})" for name in sorted(lora_layers))
        targets = target_modules if target_modules is not None else self.share_targets
        if not find_targets(self._share_denoiser, targets):
            raise ShapeMismatchError(f"no linear layer of the transformer matches target_modules={targets!r}")
        return targets

    # -- styles ---------------------------------------------------------------------------------

    def list_styles(self) -> list[str]:
        return self._share.style_names if self._share is not None else []

    def set_style(self, style: StyleSpec | list[StyleSpec] = None, style_scale: float = 1.0) -> None:
        """The style used by calls that pass no ``style``: a name, a ``{name: weight}`` blend, or None."""
        if style is not None:
            share = self._require_share()
            if share.fused_style is not None:
                raise ShareStateError(
                    f"style {share.fused_style!r} is fused; unfuse_style() before choosing a default style"
                )
            share.weights_for(style, style_scale)  # validate now, not at call time
            # Names as the bank spells them, so that a rename or delete finds them (another Unicode form resolves).
            style = spelt_as_held(style, share.factors)
        self._default_style, self._default_style_scale = style, style_scale

    def snapshot_share(self) -> FactorsSnapshot | None:
        """The style bank as it is now (None: no Share subspace yet), for :meth:`restore_share`.

            bank = pipe.snapshot_share()
            report = pipe.merge_lora("someone/new-style")  # turns the shared bases: every style moves a little
            pipe.restore_share(bank)  # the new style gone, every other one back bit for bit

        Deleting the new style would not turn the bases back. The snapshot holds the bank's arrays, not copies:
        one more bank in memory while it is kept.
        """
        return self._share.snapshot() if self._share is not None else None

    def restore_share(self, snapshot: FactorsSnapshot | None) -> None:
        """Put the bank back as :meth:`snapshot_share` found it (None: remove the subspace a later merge created).

        A default style (:meth:`set_style`) that names a style the restored bank lacks is dropped, as
        :meth:`delete_style` drops it.
        """
        if snapshot is None:
            if self._share is not None:
                self.remove_share()
            return
        self._require_share().restore(snapshot)
        held = set(snapshot.style_names)
        if self._default_style is not None and not _only_mentions(self._default_style, held):
            self._default_style = None

    def delete_style(self, name: str) -> None:
        share = self._require_share()
        share.delete_style(name)
        held = {style.name for style in share.factors.styles}
        if self._default_style is not None and not _only_mentions(self._default_style, held):
            self._default_style = None

    def rename_style(self, old: str, new: str) -> None:
        """Rename a style; the default style from :meth:`set_style` follows the new name."""
        share = self._require_share()
        index = share.factors.style_index(old)
        held = share.factors.styles[index].name  # as the bank spells it (old may be typed in another Unicode form)
        share.rename_style(old, new)
        self._default_style = renamed_in_spec(self._default_style, held, share.factors.styles[index].name)

    def fuse_style(self, style: StyleSpec, style_scale: float = 1.0, exact: bool = True) -> None:
        """Fuse a style or blend into the transformer weights: base-model speed; undo with ``unfuse_style``.

        ``exact`` (default) keeps a copy of the fused weights on their device so that unfusing is bit
        for bit (4.7 GiB for FLUX.1 in bf16); ``exact=False`` saves that memory and unfuses by
        subtraction, as PEFT's ``unfuse_lora`` does (within bf16 rounding). Refused while a default style is
        set (:meth:`set_style`): every call would apply it on top of the fused one, which is refused.
        """
        share = self._require_share()
        if self._default_style is not None:
            share.weights_for(style, style_scale)  # a bad style is named first, as without a default
            raise ShareStateError(
                f"the default style {self._default_style!r} is set: calls would apply it on top of the fused style; "
                "set_style(None) before fuse_style(...)"
            )
        share.fuse_style(style, style_scale, exact=exact)

    def unfuse_style(self) -> None:
        if self._share is not None:
            self._share.unfuse_style()

    def export_style_as_lora(self, style: StyleSpec, path: str | os.PathLike) -> Path:
        """Write a style or blend as a diffusers-format LoRA file that stock ``load_lora_weights`` loads.

        Args:
            style: a style name or a ``{name: weight}`` blend (per-block weights too).
            path: a ``.safetensors`` file (any case), or a folder that gets ``pytorch_lora_weights.safetensors``
                (the file ``save_lora_weights`` writes, which ``load_lora_weights(folder)`` finds).

        Returns the path of the file written.
        """
        if style is None:
            raise StyleError("export_style_as_lora needs a style name or a {name: weight} blend")
        share = self._require_share()
        adapter = style_as_lora(share.factors, style, layout=share.block_layout, layer_names=list(share.layers))
        path = Path(path)
        target = path if path.suffix.lower() == ".safetensors" else path / DIFFUSERS_LORA_NAME
        return save_lora(adapter, target, key_prefix="transformer.")

    def remove_share(self) -> None:
        """Take every Share layer out of the denoiser (it is the plain model again); styles are dropped."""
        if self._share is not None:
            self._share.remove()
        self._share = None
        self._default_style = None

    # -- helpers --------------------------------------------------------------------------------

    def _require_share(self) -> ShareModel:
        if self._share is None:
            raise StyleError("no Share factors loaded: call load_share_factors(...) or merge_lora(...) first")
        return self._share

    def _check_plain_denoiser(self) -> None:
        """No Share layers in the denoiser that this pipeline does not hold (injected by hand)."""
        if any(isinstance(module, ShareLinear) for module in self._share_denoiser.modules()):
            raise ShareStateError(
                "the transformer holds Share layers this pipeline did not load; take them out first with "
                "ShareModel.of(pipe.transformer).remove() (or share_diffusers.core.remove_share(pipe.transformer))"
            )

    def _check_no_peft_adapters(self) -> None:
        if getattr(self._share_denoiser, "peft_config", None):
            raise ShareStateError(
                "this transformer holds diffusers/PEFT LoRA adapters; call unload_lora_weights() before using Share "
                "(or merge those LoRAs as Share styles with merge_lora)"
            )

    def _base_model_id(self) -> str | None:
        name = getattr(getattr(self, "config", None), "_name_or_path", None)
        return str(name) if name else None  # a Path when from_pretrained was given one


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """``module`` itself, or the module ``torch.compile`` wrapped."""
    return module._orig_mod if is_compiled_module(module) else module


def same_base_model(recorded: str, loaded: str | None) -> bool:
    """Whether a checkpoint's recorded ``base_model`` names the pipeline's model (its ``_name_or_path``).

    Equal strings; the same Hub repo id in another case; two existing paths of one folder; or a recorded
    relative folder that the loaded folder's path ends with (a checkpoint made beside a model folder, loaded
    by another path to it).
    """
    if not loaded:
        return False
    if recorded == loaded or (recorded.lower() == loaded.lower() and "/" in recorded and not Path(loaded).exists()):
        return True
    recorded_path, loaded_path = Path(recorded), Path(loaded)
    if not loaded_path.exists():
        return False
    if recorded_path.exists() and recorded_path.resolve() == loaded_path.resolve():
        return True
    if recorded_path.is_absolute():
        return False
    parts = loaded_path.resolve().parts
    return len(recorded_path.parts) <= len(parts) and parts[-len(recorded_path.parts) :] == recorded_path.parts


def _check_lora_fits(denoiser: nn.Module, layers: dict, origin: str) -> None:
    """Every LoRA layer must name a linear of the denoiser with the same ``(n_out, d_in)``."""
    modules = dict(denoiser.named_modules())
    for layer_name, lora in layers.items():
        module = modules.get(layer_name)
        module = getattr(module, "base_layer", module)  # through a ShareLinear wrapper
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim < 2:
            raise ShapeMismatchError(f"{origin}: the LoRA targets {layer_name!r}, which this transformer does not have")
        # in/out features, not the weight's shape: a quantized weight is stored packed (GGUF: bytes per row)
        shape = (getattr(module, "out_features", weight.shape[0]), getattr(module, "in_features", weight.shape[1]))
        if shape != lora.shape:
            raise ShapeMismatchError(
                f"{origin}: size mismatch for {layer_name}: the LoRA's update is {lora.shape} but the "
                f"transformer's layer is {shape}; is this LoRA for another model?"
            )


def _no_share_layer_message(origin: str, converted: FluxLora, share_layers, creating: bool) -> str:
    """Why a LoRA has nothing to merge: its layers and the Share layers, and what to do."""
    touched = next(iter(converted.transformer))
    held = next(iter(share_layers), None)
    text = (
        f"{origin}: none of the LoRA's {len(converted.transformer)} transformer layer(s) (e.g. {touched!r}) is one "
        f"of the {len(share_layers)} Share layer(s)" + (f" (e.g. {held!r})" if held else "")
    )
    if creating:
        return text + "; widen target_modules (or pass target_modules='all-lora-layers')"
    return text + "; the subspace's layers are fixed once it exists: start a new one with wider target_modules"


def prefetch_lora(
    repo_id: str,
    weight_name: str | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    max_bytes: int | None = None,
) -> dict:
    """Download what :meth:`ShareLoaderMixin.merge_lora` of a Hub LoRA reads into the cache: the weights file and,
    for a PEFT adapter, its ``adapter_config.json``. Returns the provenance (``"weight_name"``, ``"commit"``...).

    A server or studio calls this before it takes its pipeline, then merges with
    ``weight_name=source["weight_name"], revision=source["commit"], local_files_only=True``: generations go on
    during the download, and the merge reads the very files fetched here, whatever the branch does meanwhile.
    ``max_bytes``: a weights file over this size is refused before downloading (``HubFileTooLargeError``); an
    adapter config over ``MAX_ADAPTER_CONFIG_BYTES`` too.
    """
    path, source = resolve_lora_file(
        repo_id, weight_name, revision=revision, token=token, cache_dir=cache_dir, max_bytes=max_bytes
    )
    name = PurePosixPath(source["weight_name"])
    if "repo_id" in source and name.name == ADAPTER_WEIGHTS_NAME:
        config = str(name.with_name(ADAPTER_CONFIG_NAME))
        at = source.get("commit", revision)
        check_size(
            repo_id, config, MAX_ADAPTER_CONFIG_BYTES, revision=at, token=token, cache_dir=cache_dir, missing_ok=True
        )
        peft_adapter_config_path(path, source, dict(token=token, cache_dir=cache_dir))
    return source


def _peft_adapter_config(path: Path, source: dict, hub: dict) -> dict | None:
    """The ``adapter_config.json`` of PEFT adapter weights (see :func:`peft_adapter_config_path`), read."""
    config_path = peft_adapter_config_path(path, source, hub)
    return read_adapter_config(config_path) if config_path is not None else None


def _only_mentions(style, names: set[str]) -> bool:
    """Whether every style ``style`` (a spec or list of specs) names is in ``names``."""
    if isinstance(style, list | tuple):
        return all(_only_mentions(item, names) for item in style)
    if isinstance(style, dict):
        return all(name in names for name in style)
    return style is None or style in names
