"""Fetching LoRA files and Share checkpoints from the Hugging Face Hub (or local paths), and pushing.

Every download goes through ``huggingface_hub`` (cache, revisions, tokens, offline mode); its
errors are turned into one-line messages that say which repo, file or revision was wrong.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from huggingface_hub import (
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import _CACHED_NO_EXIST
from huggingface_hub.utils import validate_repo_id

from .core.checkpoint import CONFIG_NAME, read_document, save_factors
from .core.errors import ShareError
from .core.factors import ShareFactors
from .lora_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PICKLE_SUFFIXES, adapter_config_beside, refuse_pickle


class HubError(ShareError, OSError):
    """A repo, revision or file could not be fetched from the Hub (or the local cache)."""


class HubFileTooLargeError(HubError):
    """A Hub file is larger than the caller allows (``max_bytes``); nothing was downloaded."""


def _hub_call(function, repo_id: str, what: str, **kwargs):
    """Run a ``huggingface_hub`` call, translating its errors into :class:`HubError` with context."""
    try:
        return function(repo_id=repo_id, **kwargs)
    except Exception as error:
        translated = hub_error_for(error, repo_id, what, kwargs.get("revision"))
        if translated is None:
            raise
        raise translated from None


def hub_error_for(error: BaseException, repo_id: str, what: str, revision: str | None = None) -> HubError | None:
    """The :class:`HubError` that a ``huggingface_hub`` call for ``what`` of ``repo_id`` failing with ``error``
    means (gated, no such repo, revision or file, offline, refused, no connection); None for any other error."""
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(error, GatedRepoError):  # before RepositoryNotFoundError: a subclass of it
        return HubError(f"{repo_id} is gated: accept its terms on the Hub and pass a token")
    if isinstance(error, RepositoryNotFoundError):
        return HubError(f"no Hub repo {repo_id!r} (or it is private: pass token=...)")
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {revision!r}")
    if isinstance(error, LocalEntryNotFoundError | OfflineModeIsEnabled):  # before EntryNotFoundError: a subclass
        if isinstance(error.__cause__, HfHubHTTPError):
            # The Hub answered (403 without access, 429, 5xx) and no copy is cached: what it said, not "offline".
            return HubError(f"the Hub refused {what} of {repo_id}{at}: {_one_line(error.__cause__)}")
        return HubError(
            f"{what} of {repo_id}{at} is not in the local cache and downloading is off or failed (offline mode, "
            "local_files_only=True, or no connection to the Hub); connect once or point at a local folder"
        )
    if isinstance(error, EntryNotFoundError):
        return HubError(f"{repo_id}{at} has no file {what}")
    if isinstance(error, HfHubHTTPError):
        return HubError(f"the Hub refused {what} of {repo_id}{at}: {_one_line(error)}")
    if isinstance(error, HFValidationError):
        return HubError(f"{repo_id!r} is not a valid Hub repo id ({_one_line(error)})")
    # Network failures: OSError, or the HTTP client's own errors (httpx / httpx2 / requests, by version).
    if isinstance(error, OSError) or type(error).__module__.split(".")[0] in _HTTP_CLIENTS:
        return HubError(
            f"could not reach the Hub for {what} of {repo_id}{at} ({type(error).__name__}: {_one_line(error)})"
        )
    return None


@contextlib.contextmanager
def pipeline_hub_errors(model: str) -> Iterator[None]:
    """Re-raise diffusers' ``from_pretrained`` error for a Hub ``model`` it could not fetch as the :class:`HubError`
    of its cause. diffusers says "... not fully cached locally ... Please check out the root cause in the
    stacktrace above" whatever the cause; the cause (no connection, no such repo, gated, offline) is chained under
    it, where no one-line error shows it. Other errors pass unchanged."""
    try:
        yield
    except OSError as error:
        if error.__cause__ is None or "stacktrace above" not in str(error):
            raise
        translated = hub_error_for(error.__cause__, model, "the pipeline")
        if translated is None:
            raise
        raise translated from None


_HTTP_CLIENTS = ("httpx", "httpx2", "requests", "urllib3", "httpcore")


def _mib(size: int) -> str:
    """Bytes in MiB as people read them: ``812.3``, ``0.01``."""
    mib = size / 2**20
    return f"{mib:.1f}" if mib >= 1 else f"{mib:.2g}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def download(
    repo_id: str,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """One file of a Hub repo, through the cache."""
    return Path(
        _hub_call(
            hf_hub_download,
            repo_id,
            repr(f"{subfolder}/{filename}" if subfolder else filename),
            filename=filename,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
        )
    )


def check_size(
    repo_id: str,
    filename: str,
    max_bytes: int,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    missing_ok: bool = False,
) -> None:
    """Refuse a Hub file over ``max_bytes`` (:class:`HubFileTooLargeError`) before it is downloaded.

    The size comes from a HEAD request; offline, or when the Hub cannot be reached, from the cached copy (with
    neither, the Hub's error is raised). ``missing_ok``: a file the repo does not have passes.
    """
    path = f"{subfolder}/{filename}" if subfolder else filename

    def head(repo_id: str, revision: str | None):
        url = hf_hub_url(repo_id, filename, subfolder=subfolder, revision=revision)
        try:
            return get_hf_file_metadata(url, token=token).size
        except EntryNotFoundError as error:
            if missing_ok and not isinstance(error, LocalEntryNotFoundError):
                return None
            raise

    try:
        size = _hub_call(head, repo_id, repr(path), revision=revision)
    except HubError:
        cached = try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=revision)
        if cached is _CACHED_NO_EXIST and missing_ok:  # an earlier download found the repo has no such file
            return
        if not isinstance(cached, str):
            raise
        size = os.path.getsize(cached)
    _refuse_over(size, max_bytes, f"{repo_id}: {path}")


def _refuse_over(size: int | None, max_bytes: int, what: str) -> None:
    if size is not None and size > max_bytes:
        raise HubFileTooLargeError(f"{what} is {_mib(size)} MiB, over the limit of {_mib(max_bytes)} MiB")


def list_safetensors(
    repo_id: str, *, subfolder: str | None = None, revision: str | None = None, token: str | bool | None = None
) -> list[str]:
    """``.safetensors`` files of a Hub repo (under ``subfolder``), relative to it."""
    info = _hub_call(HfApi().model_info, repo_id, "the file list", revision=revision, token=token)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    names = [s.rfilename for s in info.siblings or [] if s.rfilename.startswith(prefix)]
    return [name.removeprefix(prefix) for name in names if name.endswith(".safetensors")]


def resolve_lora_file(
    repo_id_or_path: str | os.PathLike,
    weight_name: str | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
    max_bytes: int | None = None,
) -> tuple[Path, dict]:
    """The local path of a LoRA ``.safetensors`` file and its provenance.

    Args:
        repo_id_or_path: a local file, a local folder, or a Hub repo id (``user/name``).
        weight_name: the file inside the folder or repo; needed when it holds several ``.safetensors``.
        max_bytes: a Hub file larger than this is refused (:class:`HubFileTooLargeError`) before it is
            downloaded (a server or studio taking Hub ids from visitors; see :func:`check_size`); local
            files are not limited.

    Pickle files are refused by name before anything is downloaded or opened.
    """
    if weight_name is not None:
        refuse_pickle(Path(weight_name))
    path = Path(repo_id_or_path)
    if path.is_file():
        refuse_pickle(path)
        return path, {"path": str(path)}
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise HubError(f"{path} has no subfolder {subfolder!r}")
        if weight_name is None:
            candidates = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_name = _pick_weight(candidates, str(folder), [p.name for p in folder.iterdir()])
        file = folder / weight_name
        if not file.is_file():
            raise HubError(f"{folder} has no file {weight_name!r}")
        return file, {"path": str(file)}
    repo_id = str(repo_id_or_path)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise HubError(f"{repo_id!r} is neither an existing file or folder nor a Hub repo id like 'user/name'")
    if repo_id.lower().endswith(".safetensors"):  # 'loras/typo.safetensors': a path mistyped, not a repository
        raise HubError(f"no such file: {repo_id} (a Hub repo id names a repository; give a file in one as weight_name)")
    if weight_name is None:
        if local_files_only:
            raise HubError(f"pass weight_name=... to load {repo_id} from the cache without listing the repo")
        if constants.HF_HUB_OFFLINE:  # whether or not its files are cached: the list comes from the Hub only
            raise HubError(
                f"the file list of {repo_id} is not in the local cache and huggingface_hub's offline mode "
                "(HF_HUB_OFFLINE=1) is on; pass weight_name=... to load a file of it from the cache"
            )
        candidates = list_safetensors(repo_id, subfolder=subfolder, revision=revision, token=token)
        weight_name = _pick_weight(candidates, repo_id, candidates)
    if max_bytes is not None and not local_files_only:
        check_size(
            repo_id, weight_name, max_bytes, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir
        )
    file = download(
        repo_id,
        weight_name,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    if max_bytes is not None:  # a push between the check and the download: the file fetched is measured too
        _refuse_over(file.stat().st_size, max_bytes, f"{repo_id}: {weight_name}")
    source = {"repo_id": repo_id, "weight_name": weight_name, "revision": revision or "main"}
    commit = snapshot_commit(file)
    if commit is not None:  # what was downloaded: a branch or tag moves on, the commit does not
        source["commit"] = commit
    if subfolder:
        source["subfolder"] = subfolder
    return file, source


_COMMIT = re.compile(r"[0-9a-f]{40}")


def snapshot_commit(path: str | os.PathLike) -> str | None:
    """The commit a file of the ``huggingface_hub`` cache was downloaded at, or None for other paths.

    The cache keeps every file under ``.../snapshots/<commit sha>/<path in repo>`` (``hf_hub_download``'s
    return value), whatever branch or tag was asked for.
    """
    parts = Path(path).parts
    for index in range(len(parts) - 2, 0, -1):
        if parts[index - 1] == "snapshots" and _COMMIT.fullmatch(parts[index]):
            return parts[index]
    return None


def _pick_weight(candidates: list[str], where: str, everything: list[str]) -> str:
    preferred = [
        name for name in candidates if name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
    ]
    if len(candidates) == 1:
        return candidates[0]
    if len(preferred) == 1:
        return preferred[0]
    if not candidates:
        pickled = [name for name in everything if name.endswith(PICKLE_SUFFIXES)]
        if pickled:
            refuse_pickle(Path(pickled[0]))
        raise HubError(f"{where} has no .safetensors file")
    raise HubError(f"{where} holds several .safetensors files ({', '.join(candidates)}); pass weight_name=...")


def resolve_share_factors(
    repo_id_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
) -> tuple[Path, Path | None]:
    """``(folder with share_config.json, tensor file or None for the one the JSON names there)``."""
    path = Path(repo_id_or_path)
    if path.is_dir():
        return (path / subfolder if subfolder else path), None
    repo_id = str(repo_id_or_path)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise HubError(f"{repo_id!r} is neither a local Share checkpoint folder nor a Hub repo id like 'user/name'")
    hub = dict(
        subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    config_path = download(repo_id, CONFIG_NAME, **hub)
    document = read_document(config_path)
    # The tensor file of the same commit as the JSON, even if the branch moves between the two downloads.
    hub["revision"] = snapshot_commit(config_path) or revision
    weights_path = download(repo_id, document["weights_file"], **hub)
    return config_path.parent, weights_path


def model_card(factors: ShareFactors, repo_id: str) -> ModelCard:
    """A model card listing the styles, their sources, k, p and reconstruction errors.

    The metadata names ``base_model`` only when the factors record a Hub repo id (not a local folder);
    sources show file names, not local paths (:func:`public_factors`); style names are escaped for the
    table and written as Python string literals in the code snippet.
    """
    config = factors.config
    rank = f"k = {config.rank}" if config.rank is not None else f"k by explained variance {config.variance}"
    rows = "\n".join(
        f"| {_table_cell(style.name)} | {_table_cell(_source_text(_public_source(style.source)))} | {style.rank} "
        f"| {factors.style_error(style.name):.2e} |"
        for style in factors.styles
    )
    base = hub_model_id(factors.base_model)
    data = ModelCardData(
        library_name="share-diffusers", base_model=base, tags=["share-diffusers", "lora", "text-to-image"]
    )
    base_text = f"`{base}`" if base else "a Flux model (no Hub id of it recorded)"
    load_base = (
        f"pipe = ShareFluxPipeline.from_pretrained({_python_string(base)})"
        if base
        else 'pipe = ShareFluxPipeline.from_pretrained("FLUX_MODEL_ID")  # the Flux model the styles were made for'
    )
    style = _python_string(factors.style_names[0] if factors.styles else "STYLE")
    content = f"""---
{data.to_yaml()}
---

# {repo_id}

Share factors for {base_text}: {len(factors.styles)} styles in one shared low-rank subspace per layer
({rank}, pseudo-rank p = {config.pseudo_rank}, {len(factors.layers)} layers).

```python
from share_diffusers import ShareFluxPipeline
{load_base}
pipe.load_share_factors({_python_string(repo_id)})
image = pipe("a castle", style={style}).images[0]
```

| style | source | LoRA rank | relative error of dW |
| --- | --- | --- | --- |
{rows}
"""
    return ModelCard(content)


def hub_model_id(model: str | None) -> str | None:
    """``model`` if it is a Hub repo id (``validate_repo_id``) and not an existing local path; else None."""
    if not model:
        return None
    try:
        validate_repo_id(model)
    except HFValidationError:
        return None
    return None if Path(model).expanduser().exists() else model


def _python_string(text: str) -> str:
    """``text`` as a double-quoted Python string literal (quotes, backslashes, newlines escaped)."""
    return json.dumps(text, ensure_ascii=False)


def _table_cell(text: str) -> str:
    """``text`` as one Markdown table cell: line breaks and control characters as spaces; ``|``, backticks,
    ``*``, ``_``, ``~``, brackets, ``<``, ``>``, ``&`` and backslashes escaped (a name cannot end the cell, open
    code, emphasis, strikethrough, a link or image, HTML or a character reference)."""
    text = "".join(" " if unicodedata.category(char) in ("Cc", "Zl", "Zp") else char for char in text)
    return re.sub(r"([\\`*_~\[\]|<>&])", r"\\\1", text)


def _source_text(source: dict) -> str:
    if "repo_id" in source:
        commit = f", commit {source['commit'][:10]}" if isinstance(source.get("commit"), str) else ""
        return f"{source['repo_id']} ({source.get('weight_name', '')}@{source.get('revision', 'main')}{commit})"
    return source.get("path") or source.get("trained_from") or "-"


_PATH_KEYS = ("path", "trained_from")  # provenance fields that hold a local file or folder


def _file_name(path: str) -> str:
    """The last part of a POSIX or Windows path."""
    return PureWindowsPath(PurePosixPath(path).name).name


def _public_source(source: dict) -> dict:
    """Provenance fit to publish: local paths reduced to their file names (nested records too).

    ``base_model`` (a PEFT adapter's ``base_model_name_or_path``) stays when it is a Hub repo id.
    """
    public = {}
    for key, value in source.items():
        if isinstance(value, dict):
            value = _public_source(value)
        elif isinstance(value, str) and key in _PATH_KEYS:
            value = _file_name(value)
        elif isinstance(value, str) and key == "base_model":
            value = hub_model_id(value) or _file_name(value)
        public[key] = value
    return public


def public_factors(factors: ShareFactors) -> ShareFactors:
    """A copy of ``factors`` to publish: the base model only if a Hub repo id, sources without local paths.

    The layers are shared with ``factors``, not copied; ``factors`` itself is unchanged.
    """
    public = copy.copy(factors)  # a shallow copy: whatever else the factors hold comes along as it is
    public.styles = [dataclasses.replace(style, source=_public_source(style.source)) for style in factors.styles]
    public.base_model = hub_model_id(factors.base_model)
    return public


def push_share_factors(
    factors: ShareFactors,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Create (or reuse) a Hub repo and upload the checkpoint with its model card; returns the commit URL.

    What is uploaded is :func:`public_factors`: no local paths (a local base model folder is left out,
    LoRA sources keep their file names); the local checkpoint is not changed.

    Args:
        private: make a new repo private.
        token: as ``huggingface_hub`` takes it (default: the saved login).
        commit_message: default ``"Share factors: N styles"``.
        revision: the branch to commit to (created from the default branch if missing); default the main branch.
        create_pr: open a pull request with the upload instead of committing (to ``revision`` if given); the
            pull request's URL is returned.
    """
    check_online_for_upload(repo_id)
    api = HfApi(token=token)
    _hub_call(api.create_repo, repo_id, "the repo", private=private, exist_ok=True)
    if revision is not None and not revision.startswith("refs/pr/"):  # as transformers' push_to_hub does
        _hub_call(api.create_branch, repo_id, f"the branch {revision!r}", branch=revision, exist_ok=True)
    public = public_factors(factors)
    with tempfile.TemporaryDirectory() as folder:
        save_factors(public, folder)
        model_card(public, repo_id).save(os.path.join(folder, "README.md"))
        commit = _hub_call(
            api.upload_folder,
            repo_id,
            "the upload",
            folder_path=folder,
            commit_message=commit_message or f"Share factors: {len(factors.styles)} styles",
            delete_patterns=["share_factors-*.safetensors"],
            revision=revision,
            create_pr=create_pr,
        )
    url = getattr(commit, "pr_url", None) if create_pr else None
    return str(url or getattr(commit, "commit_url", commit))


def check_online_for_upload(repo_id: str) -> None:
    """Refuse an upload under ``huggingface_hub``'s offline mode (``HF_HUB_OFFLINE=1``), whose error spoke of
    downloads and the local cache; a trainer calls it before training.

    Raises:
        HubError: naming the repo and the variable.
    """
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push to {repo_id}: huggingface_hub's offline mode is on (HF_HUB_OFFLINE=1); unset it")


def peft_adapter_config_path(path: Path, source: dict, hub: dict | None = None) -> Path | None:
    """Where the ``adapter_config.json`` of PEFT adapter weights is: beside the local file, or downloaded from the
    same Hub repo (``source`` is :func:`~share_diffusers.hub.resolve_lora_file`'s provenance; ``hub`` its
    download options: token, local_files_only...).

    None when there is none (the weights are then refused unless they carry ``.alpha`` tensors: PEFT keeps
    ``lora_alpha`` only in that config).
    """
    if "repo_id" not in source:
        return adapter_config_beside(path)
    if PurePosixPath(source["weight_name"]).name != ADAPTER_WEIGHTS_NAME:
        return None
    name = str(PurePosixPath(source["weight_name"]).with_name(ADAPTER_CONFIG_NAME))
    revision = source.get("commit", source.get("revision"))  # the weights' own commit
    return _download_if_present(
        source["repo_id"], name, subfolder=source.get("subfolder"), revision=revision, **(hub or {})
    )


def _download_if_present(repo_id: str, filename: str, *, subfolder: str | None, **kwargs) -> Path | None:
    """One file of a Hub repo through the cache; None when the repo has no such file.

    Any other failure (offline without the file cached, no such revision, no connection) raises
    ``hub``'s one-line :class:`~share_diffusers.hub.HubError`: a config that exists but could not be
    fetched must not be taken for a missing one.
    """

    def fetch(**call):
        try:
            return hf_hub_download(**call)
        except EntryNotFoundError as error:
            if isinstance(error, LocalEntryNotFoundError):  # not in the cache, and not looked up on the Hub
                raise
            return None

    path = f"{subfolder}/{filename}" if subfolder else filename
    what = repr(path)
    kwargs["local_files_only"] = bool(kwargs.get("local_files_only"))
    if kwargs["local_files_only"]:
        # An earlier download that found no such file left a note of it in the cache: absent, not uncached.
        cached = try_to_load_from_cache(
            repo_id, path, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
        )
        if cached is _CACHED_NO_EXIST:
            return None
    found = _hub_call(fetch, repo_id, what, filename=filename, subfolder=subfolder, **kwargs)
    return Path(found) if found is not None else None
