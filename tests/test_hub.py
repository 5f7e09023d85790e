"""The Hub code path (huggingface_hub against a local stand-in server): download, revision, subfolder, errors."""

from __future__ import annotations

import ast
import hashlib
import json
import re

import pytest
import torch
from flux_helpers import generate, write_diffusers_lora
from hub_server import recording_api
from huggingface_hub import ModelCard, constants

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers import hub as hub_module
from share_diffusers.core import LoraFormatError, load_factors
from share_diffusers.hub import HubError, model_card
from share_diffusers.tiny_flux import build_tiny_flux_pipeline, save_tiny_flux_pipeline


@pytest.fixture(scope="module")
def hub(fake_hub):
    """The local Hub, serving commits as the Hub does: a branch's commit hashes its files, so a push moves it,
    and ``resolve/<commit>/`` serves the files of that commit even after the branch has moved on."""
    commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> commit -> files
    serve_files = fake_hub._files

    def commit(repo_id, revision):
        if revision in commits.get(repo_id, {}):
            return revision
        files = fake_hub.repos.get(repo_id, {}).get(revision, {})
        digest = hashlib.sha1(repr((repo_id, sorted(files.items()))).encode()).hexdigest()
        commits.setdefault(repo_id, {})[digest] = dict(files)
        return digest

    def files(handler, repo_id, revision):
        if revision in commits.get(repo_id, {}):
            return commits[repo_id][revision]
        return serve_files(handler, repo_id, revision)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fake_hub, "commit", commit)
        patch.setattr(fake_hub, "_files", files)
        yield fake_hub


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """A LoRA repo and a Share-factors repo (two revisions, one in a subfolder) on the fake Hub."""
    fake_hub = hub
    root = tmp_path_factory.mktemp("hub")
    ink = write_diffusers_lora(root / "ink", seed=1, rank=4, alpha=8)
    sepia = write_diffusers_lora(root / "sepia", seed=3, rank=3, alpha=6, targets=["to_q", "to_v"])
    fake_hub.add_folder("artist/ink-flux-lora", ink.parent)
    fake_hub.add_folder("artist/sepia-flux-lora", sepia.parent, revision="v2")
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.merge_lora(ink, style_name="ink", config=ShareConfig(rank=32, pseudo_rank=8))
    pipe.save_share_factors(root / "one-style")
    pipe.merge_lora(sepia, style_name="sepia")
    pipe.save_share_factors(root / "two-styles")
    fake_hub.add_folder("studio/flux-share-styles", root / "one-style")
    fake_hub.add_folder("studio/flux-share-styles", root / "two-styles", revision="v2", prefix="factors/")
    return {"ink": ink, "sepia": sepia, "pipe": pipe, "root": root}


def fresh_pipe():
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_load_share_factors_from_hub_with_revision_and_subfolder(published, tmp_path):
    pipe = fresh_pipe()
    pipe.load_share_factors("studio/flux-share-styles", cache_dir=tmp_path)
    assert pipe.list_styles() == ["ink"]
    pipe.load_share_factors("studio/flux-share-styles", revision="v2", subfolder="factors", cache_dir=tmp_path)
    assert pipe.list_styles() == ["ink", "sepia"]
    prompts = ["a red cat"]
    assert (generate(pipe, prompts, style="sepia") == generate(published["pipe"], prompts, style="sepia")).all()
    # cached: the same call works offline now
    again = fresh_pipe()
    again.load_share_factors(
        "studio/flux-share-styles", revision="v2", subfolder="factors", cache_dir=tmp_path, local_files_only=True
    )
    assert again.list_styles() == ["ink", "sepia"]


