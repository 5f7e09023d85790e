"""``share-diffusers``: the command line for offline jobs on Share checkpoints.

    share-diffusers compress LORA... -o OUT [-k K | --variance F] [-p P] [--names N...]
    share-diffusers compress FOLDER_OF_LORAS -o OUT ...
    share-diffusers merge OUT LORA [--name N]
    share-diffusers rename OUT OLD NEW
    share-diffusers delete OUT STYLE [STYLE ...]
    share-diffusers inspect OUT [--json] [--similarity] [--png HEAT_MAP.png]
    share-diffusers export OUT STYLE -o FILE.safetensors
    share-diffusers generate [--model M] --factors OUT --style STYLE --prompt TEXT -o out.png
    share-diffusers push OUT user/repo [--private] [--revision BRANCH] [--create-pr]
    share-diffusers app [studio options]

Bad input ends with a one-line ``error: ...`` on stderr and exit status 1 (a malformed command line:
argparse's usage message and status 2); the checkpoint on disk is never changed by a failed command
(saves are atomic). Loading pipelines, the generation defaults and the style syntax live in
:mod:`share_diffusers.runtime`, which the studio (:mod:`share_diffusers.studio`) shares.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .core import LoraAdapter, ShareConfig, ShareFactors, load_factors, save_factors, style_as_lora
from .core.block_weights import KNOWN_ALIASES, BlockLayout
from .core.checkpoint import CONFIG_NAME, UnaddressableStyleNameWarning, checkpoint_files
from .core.errors import LoraFormatError, ShapeMismatchError, ShareValueError
from .core.similarity import (
    GROUP_LABELS,
    NEAR_DUPLICATE_THRESHOLD,
    StyleSimilarity,
    group_order,
    kept_energy,
    near_duplicate_message,
    near_duplicates,
    style_drift,
    style_map,
    style_similarity,
)
from .lora_files import PICKLE_SUFFIXES, load_lora, read_safetensors, save_lora, style_name_for
from .runtime import (
    DEFAULT_PROMPTS,
    DEMO_DEFAULTS,
    DTYPES,
    FLUX_DEV_DEFAULTS,
    FLUX_SCHNELL_DEFAULTS,
    TINY_RANDOM,
    TINY_RANDOM_DEFAULTS,
    USER_ERRORS,
    call_arguments,
    check_guidance,
    check_seed,
    defaults_for,
    error_line,
    format_style,
    import_diffusers_quietly,
    load_pipeline,
    load_styles,
    parse_style,
)

# Layers of diffusers' FluxTransformer2DModel: a checkpoint of only these is for a Flux pipeline's transformer.
_FLUX_TRANSFORMER_LAYER = re.compile(
    r"(transformer_blocks|single_transformer_blocks)\.\d+\..+"
    r"|x_embedder|context_embedder|proj_out|norm_out\.linear|time_text_embed\..+"
)
FLUX1_BLOCKS = {"transformer_blocks": 19, "single_transformer_blocks": 38}  # FLUX.1 dev / schnell and their kin
FLUX_LORA_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes
_STYLE_BLOCKS_HELP = (
    "per-block weights like 'ink[double=1,single=0.3],neon=0.5' (keys: double, single, ranges like double.0-9, "
    "* for the rest; or one value per block, 'ink[1,1,0.5,...]': FLUX.1's 19 double then 38 single blocks, "
    "optionally after a BASE value)"
)


def read_lora_source(source: str, weight_name: str | None = None, revision: str | None = None) -> LoraAdapter:
    """A LoRA from a PEFT folder, a ``.safetensors`` file, or a Hub repo id, in any layout we read.

    PEFT / plain diffusers keys load as they are. Flux LoRAs (``transformer.`` prefixes, kohya,
    XLabs, BFL, ai-toolkit, ComfyUI) go through diffusers' converters, with transformer-relative
    layer names, the same names ``ShareFluxPipeline`` uses, so CLI checkpoints load in the pipeline.
    """
    from .hub import resolve_lora_file

    path = Path(source)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return load_lora(path)
    file, provenance = resolve_lora_file(source, weight_name, revision=revision)
    tensors, metadata = read_safetensors(file)
    if _looks_like_flux(tensors):
        import_diffusers_quietly()
        from .flux_lora import convert_flux_lora

        converted = convert_flux_lora(tensors, metadata, origin=file.name)
        if not converted.transformer:
            raise LoraFormatError(f"{file.name} has no transformer layers (only {', '.join(converted.other_energy)})")
        if converted.other_energy:
            print(
                f"note: {file.name}: parts outside the transformer are not merged: {', '.join(converted.other_energy)}",
                file=sys.stderr,
            )
        return LoraAdapter(converted.transformer, source={**provenance, "format": "flux"})
    from .hub import peft_adapter_config_path

    # A Hub repo's adapter_model.safetensors needs the adapter_config.json beside it there (lora_alpha).
    adapter = load_lora(file, config_path=peft_adapter_config_path(file, provenance))
    adapter.source.update(provenance)
    return adapter


def _looks_like_flux(tensors: dict) -> bool:
    """Diffusers-prefixed or community (kohya, XLabs, BFL, ComfyUI) Flux key layouts."""
    markers = ("transformer.", "lora_unet_", "lora_transformer_", "double_blocks", "single_blocks", "diffusion_model.")
    return any(key.startswith(markers) or ".lora_down." in key for key in tensors)


def default_style_name(source: str, adapter: LoraAdapter) -> str:
    """The name ``ShareFluxPipeline.merge_lora`` gives a LoRA: a Hub repo's name, a file's stem, or its folder's
    name for the generic file names diffusers and PEFT write (``pytorch_lora_weights``, ``adapter_model``)."""
    path = Path(adapter.source.get("path") or source)
    if path.is_dir():  # a PEFT folder: named as the pipeline names its adapter_model.safetensors
        path = path / "adapter_model.safetensors"
    return style_name_for(source, path)


def expand_lora_sources(sources: Sequence[str], quiet: bool = False) -> list[str]:
    """Each source as it is, except a folder of LoRAs, which stands for every LoRA in it, in name order.

    A folder's LoRAs are its ``.safetensors`` files and its subfolders that hold one LoRA each (a PEFT adapter
    folder, or exactly one ``.safetensors`` file, as ``save_lora_weights`` writes). A PEFT adapter folder, or a
    folder whose only LoRA is one file, is one LoRA and stays as given (its name comes from the folder for the
    generic file names). A subfolder holding several ``.safetensors`` files is skipped with a note (pass its
    files one by one); a folder with no LoRA at all is an error, naming the pickle files it will not read.
    """
    expanded = []
    for source in sources:
        folder = Path(source)
        if not folder.is_dir() or (folder / "adapter_config.json").is_file():
            expanded.append(source)
            continue
        if (folder / CONFIG_NAME).is_file():
            raise ValueError(
                f"{folder} is a Share checkpoint, not a LoRA; export its styles as LoRAs first (share-diffusers "
                "export) to merge them into other factors"
            )
        found = []
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and entry.suffix.lower() == ".safetensors":
                found.append(entry)
            elif entry.is_dir() and (entry / CONFIG_NAME).is_file():
                if not quiet:  # its one .safetensors file is factors, not a LoRA ("holds no LoRA tensors")
                    print(f"note: skipped {entry}: a Share checkpoint, not a LoRA", file=sys.stderr)
            elif entry.is_dir() and _is_one_lora(entry):
                found.append(entry)
            elif entry.is_dir() and len(_safetensors_files(entry)) > 1 and not quiet:
                print(f"note: skipped {entry}: several .safetensors files; pass them one by one", file=sys.stderr)
        if not found:
            pickles = sorted(entry.name for entry in folder.iterdir() if entry.suffix.lower() in PICKLE_SUFFIXES)
            unread = f" (pickle files are never read: {', '.join(pickles[:3])})" if pickles else ""
            raise ValueError(f"{folder} holds no LoRA: no .safetensors file and no LoRA subfolder{unread}")
        if len(found) == 1 and found[0].is_file():
            expanded.append(source)
        else:
            expanded.extend(str(entry) for entry in found)
    return expanded


def _is_one_lora(folder: Path) -> bool:
    """A PEFT adapter folder, or a folder with exactly one ``.safetensors`` file."""
    return (folder / "adapter_config.json").is_file() or len(_safetensors_files(folder)) == 1


def _safetensors_files(folder: Path) -> list[Path]:
    return [entry for entry in folder.iterdir() if entry.is_file() and entry.suffix.lower() == ".safetensors"]


def cmd_compress(args: argparse.Namespace) -> None:
    given = args.sources
    args.sources = expand_lora_sources(given, quiet=args.quiet)
    if args.names is not None and len(args.names) != len(args.sources):
        folders = " (with the folders expanded: " + ", ".join(args.sources) + ")" if args.sources != given else ""
        raise ValueError(f"got {len(args.sources)} LoRAs but {len(args.names)} names{folders}")
    out = Path(args.output)
    if (out / CONFIG_NAME).exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a Share checkpoint; use 'merge' to add to it or --overwrite")
    config = ShareConfig(
        rank=args.rank,
        variance=args.variance,
        max_rank=args.max_rank,
        pseudo_rank=args.pseudo_rank,
        center=args.center,
        normalize=args.normalize,
    )
    adapters = [read_lora_source(src) for src in tqdm(args.sources, desc="reading LoRAs", disable=args.quiet)]
    names = args.names or [
        default_style_name(src, adapter) for src, adapter in zip(args.sources, adapters, strict=True)
    ]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if args.names is None and repeated is not None:
        raise ValueError(f"two LoRAs would both be named {repeated!r} (after their files or folders); pass --names")
    factors = ShareFactors.fit(adapters, names, config, base_model=args.base_model, progress=not args.quiet)
    save_factors(factors, out, dtype=getattr(torch, args.dtype))
    _print_summary(factors, out)


def cmd_merge(args: argparse.Namespace) -> None:
    factors = load_factors(args.checkpoint)
    adapter = read_lora_source(args.source, args.weight_name, args.revision)
    check_adapter_fits(factors, adapter, args.source)
    name = args.name or default_style_name(args.source, adapter)
    before = factors.snapshot()
    factors.merge(adapter, name, progress=not args.quiet)
    save_factors(factors, args.checkpoint)
    print(
        f"merged {name!r} (error {factors.style_error(name):.4f}); {len(factors.styles)} styles in {args.checkpoint}"
        + _moved_text(style_drift(before, factors))
    )
    # The merge stands (as merge_lora's NearDuplicateStyleWarning): the line says what to look at.
    for other, similarity in near_duplicates(factors, name).items():
        message = near_duplicate_message(name, other, similarity, NEAR_DUPLICATE_THRESHOLD)
        print(
            f"warning: {message}; 'share-diffusers inspect {args.checkpoint} --similarity' compares all pairs",
            file=sys.stderr,
        )


def _moved_text(moved: dict[str, float]) -> str:
    """How far the merge moved the styles held before (it turns the shared bases): the most moved one."""
    if not moved:
        return ""
    most = max(moved, key=moved.__getitem__)
    return f"; the others moved at most {moved[most]:.1%} ({most!r})"


def check_adapter_fits(factors: ShareFactors, adapter: LoraAdapter, source: str) -> None:
    """Refuse a LoRA made for another model than the checkpoint's, before anything is merged.

    Its layers must overlap the checkpoint's; a checkpoint of Flux transformer layers takes no layer outside the
    Flux transformer's module names; and where both record a base model Hub id, the two must be the same.
    (Layer shapes are checked by the merge itself.)
    """
    from .hub import hub_model_id

    layers, held = sorted(adapter.layers), sorted(factors.layers)
    if not held:  # an empty checkpoint: any LoRA starts it
        return

    def examples(names: list[str]) -> str:
        return ", ".join(repr(name) for name in names[:2]) + (f" (of {len(names)})" if len(names) > 2 else "")

    if not set(layers) & set(held):
        raise ShapeMismatchError(
            f"{source}: none of the LoRA's layers are in the checkpoint: the LoRA has {examples(layers)}, the "
            f"checkpoint {examples(held)}; is the LoRA for another model?"
        )
    if is_flux_transformer_checkpoint(factors):
        foreign = [name for name in layers if not _FLUX_TRANSFORMER_LAYER.fullmatch(name)]
        if foreign:
            raise ShapeMismatchError(
                f"{source}: the LoRA has layers that are not in a Flux transformer ({examples(foreign)}), and this "
                f"checkpoint is for one (its layers: {examples(held)}); is the LoRA for another model?"
            )
    ours, theirs = hub_model_id(factors.base_model), hub_model_id(adapter.source.get("base_model"))
    if ours and theirs and ours.lower() != theirs.lower():
        raise ShareValueError(
            f"{source}: the LoRA was made for {theirs!r} but the checkpoint holds styles for {ours!r}; merge LoRAs "
            "of that model, or compress a new checkpoint for this one"
        )


def cmd_rename(args: argparse.Namespace) -> None:
    with warnings.catch_warnings():  # the checkpoint's old names are what this command is for
        warnings.simplefilter("ignore", UnaddressableStyleNameWarning)
        factors = load_factors(args.checkpoint)
    factors.rename_style(args.old, args.new)
    save_factors(factors, args.checkpoint)
    print(f"renamed {args.old!r} to {args.new!r} in {args.checkpoint}")


def cmd_delete(args: argparse.Namespace) -> None:
    factors = load_factors(args.checkpoint)
    for name in dict.fromkeys(args.styles):  # all checked before anything is removed or saved
        factors.style_index(name)
    for name in dict.fromkeys(args.styles):
        factors.delete_style(name)
    save_factors(factors, args.checkpoint)
    left = ", ".join(factors.style_names) or "none"
    print(f"deleted {', '.join(map(repr, dict.fromkeys(args.styles)))} from {args.checkpoint}; styles left: {left}")


def cmd_push(args: argparse.Namespace) -> None:
    from .hub import push_share_factors

    factors = load_factors(args.checkpoint)
    url = push_share_factors(
        factors,
        args.repo_id,
        private=True if args.private else None,
        commit_message=args.message,
        revision=args.revision,
        create_pr=args.create_pr,
    )
    print(f"pushed {len(factors.styles)} styles from {args.checkpoint} to {args.repo_id}: {url}")


def summary(factors: ShareFactors, directory: Path | None = None) -> dict:
    """Styles, k, p, errors and storage of a checkpoint, as a JSON-able dict.

    ``bytes_on_disk`` counts the checkpoint's own files in ``directory`` (``share_config.json`` and the
    tensor file it names), not what an interrupted save left there nor anything else in the folder.
    """
    ranks = list(factors.ranks().values()) or [0]
    variance = list(factors.explained_variance().values()) or [0.0]
    on_disk = None
    if directory is not None:
        # The JSON and the tensor file it names: leftovers of interrupted saves and other files do not count.
        on_disk = sum(path.stat().st_size for path in checkpoint_files(directory))
    source = factors.source_bytes()
    return {
        "base_model": factors.base_model,
        "config": vars(factors.config),
        "layers": len(factors.layers),
        "k": {"min": min(ranks), "median": statistics.median(ranks), "max": max(ranks)},
        "explained_variance": {"min": min(variance), "mean": statistics.fmean(variance)},
        "styles": [
            {
                "name": style.name,
                "rank": style.rank,
                "error": factors.style_error(style.name),
                "source": style.source.get("path") or style.source.get("repo_id") or style.source.get("trained_from"),
                "source_bytes": style.source_bytes,
                "fine_tuned_steps": style.source.get("fine_tuned", {}).get("steps"),
            }
            for style in factors.styles
        ],
        "bytes_on_disk": on_disk,
        "bytes_formula": factors.formula_numbers() * factors.storage_dtype.itemsize,
        "dtype": str(factors.storage_dtype).removeprefix("torch."),
        "source_bytes": source,
        "compression": (source / on_disk) if on_disk else None,
    }


def _print_summary(factors: ShareFactors, directory: Path) -> None:
    info = summary(factors, directory)
    k = info["k"]
    print(
        f"{len(info['styles'])} styles, {info['layers']} layers, k {k['min']}..{k['max']} (median {k['median']}), "
        f"p {factors.config.pseudo_rank}"
    )
    width = max([len(style["name"]) for style in info["styles"]] + [5])
    print(f"  {'style':<{width}}  rank  rel. error  source")
    for style in info["styles"]:
        tuned = f" (fine-tuned {style['fine_tuned_steps']} steps)" if style["fine_tuned_steps"] is not None else ""
        print(
            f"  {style['name']:<{width}}  {style['rank']:>4}  {style['error']:>10.2e}  {style['source'] or ''}{tuned}"
        )
    if info["bytes_on_disk"]:
        ratio = ""
        if info["source_bytes"]:
            compression = info["compression"]
            ratio = (
                f", {compression:.1f}x smaller than the sources"
                if compression >= 1
                else f", {1 / compression:.1f}x the size of the sources"
            )
        print(
            f"storage: {info['bytes_on_disk']:,} bytes on disk (formula {info['bytes_formula']:,}); "
            f"sources {info['source_bytes']:,} bytes{ratio}"
        )


def similarity_summary(factors: ShareFactors, similarity: StyleSimilarity | None = None) -> dict:
    """The map of the bank as a JSON-able dict: pairwise similarities, 2-D map, near-duplicates, kept energy.

    ``matrix[i][j]`` is the cosine similarity of styles ``i`` and ``j``'s weight updates over all layers
    (:func:`~share_diffusers.core.similarity.style_similarity`); ``map`` their coordinates on a 2-D map
    (:func:`~share_diffusers.core.similarity.style_map`); ``kept_energy`` per style and layer group the
    share of the LoRA's energy the bank reproduces (:func:`~share_diffusers.core.similarity.kept_energy`).
    ``similarity``: ``style_similarity(factors)`` if already computed.
    """
    similarity = similarity if similarity is not None else style_similarity(factors)
    layout = style_map(similarity)
    names, matrix = similarity.names, similarity.matrix.tolist()
    pairs = [
        {"styles": [names[i], names[j]], "similarity": matrix[i][j]}
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if matrix[i][j] >= NEAR_DUPLICATE_THRESHOLD
    ]
    return {
        "styles": names,
        "matrix": matrix,
        "map": {"coordinates": layout.coordinates.tolist(), "explained": layout.explained.tolist()},
        "near_duplicate_threshold": NEAR_DUPLICATE_THRESHOLD,
        "near_duplicates": sorted(pairs, key=lambda pair: -pair["similarity"]),
        "kept_energy": kept_energy(factors),
    }


def _print_similarity(info: dict, layers: int) -> None:
    names, matrix = info["styles"], info["matrix"]
    print(f"\ncosine similarity of the styles' weight updates over all {layers} layers (1: the same up to strength)")
    if not names:
        print("  no styles held")
        return
    label = max(len(name) for name in names) + len(str(len(names))) + 1
    cell = max(6, len(str(len(names))))
    print(f"  {'':<{label}}" + "".join(f" {number:>{cell}}" for number in range(1, len(names) + 1)))
    for number, (name, row) in enumerate(zip(names, matrix, strict=True), start=1):
        print(f"  {f'{number} {name}':<{label}}" + "".join(f" {value:>{cell}.3f}" for value in row))
    pairs = info["near_duplicates"]
    found = ", ".join(f"{a!r} ~ {b!r} ({pair['similarity']:.3f})" for pair in pairs for a, b in [pair["styles"]])
    print(f"near-duplicates (similarity >= {info['near_duplicate_threshold']:g}): {found or 'none'}")
    kept = info["kept_energy"]
    groups = sorted({group for per_style in kept.values() for group in per_style}, key=group_order)
    print("kept energy per layer group (share of each LoRA's energy the bank reproduces, 1 - rel. error^2)")
    width = max(len(name) for name in names)
    sizes = [max(len(_group_label(group)), 6) for group in groups]
    header = (f"  {_group_label(group):>{size}}" for group, size in zip(groups, sizes, strict=True))
    print(f"  {'style':<{width}}" + "".join(header))
    for name in names:
        cells = (
            f"  {f'{kept[name][group]:.1%}' if group in kept[name] else '-':>{size}}"
            for group, size in zip(groups, sizes, strict=True)
        )
        print(f"  {name:<{width}}" + "".join(cells))


def _group_label(group: str) -> str:
    return GROUP_LABELS.get(group, group)


def cmd_inspect(args: argparse.Namespace) -> None:
    factors = load_factors(args.checkpoint)
    show_similarity = args.similarity or args.png is not None
    info = summary(factors, Path(args.checkpoint))
    if show_similarity:
        similarity = style_similarity(factors)
        info["similarity"] = similarity_summary(factors, similarity)
    if args.png is not None:
        info["png"] = str(save_heat_map(similarity, args.png))
    if args.json:
        print(json.dumps(info, indent=2))
        return
    _print_summary(factors, Path(args.checkpoint))
    if show_similarity:
        _print_similarity(info["similarity"], len(factors.layers))
    if args.png is not None:
        print(f"wrote {info['png']} (heat map of the similarities)")


HEAT_MAP_VALUES_UP_TO = 16  # cells carry their value up to this many styles (beyond, the text is unreadable)


def save_heat_map(similarity: StyleSimilarity, path: str | os.PathLike) -> Path:
    """Write the pairwise similarities as a PNG heat map, style names on both axes; returns the path.

    Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no display); folders are created.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as error:
        raise ValueError(f"--png needs matplotlib: pip install matplotlib ({error})") from None
    names = similarity.names
    if not names:
        raise ValueError("the checkpoint holds no styles: there is no heat map to draw")
    side = max(4.0, 0.45 * len(names) + 2.5)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    matrix = similarity.matrix.numpy()
    image = axis.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor")
    axis.set_yticks(range(len(names)), names)
    axis.set_title("Cosine similarity of the styles' weight updates")
    if len(names) <= HEAT_MAP_VALUES_UP_TO:
        for row in range(len(names)):
            for column in range(len(names)):
                value = float(matrix[row, column])
                color = "white" if abs(value) > 0.6 else "black"
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    figure.colorbar(image, ax=axis, shrink=0.8, label="cosine similarity")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


