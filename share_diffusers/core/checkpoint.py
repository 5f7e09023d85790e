"""The on-disk format of Share factors (DESIGN.md section 5).

A checkpoint is a folder:

- ``share_config.json``: format name and version, base model, config (k rule, p, options), the
  styles with their provenance and errors, each layer's shape and ``k``, and the name of the
  tensor file. Writing this file is the commit point of a save.
- ``share_factors-<revision>.safetensors``: every layer's ``basis_out``, ``basis_in``, ``core_out``,
  ``core_in``, ``gram_out``, ``gram_in``, ``norm``, ``error``, ``truncated`` (and ``anchor`` when centred),
  keyed ``"<layer>.<tensor>"``. Format 1 had no ``truncated`` and summaries of the full cores; it loads with
  ``truncated`` 0 (see :class:`~.subspace.LayerShare`).

A save writes the new tensor file under a fresh name, then atomically replaces the JSON, then
deletes the old tensor file: a crash at any point leaves a readable checkpoint (old or new).
Nothing is ever unpickled; loading validates the JSON's every field and type and every tensor's
presence, shape and finiteness before anything is built.

The folder is a closed world: the JSON names its tensor file by a plain file name of the saver's own
pattern (``share_factors-<hex>.safetensors``), never a path, so a checkpoint cannot make a load read,
or a save delete, anything else. A save deletes only files of its own naming patterns: the tensor
file it replaces, and what an interrupted earlier save left (``share_factors-*.safetensors`` that the
JSON does not name, ``.share_factors-*.safetensors.tmp``, ``.share_config.json.*.tmp``); a load reads
only the JSON and the file it names, so such leftovers never matter to it. Files are created with
the mode the umask gives new files (``0644`` under the usual ``022``), like any file the user writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import secrets
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import FactorValueError, ShareCheckpointError, ShareIOError, ShareValueError, StyleError
from .factors import ShareConfig, ShareFactors, StyleInfo, validate_style_name
from .subspace import STORE_DTYPE, LayerShare, to_fit

FORMAT_NAME = "share-diffusers"
FORMAT_VERSION = 2
CONFIG_NAME = "share_config.json"
WEIGHTS_PREFIX = "share_factors"
TENSOR_NAMES = ("basis_out", "basis_in", "core_out", "core_in", "gram_out", "gram_in", "norm", "error", "truncated")
# The bulk of a checkpoint; these may be stored in half precision. Summaries stay float32 always.
FACTOR_NAMES = ("basis_out", "basis_in", "core_out", "core_in", "anchor")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The names a save writes, and the only files it ever deletes. "weights_file" must be a name of the first
# kind: a plain file name (no separator, no "..") inside the checkpoint folder.
WEIGHTS_FILE_PATTERN = re.compile(rf"{WEIGHTS_PREFIX}-[0-9A-Za-z_-]{{1,64}}\.safetensors")
_TMP_PATTERNS = (
    re.compile(rf"\.{WEIGHTS_PREFIX}-[0-9A-Za-z_-]{{1,64}}\.safetensors\.tmp"),
    re.compile(rf"\.{re.escape(CONFIG_NAME)}\.[0-9A-Za-z_-]{{1,64}}\.tmp"),
)


def expected_shapes(n_out: int, d_in: int, k: int, p: int, t: int) -> dict[str, tuple[int, ...]]:
    """Shape of each stored tensor of a layer."""
    return {
        "basis_out": (n_out, k),
        "basis_in": (d_in, k),
        "core_out": (t, k, p),
        "core_in": (t, k, p),
        "gram_out": (k, k),
        "gram_in": (k, k),
        "norm": (t,),
        "error": (t,),
        "truncated": (t,),
        "anchor": (k, k),
    }


class UnaddressableStyleNameWarning(UserWarning):
    """A checkpoint holds a style name the style syntax cannot address (``,``, ``=``, control characters...).

    Older releases accepted such names; they still load, and :meth:`ShareFactors.rename_style` (or
    ``share-diffusers rename``) gives them a name that blends like ``name=0.5,other=0.5`` can use.
    """


def describe(factors: ShareFactors, weights_file: str, storage_dtype: torch.dtype | None = None) -> dict:
    """The JSON document of a checkpoint (``storage_dtype``: of bases and cores, default ``factors.storage_dtype``)."""
    errors = {style.name: factors.style_error(style.name) for style in factors.styles}
    storage_dtype = storage_dtype if storage_dtype is not None else factors.storage_dtype
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base_model": factors.base_model,
        "weights_file": weights_file,
        "dtype": str(storage_dtype).removeprefix("torch."),
        "config": {
            "rank": factors.config.rank,
            "variance": factors.config.variance,
            "max_rank": factors.config.max_rank,
            "pseudo_rank": factors.config.pseudo_rank,
            "center": factors.config.center,
            "normalize": factors.config.normalize,
        },
        "target_modules": sorted(factors.layers),
        "styles": [{**style.to_json(), "error": errors[style.name]} for style in factors.styles],
        "layers": {
            name: {"shape": list(layer.shape), "k": layer.k, **({"conv": True} if name in factors.conv_layers else {})}
            for name, layer in factors.layers.items()
        },
    }


def save_factors(factors: ShareFactors, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``factors`` to ``directory`` (created if needed) atomically; returns the JSON's path.

    Everything is checked before the first byte is written (style names non-empty and unique, finite
    numbers in the storage dtype), so a refused save leaves the folder as it was, and ``factors`` too:
    ``factors.storage_dtype`` becomes ``dtype`` only once the checkpoint is committed. After the commit
    the replaced tensor file and any leftovers of interrupted earlier saves (files of this module's own
    naming patterns only) are deleted. Names the style syntax cannot address, which older releases
    wrote, are saved as they are, so such a checkpoint can be loaded, renamed style by style and saved.

    Args:
        dtype: storage of bases and cores: ``torch.float32`` (exact) or ``torch.bfloat16`` /
            ``torch.float16`` (half the bytes, ~0.3% relative rounding of each factor). Defaults to
            ``factors.storage_dtype`` (float32 unless the factors were loaded from a half checkpoint).
    """
    if dtype is not None and str(dtype).removeprefix("torch.") not in STORAGE_DTYPES:
        raise ShareValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, not {dtype}")
    storage_dtype = dtype if dtype is not None else factors.storage_dtype
    _check_style_names([style.name for style in factors.styles], "cannot save", StyleError)
    as_stored = copy.copy(factors)  # the errors of the factors as the file holds them, for the JSON's summary
    as_stored.layers = {name: with_rounding_error(layer, storage_dtype) for name, layer in factors.layers.items()}
    tensors = {}
    for name, layer in as_stored.layers.items():
        for tensor_name in TENSOR_NAMES:
            stored = storage_dtype if tensor_name in FACTOR_NAMES else STORE_DTYPE
            tensors[f"{name}.{tensor_name}"] = getattr(layer, tensor_name).to(stored).contiguous()
        if layer.anchor is not None:
            tensors[f"{name}.anchor"] = layer.anchor.to(storage_dtype).contiguous()
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            hint = "; save in float32" if tensor.dtype != STORE_DTYPE else ""
            raise FactorValueError(f"cannot save: tensor {key!r} holds NaN or Inf in {tensor.dtype}{hint}")
    directory = Path(directory)
    weights_file = f"{WEIGHTS_PREFIX}-{secrets.token_hex(4)}.safetensors"
    document = describe(as_stored, weights_file, storage_dtype)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ShareIOError(
            f"cannot save the checkpoint: cannot create {directory} ({error.strerror or error})"
        ) from None
    with _folder_lock(directory):  # saves into one folder take turns: the cleanup must not race a commit
        _refuse_lost_update(factors, directory)
        _write(directory, tensors, document, weights_file)
        factors.storage_dtype = storage_dtype  # committed: the factors now mirror what is on disk
        factors.checkpoint_version = (directory.resolve(), weights_file)
        _remove_leftovers(directory)
    return directory / CONFIG_NAME