def test_merge_lora_by_hub_id_records_provenance(published, hub, tmp_path):
    pipe = fresh_pipe()
    report = pipe.merge_lora("artist/ink-flux-lora", cache_dir=tmp_path, config=ShareConfig(rank=32, pseudo_rank=8))
    assert report.style_name == "ink-flux-lora"
    assert report.source == {
        "repo_id": "artist/ink-flux-lora",
        "weight_name": "pytorch_lora_weights.safetensors",
        "revision": "main",
        "commit": hub.commit("artist/ink-flux-lora", "main"),  # what was downloaded: main moves, the commit not
    }
    pipe.merge_lora(
        "artist/sepia-flux-lora",
        revision="v2",
        style_name="sepia",
        cache_dir=tmp_path,
        weight_name="pytorch_lora_weights.safetensors",
    )
    prompts = ["a photo of a sneaker"]
    expected = generate(published["pipe"], prompts, style={"ink": 0.5, "sepia": 0.5})
    got = generate(pipe, prompts, style={"ink-flux-lora": 0.5, "sepia": 0.5})
    assert float(torch.as_tensor(expected - got).abs().max()) < 1e-5
    sepia_commit = hub.commit("artist/sepia-flux-lora", "v2")
    assert pipe.share_factors.styles[1].source["commit"] == sepia_commit
    card = model_card(pipe.share_factors, "me/styles").content
    rows = [_table_cells(line) for line in card.splitlines() if line.startswith("| ") and "e-" in line]
    assert rows[1][:2] == [
        "sepia",
        f"artist/sepia-flux-lora (pytorch_lora_weights.safetensors@v2, commit {sepia_commit[:10]})",
    ]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, c: p.merge_lora("artist/no-such-lora", cache_dir=c), "no Hub repo 'artist/no-such-lora'"),
        (
            lambda p, c: p.merge_lora("artist/ink-flux-lora", weight_name="missing.safetensors", cache_dir=c),
            "artist/ink-flux-lora has no file 'missing.safetensors'",
        ),
        (
            lambda p, c: p.merge_lora(
                "artist/sepia-flux-lora", revision="v9", weight_name="pytorch_lora_weights.safetensors", cache_dir=c
            ),
            "has no revision 'v9'",
        ),
        (
            lambda p, c: p.load_share_factors("studio/flux-share-styles", subfolder="nowhere", cache_dir=c),
            "has no file 'nowhere/share_config.json'",
        ),
        (
            lambda p, c: p.load_share_factors("studio/flux-share-styles", cache_dir=c, local_files_only=True),
            "not in the local cache and downloading is off",
        ),
        (
            lambda p, c: p.merge_lora("not a repo id", cache_dir=c),
            "neither an existing file or folder nor a Hub repo id",
        ),
        (  # was tried as a Hub repo: "could not reach the Hub for the file list of loras/typo.safetensors"
            lambda p, c: p.merge_lora("loras/typo.safetensors", cache_dir=c),
            r"^no such file: loras/typo.safetensors \(a Hub repo id names a repository",
        ),
    ],
    ids=[
        "missing-repo",
        "missing-file",
        "missing-revision",
        "missing-subfolder",
        "offline-no-cache",
        "bad-id",
        "mistyped-relative-path",
    ],
)
def test_hub_errors_are_specific_and_change_nothing(published, tmp_path, call, message):
    pipe = fresh_pipe()
    with pytest.raises(HubError, match=message):
        call(pipe, tmp_path)
    assert pipe.share_factors is None


def test_a_refused_download_says_what_the_hub_answered(published, hub, tmp_path, monkeypatch):
    """A token without access to the repo (403; a 5xx or 429 goes the same way): huggingface_hub reports it as a
    file missing from the local cache, said to be offline; the message says what the Hub answered."""
    serve = hub._files

    def files(handler, repo_id, revision):
        if repo_id == "artist/refusing":
            hub._send(handler, 403, b"", True, {})
            return None
        return serve(handler, repo_id, revision)

    monkeypatch.setattr(hub, "_files", files)
    pipe = fresh_pipe()
    calls = [
        lambda: pipe.merge_lora("artist/refusing", weight_name="pytorch_lora_weights.safetensors", cache_dir=tmp_path),
        lambda: pipe.load_share_factors("artist/refusing", cache_dir=tmp_path),
    ]
    refused = r"^the Hub refused '\S+' of artist/refusing: 403 Forbidden.*correct permissions"
    for call in calls:
        with pytest.raises(HubError, match=refused) as caught:
            call()
        assert "local cache" not in str(caught.value)
    assert pipe.share_factors is None