def is_flux_transformer_checkpoint(factors: ShareFactors) -> bool:
    """Whether every layer of the checkpoint is a layer of diffusers' ``FluxTransformer2DModel``."""
    return bool(factors.layers) and all(_FLUX_TRANSFORMER_LAYER.fullmatch(name) for name in factors.layers)


def checkpoint_block_layout(factors: ShareFactors) -> BlockLayout | None:
    """The blocks per-block weights name when ``export`` writes a Flux checkpoint's style (no model is loaded).

    Read off the layer names: double blocks 0 to the last one named, then single blocks, which is what
    :meth:`BlockLayout.of` finds in ``FluxTransformer2DModel`` when the checkpoint reaches its last block of
    each kind (most FLUX.1 LoRAs do: 19 + 38 blocks, a vector's 57 values). A checkpoint whose recorded base
    model is a FLUX.1 has FLUX.1's blocks however few its LoRAs touched (one of single blocks only still takes
    ``double=0`` and 57-value vectors, as the pipeline does). None for other checkpoints.
    """
    if not is_flux_transformer_checkpoint(factors):
        return None
    last = {"transformer_blocks": -1, "single_transformer_blocks": -1}  # model order: a vector's order
    if "flux.1" in (factors.base_model or "").lower():
        last = {base: count - 1 for base, count in FLUX1_BLOCKS.items()}
    for name in factors.layers:
        base, _, rest = name.partition(".")
        if base in last:
            last[base] = max(last[base], int(rest.partition(".")[0]))
    blocks = tuple(f"{base}.{index}" for base, top in last.items() for index in range(top + 1))
    return BlockLayout(blocks, dict(KNOWN_ALIASES["FluxTransformer2DModel"]))


