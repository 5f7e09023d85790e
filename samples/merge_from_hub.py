"""Merge Flux LoRAs from the Hugging Face Hub into one Share checkpoint, then push it back.

    python samples/merge_from_hub.py --model black-forest-labs/FLUX.1-dev \\
        --lora XLabs-AI/flux-RealismLora --lora alvdansen/frosting_lane_flux -o my-styles [--push me/my-styles]

Any layout diffusers converts works (diffusers/PEFT, kohya, XLabs, BFL, ai-toolkit, ComfyUI); give
``REPO:FILE`` when a repo holds several ``.safetensors``. Without ``--model`` the embedded tiny
pipeline is used (the LoRAs must then be for it: the tests serve such LoRAs from a local stand-in Hub).
"""

from __future__ import annotations

import argparse

import torch

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers.runtime import USER_ERRORS, error_line
from share_diffusers.tiny_flux import build_tiny_flux_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Flux repo id or folder (default: the embedded tiny pipeline)")
    parser.add_argument("--lora", action="append", required=True, help="Hub repo id, optionally REPO:FILE")
    parser.add_argument("-o", "--output", required=True, help="folder for the Share checkpoint")
    parser.add_argument("--push", help="Hub repo id to upload the checkpoint to")
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("-p", type=int, default=8)
    args = parser.parse_args()

    if args.model:
        pipe = ShareFluxPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
    else:
        pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    for index, spec in enumerate(args.lora):
        repo_id, _, weight_name = spec.partition(":")
        config = ShareConfig(rank=args.k, pseudo_rank=args.p) if index == 0 and pipe.share_factors is None else None
        report = pipe.merge_lora(repo_id, weight_name=weight_name or None, config=config)
        print(report)
    pipe.save_share_factors(args.output)
    print(f"{len(pipe.list_styles())} styles saved to {args.output}: {', '.join(pipe.list_styles())}")
    if args.push:
        print("pushed:", pipe.push_share_factors_to_hub(args.push))


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as error:  # the Hub unreachable, a repo or file missing: one line, as the CLI says it
        raise SystemExit(f"error: {error_line(error)}") from None