def test_offline_mode_without_cache(published, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = fresh_pipe()
    with pytest.raises(HubError, match="not in the local cache"):
        pipe.merge_lora("artist/ink-flux-lora", weight_name="pytorch_lora_weights.safetensors", cache_dir=tmp_path)


def test_offline_mode_with_a_cached_lora_asks_for_its_weight_name(published, tmp_path, monkeypatch):
    """The file list needs the Hub; the message said the LoRA was not cached (it is), as local_files_only's does not."""
    fresh_pipe().merge_lora("artist/ink-flux-lora", cache_dir=tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = fresh_pipe()
    asks = r"^the file list of artist/ink-flux-lora .* \(HF_HUB_OFFLINE=1\) is on; pass weight_name=\.\.\. to load"
    with pytest.raises(HubError, match=asks):
        pipe.merge_lora("artist/ink-flux-lora", cache_dir=tmp_path)
    assert pipe.share_factors is None
    pipe.merge_lora("artist/ink-flux-lora", weight_name="pytorch_lora_weights.safetensors", cache_dir=tmp_path)
    assert pipe.list_styles() == ["ink-flux-lora"]


def test_merge_lora_of_a_share_checkpoint_says_what_it_is(published, tmp_path):
    """Its one .safetensors file was read as a LoRA: "no LoRA layers in a known layout; first keys: ...basis_in"."""
    pipe = fresh_pipe()
    for source in ("studio/flux-share-styles", published["root"] / "one-style"):
        with pytest.raises(LoraFormatError, match=r"^share_factors-\w+\.safetensors is the tensor file of a Share "):
            pipe.merge_lora(source, cache_dir=tmp_path)
        assert pipe.share_factors is None


def test_pickle_weight_name_is_refused_before_download(published, fake_hub, tmp_path):
    fake_hub.requests.clear()
    with pytest.raises(LoraFormatError, match="never unpickles"):
        fresh_pipe().merge_lora("artist/ink-flux-lora", weight_name="pytorch_lora_weights.bin", cache_dir=tmp_path)
    assert fake_hub.requests == []


def test_push_uploads_a_loadable_checkpoint_with_a_model_card(published, tmp_path, monkeypatch):
    """The upload itself is huggingface_hub's; we check what it is handed (no Hub write API offline)."""
    calls = recording_api(monkeypatch, tmp_path / "uploaded")
    url = published["pipe"].push_share_factors_to_hub("me/my-styles", private=True, token="t")
    assert url == f"{constants.ENDPOINT}/me/my-styles/commit/{'0' * 40}"
    assert calls[0] == ("create_repo", {"repo_id": "me/my-styles", "private": True, "exist_ok": True})
    assert calls[1][0] == "upload_folder"
    assert calls[1][1]["delete_patterns"] == ["share_factors-*.safetensors"]  # stale tensor files of earlier pushes
    assert calls[1][1]["revision"] is None and calls[1][1]["create_pr"] is False
    pipe = fresh_pipe()
    pipe.load_share_factors(tmp_path / "uploaded")
    assert pipe.list_styles() == ["ink", "sepia"]
    card = (tmp_path / "uploaded" / "README.md").read_text()
    assert "pseudo-rank p = 8" in card and "| ink |" in card and "library_name: share-diffusers" in card


def _table_cells(row: str) -> list[str]:
    """A Markdown table row split on its unescaped ``|``, each cell unescaped."""
    cells = re.split(r"(?<!\\)\|", row.strip())[1:-1]
    return [re.sub(r"\\(.)", r"\1", cell.strip()) for cell in cells]


def test_push_publishes_no_local_paths_and_escapes_style_names(published, tmp_path, monkeypatch):
    """A pipeline loaded from a local folder, LoRAs from private folders, style names with quotes, pipes and
    backticks: the card names no base model and no path, its table and code hold the names exactly; the pushed
    share_config.json keeps file names only; the local checkpoint is unchanged. revision= and create_pr= reach
    the upload."""
    secret = tmp_path / "home" / "alice" / "secret-project"
    pipe = ShareFluxPipeline.from_pretrained(save_tiny_flux_pipeline(str(secret / "my-local-flux")))
    pipe.set_progress_bar_config(disable=True)
    names = ['ink "v2" | best', "neon `glow`"]
    pipe.merge_lora(write_diffusers_lora(secret / "ink", seed=1, rank=4, alpha=8), style_name=names[0])
    pipe.merge_lora(write_diffusers_lora(secret / "neon", seed=2, rank=2, alpha=2), style_name=names[1])
    factors = pipe.share_factors
    assert factors.base_model == str(secret / "my-local-flux")
    sources = [dict(style.source) for style in factors.styles]

    calls = recording_api(monkeypatch, tmp_path / "uploaded")
    url = hub_module.push_share_factors(factors, "me/styles", revision="dev", create_pr=True)
    assert url == f"{constants.ENDPOINT}/me/styles/discussions/7"  # the pull request
    assert calls[1] == ("create_branch", {"repo_id": "me/styles", "branch": "dev", "exist_ok": True})
    assert calls[2][1]["revision"] == "dev" and calls[2][1]["create_pr"] is True

    uploaded = tmp_path / "uploaded"
    for path in uploaded.iterdir():
        assert "secret-project" not in path.read_bytes().decode("utf-8", "replace"), path.name
    document = json.loads((uploaded / "share_config.json").read_text())
    assert document["base_model"] is None
    assert [style["source"]["path"] for style in document["styles"]] == ["pytorch_lora_weights.safetensors"] * 2
    assert load_factors(uploaded).style_names == names

    card = ModelCard.load(uploaded / "README.md")
    assert "base_model" not in card.data.to_dict()  # the Hub accepts only repo ids there
    assert card.data.library_name == "share-diffusers"
    code = re.search(r"```python\n(.*?)```", card.content, re.DOTALL).group(1)
    calls_in_code = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)]
    styles = [kw.value.value for call in calls_in_code for kw in call.keywords if kw.arg == "style"]
    assert styles == [names[0]]
    rows = [line for line in card.content.splitlines() if line.startswith("| ") and "e-" in line]
    assert [_table_cells(row)[:3] for row in rows] == [
        [names[0], "pytorch_lora_weights.safetensors", "4"],
        [names[1], "pytorch_lora_weights.safetensors", "2"],
    ]
    # the local checkpoint keeps its provenance
    assert factors.base_model == str(secret / "my-local-flux")
    assert [style.source for style in factors.styles] == sources