def with_rounding_error(layer: LayerShare, storage_dtype: torch.dtype) -> LayerShare:
    """``layer`` whose per-style ``error`` also counts what rounding its factors to ``storage_dtype`` moves each
    style: ``error + ||R' - R|| / norm`` (the triangle inequality, so an upper bound, as the stored error is after
    a merge), ``R' `` the reconstruction from the rounded file both as the layer applies it (its bases as read,
    orthonormal only to their rounding) and as a merge starts from it (the bases re-orthonormalised,
    :func:`~.subspace.to_fit`), whichever moved more. ``layer`` itself when the rounding changes nothing
    (float32, or factors read from such a file).

    ``||R' - R||^2 = <C', G'_out C' G'_in> + <C, G_out C G_in> - 2 <C', (B'_out.T B_out) C (B_in.T B'_in)>`` in
    float64, from ``k x k`` products once the bases' ``n x k`` ones are made.
    """
    rounded = {
        name: getattr(layer, name).to(storage_dtype).to(getattr(layer, name).dtype)
        for name in FACTOR_NAMES
        if getattr(layer, name) is not None
    }
    if layer.k == 0 or all(torch.equal(tensor, getattr(layer, name)) for name, tensor in rounded.items()):
        return layer
    as_read = dataclasses.replace(layer, **rounded)
    before = _as_float64(layer)
    moved = torch.maximum(_moved(before, _as_float64(as_read)), _moved(before, _as_float64(to_fit(as_read))))
    norm = layer.norm.to(torch.float64)
    relative = torch.where(norm > 0, moved.sqrt() / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return dataclasses.replace(layer, error=(layer.error.to(torch.float64) + relative).to(layer.error.dtype))


def _as_float64(layer: LayerShare) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(basis_out, cores (t, k, k), basis_in)`` in float64, as they are (no re-orthonormalisation)."""
    return layer.basis_out.to(torch.float64), layer.cores().to(torch.float64), layer.basis_in.to(torch.float64)


def _moved(before, after) -> torch.Tensor:
    """``||R'_i - R_i||^2`` per style, ``(t,)``, from ``(basis_out, cores, basis_in)`` of each (float64)."""
    (out, cores, inn), (out_r, cores_r, inn_r) = before, after

    def energy(cores: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return (cores * ((left.T @ left) @ cores @ (right.T @ right))).sum(dim=(1, 2))

    cross = (cores_r * ((out_r.T @ out) @ cores @ (inn.T @ inn_r))).sum(dim=(1, 2))
    return (energy(cores, out, inn) + energy(cores_r, out_r, inn_r) - 2 * cross).clamp_min(0)


def _refuse_lost_update(factors: ShareFactors, directory: Path) -> None:
    """Two edits of one checkpoint at once (two ``share-diffusers merge`` of one folder): each loads, edits and
    saves, and the second save would silently drop the first edit. A save into the folder the factors came from
    goes ahead only if that folder still holds the checkpoint they came from."""
    if factors.checkpoint_version is None:
        return
    folder, loaded = factors.checkpoint_version
    current = _current_weights_file(directory)
    if folder == directory.resolve() and current is not None and current != loaded:
        raise ShareIOError(
            f"cannot save the checkpoint to {directory}: another save changed it after these factors were loaded "
            f"from it (its tensor file is now {current}, was {loaded}); load it again and redo the change. The "
            "checkpoint on disk is unchanged"
        )


def _write(directory: Path, tensors: dict[str, torch.Tensor], document: dict, weights_file: str) -> None:
    """Tensor file under its new name, then the JSON (the commit); on failure nothing of it stays."""
    tmp_weights = directory / f".{weights_file}.tmp"
    try:
        mode = create_empty_file(tmp_weights)
        save_file(tensors, str(tmp_weights), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
        set_file_mode(tmp_weights, mode)  # safetensors writes 0600 through a temporary file of its own
        _fsync(tmp_weights)
        os.replace(tmp_weights, directory / weights_file)
        _atomic_write_text(directory / CONFIG_NAME, json.dumps(document, indent=2))
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp_weights.unlink(missing_ok=True)
        if _current_weights_file(directory) != weights_file:
            with contextlib.suppress(OSError):
                (directory / weights_file).unlink(missing_ok=True)
        # A full disk while safetensors writes is its SafetensorError, not an OSError.
        if isinstance(error, (OSError, SafetensorError)):  # the previous checkpoint is intact: say so in one line
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise ShareIOError(
                f"cannot save the checkpoint to {directory} ({reason}); the previous one is unchanged"
            ) from None
        raise


@contextlib.contextmanager
def _folder_lock(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself (POSIX; no lock file is left behind), held for one save."""
    try:
        import fcntl
    except ImportError:  # Windows: saves are not serialised
        yield
        return
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        yield  # a folder that cannot be opened for reading: write without the lock
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _remove_leftovers(directory: str | os.PathLike) -> list[str]:
    """Delete the files of a checkpoint folder that a save of ours wrote but the JSON does not use.

    That is tensor files ``share_factors-*.safetensors`` other than the one ``share_config.json``
    names, and the temporary files of interrupted saves. Files of any other name are never touched.
    Without a readable JSON nothing is deleted (the tensor file in use cannot be told apart). Returns
    the names deleted. :func:`save_factors` calls it under its folder lock, so it never removes the files
    of a save in progress in another thread or process.
    """
    directory = Path(directory)
    current = _current_weights_file(directory)
    if current is None:
        return []
    removed = []
    for path in directory.iterdir():
        name = path.name
        ours = (WEIGHTS_FILE_PATTERN.fullmatch(name) and name != current) or any(
            pattern.fullmatch(name) for pattern in _TMP_PATTERNS
        )
        if ours and (path.is_symlink() or path.is_file()):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                continue  # the checkpoint is committed; a leftover that cannot go now goes on a later save
            removed.append(name)
    return sorted(removed)


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The files a checkpoint consists of: ``share_config.json`` and the tensor file it names.

    Leftovers of interrupted saves and unrelated files in the folder are not part of it (use this to
    report a checkpoint's size). The JSON is validated as :func:`read_document` does.
    """
    directory = Path(directory)
    document = read_document(directory / CONFIG_NAME)
    return [directory / CONFIG_NAME, directory / document["weights_file"]]


def create_empty_file(path: Path) -> int:
    """Create ``path`` empty (it must not exist) with the default mode for new files; returns that mode."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
    try:
        return os.fstat(handle).st_mode & 0o777
    finally:
        os.close(handle)


def set_file_mode(path: Path, mode: int) -> None:
    """``chmod`` where modes are permissions (POSIX)."""
    if os.name == "posix":  # on Windows a mode is not a permission
        os.chmod(path, mode)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # not mkstemp: that makes it 0600
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _current_weights_file(directory: Path) -> str | None:
    """The tensor file the folder's JSON names, if the JSON is readable and the name is one a save of ours wrote."""
    try:
        name = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")).get("weights_file")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and WEIGHTS_FILE_PATTERN.fullmatch(name) else None


# -- reading ------------------------------------------------------------------------------------

_CONFIG_FIELDS = {
    "rank": (int, True),
    "variance": (float, True),
    "max_rank": (int, False),
    "pseudo_rank": (int, False),
    "center": (bool, False),
    "normalize": (bool, False),
}
_STYLE_FIELDS = {"name": str, "source": dict, "rank": int, "num_parameters": int, "source_bytes": int}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_style_names(names: list[str], where: str, error_type: type[Exception] = ShareCheckpointError) -> None:
    """Every name a non-empty string, no two equal.

    Only that: older releases wrote names the style syntax cannot address (``"ghibli, watercolor"``), and
    those checkpoints must still load and save (to be renamed). New names get the full rule of
    :func:`validate_style_name` where they are made (fit, merge, rename).
    """
    taken: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise error_type(f"{where}: style name must be a non-empty string, got {name!r}")
        if name in taken:
            raise error_type(f"{where}: a style named {name!r} already exists; pick another name or delete it first")
        taken.add(name)


def _warn_unaddressable_names(names: list[str], config_path: Path) -> None:
    """One warning per name a new style could not get, saying how to rename it."""
    for name in names:
        try:
            validate_style_name(name, [])
        except StyleError as error:
            command = f"share-diffusers rename {shlex.quote(str(config_path.parent))} {shlex.quote(name)} NEW_NAME"
            warnings.warn(
                f"{config_path}: {error}. The style loads, and Python code can select it by this name, but blends "
                f"and the command line cannot. Rename it: {command} (or in Python factors.rename_style({name!r}, "
                "'NEW_NAME') or pipe.rename_style, then save the checkpoint)",
                UnaddressableStyleNameWarning,
                stacklevel=3,
            )


def read_document(config_path: str | os.PathLike) -> dict:
    """Parse and check a checkpoint's JSON: format name and version, and every field's type and range.

    Raises :class:`ShareCheckpointError` naming the file and the field at fault.
    """
    config_path = Path(config_path)
    if not config_path.is_file():
        raise ShareCheckpointError(f"no Share checkpoint at {config_path.parent}: {CONFIG_NAME} is missing")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # not UTF-8 JSON, a number past 4300 digits, nested too deep
        raise ShareCheckpointError(f"{config_path} is not valid JSON ({str(error)[:200]})") from None
    except OSError as error:
        raise ShareCheckpointError(f"{config_path} cannot be read ({error.strerror or error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ShareCheckpointError(f'{config_path} is not a share-diffusers checkpoint (no "format": "{FORMAT_NAME}")')
    version = document.get("format_version")
    if not _is_int(version) or version < 1:
        raise ShareCheckpointError(f"{config_path} has an unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ShareCheckpointError(
            f"{config_path} has format_version {version}, newer than this share-diffusers reads "
            f"({FORMAT_VERSION}); upgrade share-diffusers"
        )
    for key in ("weights_file", "config", "styles", "layers"):
        if key not in document:
            raise ShareCheckpointError(f"{config_path} lacks the required field {key!r}")
    _check_fields(document, config_path)
    return document


def _check_fields(document: dict, config_path: Path) -> None:
    """Every field's type and range; the messages name the field (``styles[1].rank``, ``layers['x'].k``)."""

    def fail(field: str, expected: str, value: object) -> ShareCheckpointError:
        shown = repr(value) if len(repr(value)) <= 60 else f"a {_type_name(value)}"
        return ShareCheckpointError(f"{config_path}: field {field!r} must be {expected}, got {shown}")

    weights_file = document["weights_file"]
    if not isinstance(weights_file, str) or not WEIGHTS_FILE_PATTERN.fullmatch(weights_file):
        raise fail(
            "weights_file", f"a plain file name like '{WEIGHTS_PREFIX}-<hex>.safetensors' (never a path)", weights_file
        )
    if document.get("base_model") is not None and not isinstance(document["base_model"], str):
        raise fail("base_model", "a string or null", document["base_model"])
    dtype = document.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:  # a list or dict is unhashable: check the type first
        raise fail("dtype", f"one of {', '.join(STORAGE_DTYPES)}", dtype)
    targets = document.get("target_modules", [])
    if not isinstance(targets, list) or not all(isinstance(name, str) for name in targets):
        raise fail("target_modules", "a list of layer names", targets)

    config = document["config"]
    if not isinstance(config, dict):
        raise fail("config", "an object", config)
    for key, value in config.items():
        if key not in _CONFIG_FIELDS:
            raise ShareCheckpointError(f"{config_path}: unknown field 'config.{key}'")
        kind, nullable = _CONFIG_FIELDS[key]
        if value is None and nullable:
            continue
        valid = isinstance(value, bool) if kind is bool else _is_int(value) if kind is int else _is_number(value)
        if not valid:
            raise fail(f"config.{key}", ("a " if kind is not int else "an ") + kind.__name__, value)
    try:
        ShareConfig(**config)
    except (TypeError, ValueError) as error:
        raise ShareCheckpointError(f"{config_path}: invalid 'config' ({error})") from None

    styles = document["styles"]
    if not isinstance(styles, list):
        raise fail("styles", "a list", styles)
    for index, style in enumerate(styles):
        if not isinstance(style, dict):
            raise fail(f"styles[{index}]", "an object", style)
        if "name" not in style:
            raise ShareCheckpointError(f"{config_path}: styles[{index}] has no 'name'")
        for key, value in style.items():
            if key == "error":
                if not (_is_number(value) and value >= 0):
                    raise fail(f"styles[{index}].error", "a non-negative number", value)
                continue
            kind = _STYLE_FIELDS.get(key)
            if kind is None:
                raise ShareCheckpointError(f"{config_path}: unknown field 'styles[{index}].{key}'")
            valid = _is_int(value) and value >= 0 if kind is int else isinstance(value, kind)
            if not valid:
                expected = {int: "a non-negative integer", str: "a string", dict: "an object"}[kind]
                raise fail(f"styles[{index}].{key}", expected, value)
    # Older releases accepted any name; those still load (load_factors warns about the ones to rename).
    _check_style_names([style["name"] for style in styles], f"{config_path}: styles")

    layers = document["layers"]
    if not isinstance(layers, dict):
        raise fail("layers", "an object", layers)
    for name, info in layers.items():
        field = f"layers[{name!r}]"
        if not name or not isinstance(info, dict):
            raise fail(field, 'an object with "shape" and "k"', info)
        unknown = set(info) - {"shape", "k", "conv"}
        if unknown:
            raise ShareCheckpointError(f"{config_path}: unknown field '{field}.{sorted(unknown)[0]}'")
        shape, k = info.get("shape"), info.get("k")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(n) and n >= 1 for n in shape)):
            raise fail(f"{field}.shape", "[n_out, d_in] (positive integers)", shape)
        if not (_is_int(k) and 0 <= k <= min(shape)):
            raise fail(f"{field}.k", f"an integer from 0 to {min(shape)}", k)
        if not isinstance(info.get("conv", False), bool):
            raise fail(f"{field}.conv", "true or false", info["conv"])


def load_factors(
    directory: str | os.PathLike, base_model: str | None = None, weights_path: str | os.PathLike | None = None
) -> ShareFactors:
    """Read a checkpoint folder, validating everything before returning.

    Args:
        directory: the folder holding ``share_config.json``.
        base_model: if given and the checkpoint records a different base model, refuse it.
        weights_path: the tensor file, when it was fetched elsewhere (Hub cache); defaults to the
            file the JSON names inside ``directory``.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    document = read_document(config_path)
    _warn_unaddressable_names([style["name"] for style in document["styles"]], config_path)
    recorded = document.get("base_model")
    if base_model is not None and recorded is not None and recorded != base_model:
        raise ShareCheckpointError(
            f"{config_path} holds factors for base model {recorded!r}, not {base_model!r}; "
            "load factors made for this model"
        )
    weights_path = Path(weights_path) if weights_path is not None else directory / document["weights_file"]
    if not weights_path.is_file():
        raise ShareCheckpointError(f"{config_path} names the tensor file {weights_path.name}, which is missing")
    config = ShareConfig(**document["config"])
    styles = [
        StyleInfo(**{key: value for key, value in style.items() if key != "error"}) for style in document["styles"]
    ]
    storage_dtype = STORAGE_DTYPES[document.get("dtype", "float32")]
    tensors = _read_tensors(weights_path)
    t, p = len(styles), config.pseudo_rank
    layers = {}
    for name, info in document["layers"].items():
        (n_out, d_in), k = info["shape"], info["k"]
        shapes = expected_shapes(n_out, d_in, k, p, t)
        needed = [*TENSOR_NAMES, "anchor"] if config.center else list(TENSOR_NAMES)
        if document["format_version"] == 1:  # written before the summaries left out the rank-p cuts' energy
            needed.remove("truncated")
        values = {}
        for tensor_name in needed:
            key = f"{name}.{tensor_name}"
            if key not in tensors:
                raise ShareCheckpointError(f"{weights_path.name}: tensor {key!r} is missing")
            tensor = tensors.pop(key)
            if tuple(tensor.shape) != shapes[tensor_name]:
                raise ShareCheckpointError(
                    f"{weights_path.name}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                    f"{shapes[tensor_name]} (k={k}, p={p}, {t} styles)"
                )
            if not tensor.is_floating_point():
                raise ShareCheckpointError(f"{weights_path.name}: tensor {key!r} has dtype {tensor.dtype}, not float")
            if tensor_name in FACTOR_NAMES and tensor.dtype != storage_dtype:
                # A later save writes the document's dtype: loading on would change the numbers unannounced.
                raise ShareCheckpointError(
                    f"{weights_path.name}: tensor {key!r} has dtype {tensor.dtype}, but {CONFIG_NAME} says the "
                    f"bases and cores are stored in {document.get('dtype', 'float32')}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ShareCheckpointError(f"{weights_path.name}: tensor {key!r} contains NaN or Inf")
            if tensor_name in ("norm", "error") and bool((tensor < 0).any()):
                raise ShareCheckpointError(f"{weights_path.name}: tensor {key!r} holds a negative value")
            values[tensor_name] = tensor.to(STORE_DTYPE)
        anchor = values.pop("anchor", None)
        values.setdefault("truncated", torch.zeros(t, dtype=STORE_DTYPE))
        layers[name] = LayerShare(**values, anchor=anchor, normalize=config.normalize)
    if tensors:
        raise ShareCheckpointError(
            f"{weights_path.name}: unexpected tensor {next(iter(tensors))!r} not described in {CONFIG_NAME}"
        )
    conv_layers = {name for name, info in document["layers"].items() if info.get("conv")}
    factors = ShareFactors(config, layers, styles, base_model=recorded, conv_layers=conv_layers)
    factors.storage_dtype = storage_dtype
    if weights_path == directory / document["weights_file"]:
        factors.checkpoint_version = (directory.resolve(), document["weights_file"])
    return factors


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ShareCheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
        ) from None