def cmd_export(args: argparse.Namespace) -> None:
    factors = load_factors(args.checkpoint)
    style = parse_style(args.style)
    if style is None:
        raise ValueError("give a style name or a blend like ink=0.5,neon=0.5 to export, not none")
    adapter = style_as_lora(factors, style, layout=checkpoint_block_layout(factors))
    output = Path(args.output)
    if is_flux_transformer_checkpoint(factors):
        # What stock FluxPipeline.load_lora_weights loads: diffusers keys under "transformer.", a file,
        # or a folder holding the file save_lora_weights writes.
        target = output if output.suffix.lower() == ".safetensors" else output / FLUX_LORA_FILE
        target = save_lora(adapter, target, key_prefix="transformer.")
        kind = "diffusers Flux LoRA: pipe.load_lora_weights"
    else:
        target = save_lora(adapter, output, base_model=factors.base_model)
        kind = "PEFT adapter folder: PeftModel.from_pretrained" if target.parent == output else "diffusers keys"
    print(
        f"wrote {target} ({format_style(style)}, rank {adapter.source['rank']}, {len(adapter.layers)} layers; {kind})"
    )


def _image_format(path: Path) -> str:
    """PIL's format name for an image file name, refused before any model loads when it has none we write."""
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
    if path.suffix.lower() not in formats:
        raise ValueError(f"-o {path}: name an image file ending in {', '.join(formats)}")
    return formats[path.suffix.lower()]