def test_model_card_table_renders_style_names_as_they_are(published):
    """Names with Markdown in them (emphasis, strikethrough, a link, an image, an entity) show as typed in the
    rendered card; ``_ink_`` showed as an italic ``ink``, ``![x](url)`` as an image."""
    markdown_it = pytest.importorskip("markdown_it")
    factors = load_factors(published["root"] / "two-styles")
    names = ["_ink_ ~~v1~~ [site](http://x) &amp;", "![sepia](http://x/a.png) __b__ | `c` <i>"]
    for style, name in zip(factors.styles, names, strict=True):
        style.name = name
    content = model_card(factors, "me/styles").content
    table = "\n".join(line for line in content.splitlines() if line.startswith("| "))
    tokens = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(table)
    first_column = [tokens[i + 1] for i, token in enumerate(tokens) if token.type == "td_open"][::4]  # (rows,)
    assert [[child.type for child in cell.children] for cell in first_column] == [["text"], ["text"]]
    assert [cell.children[0].content for cell in first_column] == names


def test_model_card_of_a_hub_base_model_and_an_old_style_name(published):
    """A Hub base model goes in the card's metadata and code; a name with a newline (written by an older
    release) stays on one table row."""
    factors = load_factors(published["root"] / "two-styles")
    factors.base_model = "black-forest-labs/FLUX.1-dev"
    factors.styles[0].name = "ink\nline | two"
    card = model_card(factors, "me/styles")
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev"
    code = re.search(r"```python\n(.*?)```", card.content, re.DOTALL).group(1)
    tree = ast.parse(code)
    literals = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]
    assert "black-forest-labs/FLUX.1-dev" in literals and "ink\nline | two" in literals
    rows = [line for line in card.content.splitlines() if line.startswith("| ") and "e-" in line]
    assert [_table_cells(row)[0] for row in rows] == ["ink line | two", "sepia"]


