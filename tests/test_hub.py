"""The Hub code path (huggingface_hub against a local stand-in server): download, revision, subfolder, errors."""

from __future__ import annotations

import pytest
import torch
from flux_helpers import generate, write_diffusers_lora
from huggingface_hub import constants

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers.core import LoraFormatError
from share_diffusers.hub import HubError, model_card
from share_diffusers.tiny_flux import build_tiny_flux_pipeline


@pytest.fixture(scope="module")
def published(fake_hub, tmp_path_factory):
    """A LoRA repo and a Share-factors repo (two revisions, one in a subfolder) on the fake Hub."""
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
    return {"ink": ink, "sepia": sepia, "pipe": pipe}


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


def test_merge_lora_by_hub_id_records_provenance(published, tmp_path):
    pipe = fresh_pipe()
    report = pipe.merge_lora("artist/ink-flux-lora", cache_dir=tmp_path, config=ShareConfig(rank=32, pseudo_rank=8))
    assert report.style_name == "ink-flux-lora"
    assert report.source == {
        "repo_id": "artist/ink-flux-lora",
        "weight_name": "pytorch_lora_weights.safetensors",
        "revision": "main",
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
    card = model_card(pipe.share_factors, "me/styles").content
    assert "artist/sepia-flux-lora (pytorch_lora_weights.safetensors@v2)" in card and "| sepia |" in card


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
    ],
    ids=["missing-repo", "missing-file", "missing-revision", "missing-subfolder", "offline-no-cache", "bad-id"],
)
def test_hub_errors_are_specific_and_change_nothing(published, tmp_path, call, message):
    pipe = fresh_pipe()
    with pytest.raises(HubError, match=message):
        call(pipe, tmp_path)
    assert pipe.share_factors is None


def test_offline_mode_without_cache(published, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = fresh_pipe()
    with pytest.raises(HubError, match="not in the local cache"):
        pipe.merge_lora("artist/ink-flux-lora", weight_name="pytorch_lora_weights.safetensors", cache_dir=tmp_path)


def test_pickle_weight_name_is_refused_before_download(published, fake_hub, tmp_path):
    fake_hub.requests.clear()
    with pytest.raises(LoraFormatError, match="never unpickles"):
        fresh_pipe().merge_lora("artist/ink-flux-lora", weight_name="pytorch_lora_weights.bin", cache_dir=tmp_path)
    assert fake_hub.requests == []


def test_push_uploads_a_loadable_checkpoint_with_a_model_card(published, tmp_path, monkeypatch):
    """The upload itself is huggingface_hub's; we check what it is handed (no Hub write API offline)."""
    import shutil

    from share_diffusers import hub

    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message, delete_patterns):
            calls.append(("upload_folder", repo_id, commit_message, delete_patterns))
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return "https://hub.example/commit/1"

    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    url = published["pipe"].push_share_factors_to_hub("me/my-styles", private=True, token="t")
    assert url == "https://hub.example/commit/1"
    assert calls[0] == ("create_repo", "me/my-styles", True, True)
    assert calls[1][3] == ["share_factors-*.safetensors"]  # stale tensor files of earlier pushes go away
    pipe = fresh_pipe()
    pipe.load_share_factors(tmp_path / "uploaded")
    assert pipe.list_styles() == ["ink", "sepia"]
    card = (tmp_path / "uploaded" / "README.md").read_text()
    assert "pseudo-rank p = 8" in card and "| ink |" in card and "library_name: share-diffusers" in card