def cmd_generate(args: argparse.Namespace) -> None:
    _image_format(Path(args.output))
    check_seed(args.seed)
    if args.guidance is not None:
        check_guidance(args.guidance)
    style = parse_style(args.style)  # before the minutes a real model may take to load
    pipe = load_pipeline(args.model, args.device, args.dtype, progress=not args.quiet, quantize=args.quantize)
    pipe.set_progress_bar_config(disable=args.quiet)
    load_styles(pipe, args.model, args.factors)
    defaults = defaults_for(pipe, args.model)
    call = call_arguments(
        pipe, defaults, 1, steps=args.steps, width=args.width, height=args.height, guidance=args.guidance
    )
    # The studio's and the server's limits: the demo model draws only at its training size, and a side that is
    # no multiple of the size step would be resized by the pipeline without a word.
    defaults.check_call(1, call["num_inference_steps"], call["width"], call["height"], args.guidance)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    image = pipe(prompt=args.prompt, style=style, style_scale=args.style_scale, **call, generator=generator).images[0]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output, format=_image_format(output))
    print(f"wrote {output} ({image.width}x{image.height}, style {format_style(style)})")


def _run_studio(argv: list[str]) -> int:
    """``share-diffusers app ...``: the Gradio style studio (:mod:`share_diffusers.studio`, the ``app`` extra)."""
    try:
        import_diffusers_quietly()
        from .studio.ui import main as studio_main
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("gradio"):
            raise
        print(f"error: the studio needs the app extra: pip install 'share-diffusers[app]' ({error})", file=sys.stderr)
        return 1
    return studio_main(argv)