def test_load_share_factors_reads_the_tensor_file_of_the_configs_commit(published, hub, tmp_path, monkeypatch):
    """A push lands on main between the download of share_config.json and of its tensor file: the tensor file
    still comes from the commit the JSON came from."""
    repo = "studio/moving-styles"
    hub.add_folder(repo, published["root"] / "one-style")
    first_commit = hub.commit(repo, "main")
    download = hub_module.download
    requested = []

    def download_then_push(repo_id, filename, **kwargs):
        requested.append((filename, kwargs["revision"]))
        path = download(repo_id, filename, **kwargs)
        if filename == "share_config.json":
            hub.repos[repo]["main"] = {}
            hub.add_folder(repo, published["root"] / "two-styles")  # another tensor file name, other styles
        return path

    monkeypatch.setattr(hub_module, "download", download_then_push)
    pipe = fresh_pipe()
    pipe.load_share_factors(repo, cache_dir=tmp_path)
    assert pipe.list_styles() == ["ink"]
    weights_file = json.loads((published["root"] / "one-style" / "share_config.json").read_text())["weights_file"]
    assert requested == [("share_config.json", None), (weights_file, first_commit)]
    assert hub.commit(repo, "main") != first_commit  # main did move


# -- prefetch for a server or studio: download first (size-limited), merge from the cache at that commit ------------


def test_prefetch_then_merge_at_its_commit_while_the_branch_moves(published, hub, tmp_path):
    """The studio's and server's Hub merge: prefetch, then a cache-only merge at the prefetched commit. Another
    visitor's prefetch after a push moves refs/main in the cache; the merge still reads the files it fetched."""
    from share_diffusers.loader import prefetch_lora

    repo = "artist/moving-lora"
    hub.add_folder(repo, published["ink"].parent)
    first = prefetch_lora(repo, cache_dir=tmp_path, max_bytes=2**30)
    assert first["commit"] == hub.commit(repo, "main")
    hub.repos[repo]["main"] = {}
    hub.add_folder(repo, published["sepia"].parent)  # a push: main is another commit now
    second = prefetch_lora(repo, cache_dir=tmp_path)
    assert second["commit"] != first["commit"]
    at_main = fresh_pipe().merge_lora(repo, weight_name=first["weight_name"], cache_dir=tmp_path, local_files_only=True)
    assert at_main.source["commit"] == second["commit"]  # "main" in the cache is the other visitor's file now
    pipe = fresh_pipe()
    report = pipe.merge_lora(
        repo,
        weight_name=first["weight_name"],
        revision=first["commit"],
        cache_dir=tmp_path,
        local_files_only=True,
        config=ShareConfig(rank=32, pseudo_rank=8),
    )
    assert report.source["commit"] == first["commit"]
    expected = generate(published["pipe"], ["a photo of a sneaker"], style="ink")
    assert (
        float(torch.as_tensor(expected - generate(pipe, ["a photo of a sneaker"], style="moving-lora")).abs().max())
        < 1e-5
    )


def test_size_limit_offline_measures_the_cached_copy(published, hub, tmp_path, monkeypatch):
    from share_diffusers.hub import HubFileTooLargeError
    from share_diffusers.loader import prefetch_lora

    size = published["ink"].stat().st_size
    source = prefetch_lora("artist/ink-flux-lora", cache_dir=tmp_path, max_bytes=size)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: no HEAD request possible
    again = prefetch_lora("artist/ink-flux-lora", source["weight_name"], cache_dir=tmp_path, max_bytes=size)
    assert again["commit"] == source["commit"]
    with pytest.raises(HubFileTooLargeError, match=r"^artist/ink-flux-lora: pytorch_lora_weights.safetensors is "):
        prefetch_lora("artist/ink-flux-lora", source["weight_name"], cache_dir=tmp_path, max_bytes=size - 1)
    with pytest.raises(HubError, match="has no file 'missing.safetensors'|not in the local cache"):
        prefetch_lora("artist/ink-flux-lora", "missing.safetensors", cache_dir=tmp_path, max_bytes=size)


def test_prefetch_of_peft_adapters_with_and_without_config(published, hub, tmp_path):
    """A PEFT repo without adapter_config.json (alpha as tensors) merges from the cache after the prefetch noted
    the config's absence; an oversized config is refused by its size, never downloaded."""
    from flux_helpers import write_peft_adapter_folder
    from safetensors.torch import load_file, save_file

    from share_diffusers.hub import HubFileTooLargeError
    from share_diffusers.loader import prefetch_lora

    folder = write_peft_adapter_folder(published["ink"], tmp_path / "peft", rank=4, alpha=8)
    (folder / "adapter_config.json").unlink()
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors.update({k.replace(".lora_A.weight", ".alpha"): torch.tensor(8.0) for k in tensors if "lora_A" in k})
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    hub.add_folder("artist/peft-alpha", folder)
    source = prefetch_lora("artist/peft-alpha", cache_dir=tmp_path / "cache", max_bytes=2**30)
    pipe = fresh_pipe()
    pipe.merge_lora(
        "artist/peft-alpha",
        weight_name=source["weight_name"],
        revision=source["commit"],
        cache_dir=tmp_path / "cache",
        local_files_only=True,
        config=ShareConfig(rank=32, pseudo_rank=8),
    )
    expected = generate(published["pipe"], ["a photo of a sneaker"], style="ink")
    assert (
        float(torch.as_tensor(expected - generate(pipe, ["a photo of a sneaker"], style="peft-alpha")).abs().max())
        < 1e-5
    )

    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "pad": "x" * 2**21}))
    hub.add_folder("artist/peft-huge-config", folder)
    hub.requests.clear()
    with pytest.raises(HubFileTooLargeError, match=r"artist/peft-huge-config: adapter_config.json is 2\.0 MiB"):
        prefetch_lora("artist/peft-huge-config", cache_dir=tmp_path / "cache", max_bytes=2**30)
    assert not [r for r in hub.requests if r.startswith("GET") and r.endswith("adapter_config.json")], hub.requests


def test_restore_share_undoes_a_merge_and_drops_a_default_style_it_removes(published, tmp_path):
    pipe = fresh_pipe()
    assert pipe.snapshot_share() is None
    pipe.merge_lora(published["ink"], style_name="ink", config=ShareConfig(rank=4, pseudo_rank=2))
    bank = pipe.snapshot_share()
    before = generate(pipe, ["a photo of a sneaker"], style="ink")
    pipe.merge_lora(published["sepia"], style_name="sepia")
    assert float(torch.as_tensor(generate(pipe, ["a photo of a sneaker"], style="ink") - before).abs().max()) > 0
    pipe.set_style({"ink": 0.5, "sepia": 0.5})
    pipe.restore_share(bank)
    assert pipe.list_styles() == ["ink"] and pipe._default_style is None
    assert torch.equal(torch.as_tensor(generate(pipe, ["a photo of a sneaker"], style="ink")), torch.as_tensor(before))
    pipe.set_style("ink")
    pipe.restore_share(bank)
    assert pipe._default_style == "ink"  # still held: kept
    pipe.restore_share(None)  # before the first merge: no subspace
    assert pipe.share is None and pipe.list_styles() == []