def _defaults_help(field: str, unit: str = "") -> str:
    """Where a generate setting comes from when not given: one phrase per kind of model."""
    demo, tiny = getattr(DEMO_DEFAULTS, field), getattr(TINY_RANDOM_DEFAULTS, field)
    dev, schnell = getattr(FLUX_DEV_DEFAULTS, field), getattr(FLUX_SCHNELL_DEFAULTS, field)
    real = f"{dev}{unit}" if dev == schnell else f"{dev}{unit} on FLUX.1-dev-like models, {schnell}{unit} otherwise"
    return f"default: {demo}{unit} on the demo model, {tiny}{unit} on {TINY_RANDOM}, {real}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="share-diffusers", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="fit a Share checkpoint from LoRA files or PEFT folders")
    compress.add_argument(
        "sources",
        nargs="+",
        help="PEFT adapter folders, .safetensors LoRA files, Hub repo ids, or folders of LoRAs (each of their "
        ".safetensors files and LoRA subfolders, in name order)",
    )
    compress.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    rank = compress.add_mutually_exclusive_group()
    rank.add_argument("-k", "--rank", type=int, default=None, help="basis vectors per layer (default 32)")
    rank.add_argument("--variance", type=float, default=None, help="choose k per layer by explained variance")
    compress.add_argument("--max-rank", type=int, default=64, help="cap on k with --variance (default 64)")
    compress.add_argument("-p", "--pseudo-rank", type=int, default=8, help="rank of each style's core (default 8)")
    compress.add_argument("--names", nargs="+", help="style names, one per source (default: file/folder names)")
    compress.add_argument("--center", action="store_true", help="fit about the mean adapter (kept as an anchor)")
    compress.add_argument("--normalize", action="store_true", help="weight every adapter to unit energy")
    compress.add_argument("--base-model", help="id of the base model the LoRAs are for")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT")
    compress.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="storage of bases and cores (half precision halves the size; default float32)",
    )
    compress.set_defaults(func=cmd_compress)

    merge = commands.add_parser("merge", help="add one LoRA to a checkpoint as a new style, continually")
    merge.add_argument("checkpoint")
    merge.add_argument("source", help="PEFT adapter folder, .safetensors LoRA file or Hub repo id")
    merge.add_argument("--name", help="style name (default: file/folder name)")
    merge.add_argument("--weight-name", help="file inside a Hub repo or folder holding several .safetensors")
    merge.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    merge.set_defaults(func=cmd_merge)

    rename = commands.add_parser("rename", help="give a style a new name (old checkpoints' unusable names too)")
    rename.add_argument("checkpoint")
    rename.add_argument("old", help="the style's name as the checkpoint holds it (taken literally, not as a blend)")
    rename.add_argument("new", help="the new name (no '=', ',', '[', ']' or control characters)")
    rename.set_defaults(func=cmd_rename)

    delete = commands.add_parser("delete", help="remove styles from a checkpoint (the others do not change)")
    delete.add_argument("checkpoint")
    delete.add_argument("styles", nargs="+", metavar="style", help="names of the styles to remove")
    delete.set_defaults(func=cmd_delete)

    inspect = commands.add_parser("inspect", help="styles, k, p, errors and storage of a checkpoint")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument(
        "--similarity",
        action="store_true",
        help="also the cosine similarity of every pair of styles, near-duplicates, and the energy each style keeps "
        "per layer group",
    )
    inspect.add_argument(
        "--png",
        metavar="PATH",
        help="write a heat map of the pairwise similarities, style names on both axes (implies --similarity; "
        "needs matplotlib)",
    )
    inspect.set_defaults(func=cmd_inspect)

    export = commands.add_parser(
        "export", help="write a style (or a blend a=0.5,b=0.5, per-block weights too) as a plain LoRA"
    )
    export.add_argument("checkpoint")
    export.add_argument("style", help=f"style name, a blend like 'ink=0.5,neon=0.5', or {_STYLE_BLOCKS_HELP}")
    export.add_argument(
        "-o",
        "--output",
        required=True,
        help="FILE.safetensors, or a folder: DIR/pytorch_lora_weights.safetensors for a Flux checkpoint (what "
        "pipe.load_lora_weights loads), a PEFT adapter folder for any other model",
    )
    export.set_defaults(func=cmd_export)

    generate = commands.add_parser("generate", help="one image with a style (or blend) from a checkpoint")
    generate.add_argument(
        "--model",
        help="Flux repo id or folder (default: the embedded demo model, trained on Fashion-MNIST, with its styles "
        f"inverted, tint, stripes, outlines; {TINY_RANDOM}: the random-weight tiny pipeline)",
    )
    generate.add_argument("--factors", help="Share checkpoint folder or Hub repo id (default: the demo styles)")
    generate.add_argument(
        "--style", help=f"style name, a blend like 'ink=0.5,neon=0.5', {_STYLE_BLOCKS_HELP}, or none (the default)"
    )
    generate.add_argument("--style-scale", type=float, default=1.0, help="overall style strength (default 1)")
    generate.add_argument("--prompt", required=True, help=f"e.g. '{DEFAULT_PROMPTS[0]}' on the demo model")
    generate.add_argument("-o", "--output", required=True, help="image file to write (.png, .jpg or .webp)")
    generate.add_argument("--seed", type=int, default=0, help="of the initial noise (default 0)")
    generate.add_argument("--steps", type=int, default=None, help=f"denoising steps ({_defaults_help('steps')})")
    generate.add_argument("--height", type=int, default=None, help=f"pixels ({_defaults_help('height')})")
    generate.add_argument("--width", type=int, default=None, help=f"pixels ({_defaults_help('width')})")
    generate.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="the guidance input of FLUX.1-dev-like models, or true CFG against an empty prompt on models without "
        f"one, off at 1 or below ({_defaults_help('guidance')})",
    )
    generate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    generate.add_argument(
        "--dtype", choices=DTYPES, default=None, help="weights dtype (default: bfloat16 on cuda, float32 otherwise)"
    )
    generate.add_argument(
        "--quantize",
        metavar="KIND_OR_GGUF",
        help="quantize the transformer: int8 or float8 (torchao), nf4 (bitsandbytes, CUDA) or a .gguf file of it; "
        "styles apply unfused on top",
    )
    generate.set_defaults(func=cmd_generate)

    push = commands.add_parser("push", help="upload a checkpoint to the Hugging Face Hub with a model card")
    push.add_argument("checkpoint")
    push.add_argument("repo_id", help="the Hub repo, 'user/name' (created if missing)")
    push.add_argument("--private", action="store_true", help="make a new repo private")
    push.add_argument("--revision", help="branch to commit to (created if missing; default the main branch)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--message", help="commit message (default 'Share factors: N styles')")
    push.set_defaults(func=cmd_push)
    commands.add_parser("app", help="open the Gradio style studio (share-diffusers app --help)", add_help=False)
    commands.add_parser(
        "serve",
        help="serve concurrent requests, each in its own style, batched (share-diffusers serve --help)",
        add_help=False,
    )
    return parser


def _one_line_warnings(show_other):
    """A ``warnings.showwarning`` that prints our own warnings as one ``warning: ...`` line, like the errors, and
    hands other libraries' to ``show_other``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if category.__module__.startswith("share_diffusers."):
            print(f"warning: {error_line(message)}", file=sys.stderr)
        else:
            show_other(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_at = next((i for i, arg in enumerate(argv) if arg not in ("-q", "--quiet")), len(argv))
    if argv[command_at : command_at + 1] == ["app"]:  # the studio parses its own options
        return _run_studio(argv[command_at + 1 :])
    if argv[command_at : command_at + 1] == ["serve"]:  # the server parses its own options
        from .serving.server import main as serve_main

        return serve_main(argv[command_at + 1 :])
    args = build_parser().parse_args(argv)
    on_checkpoint = ("merge", "rename", "delete", "inspect", "export", "push")
    if args.command in on_checkpoint and not os.path.isdir(args.checkpoint):
        print(f"error: no Share checkpoint folder at {args.checkpoint}", file=sys.stderr)
        return 1
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            args.func(args)
    except USER_ERRORS as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
