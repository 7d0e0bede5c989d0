"""Encode a prompt list into the prompt-set file the trainer reads (``conditioning.PromptSet``), from the command line.

    python -m distill_core.prompts encode --base PIPELINE_FOLDER --prompts prompts.txt --out prompts.safetensors
        [--family flux] [--negative ""] [--device cuda] [--dtype bf16] [--max-tokens 512] [--overwrite]

``PIPELINE_FOLDER`` is a diffusers pipeline saved with ``save_pretrained`` (``model_index.json`` with
``text_encoder/``, ``tokenizer/`` ... and ``transformer/``; e.g. a download of FLUX.1-dev). Only the text encoders
and tokenizers are loaded; each family encodes through its pipeline's own ``encode_prompt``
(``xslim_core.families``: ``FamilySpec.text_encode``). The run config then names the file as ``prompts`` and the
transformer folder as ``teacher``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .conditioning import Conditioning, PromptSet, encode_prompt_set, read_prompt_file
from .logs import log, show_on_stdout

from xslim_core.families import REGISTRY, family_of_class

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def text_families() -> list[str]:
    return [spec.id for spec in REGISTRY.values() if spec.text_encode is not None]


def pipeline_family(base: str, family: str | None = None) -> str:
    """The family of a diffusers pipeline folder, from its ``model_index.json`` (the transformer's class); a given
    ``family`` must agree with it."""
    index_path = os.path.join(base, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(
            f"{base} is not a diffusers pipeline folder (no model_index.json): give the folder of the whole "
            "pipeline, the one holding text_encoder/, tokenizer/ and transformer/ (e.g. a download of "
            "black-forest-labs/FLUX.1-dev), not the transformer folder alone."
        )
    with open(index_path, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except ValueError as err:
            raise ValueError(f"{index_path} is not valid JSON ({err}); download the pipeline again.") from None
    entry = index.get("transformer") if isinstance(index, dict) else None
    transformer_class = str(entry[1]) if isinstance(entry, list) and len(entry) == 2 else None
    found = family_of_class(transformer_class) if transformer_class else None
    if found is None and family is None:
        raise ValueError(
            f"{index_path} names no transformer of a known family ({entry!r}); give --family, one of "
            f"{', '.join(text_families())}."
        )
    if found is not None and family is not None and found.id != family:
        raise ValueError(
            f"--family {family} but {base} is a {found.id} pipeline (its transformer is {transformer_class}); drop "
            "--family or give the matching pipeline folder."
        )
    name = family or (found.id if found else "")
    if name not in text_families():
        raise ValueError(
            f"the {name!r} family has no text encoder to encode prompts with; families with one: "
            f"{', '.join(text_families())}."
        )
    return name


def load_text_pipeline(base: str, device: torch.device, dtype: torch.dtype):
    """The pipeline with its text encoders and tokenizers only (transformer and VAE not loaded)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(base, transformer=None, vae=None, dtype=dtype)
    return pipe.to(device)


def pipeline_encoder(pipe, family: str, device: torch.device, max_tokens: int | None = None):
    """``encode(list[str]) -> Conditioning`` through the family's pipeline call, for ``encode_prompt_set``."""
    call = REGISTRY[family].text_encode
    if call is None:
        raise ValueError(
            f"the {family!r} family has no text encoder call; families with one: {', '.join(text_families())}."
        )

    @torch.no_grad()
    def encode(prompts: list[str]) -> Conditioning:
        context, pooled, mask = call(pipe, prompts, device, max_tokens)
        return Conditioning(
            context.cpu(), None if pooled is None else pooled.cpu(), None if mask is None else mask.cpu()
        )

    return encode


def encode_file(
    base: str,
    prompts_path: str,
    out: str,
    family: str | None = None,
    negative: str = "",
    device: str | None = None,
    dtype: str | None = None,
    max_tokens: int | None = None,
    overwrite: bool = False,
) -> PromptSet:
    """Read a prompt list (one per line), encode it with ``base``'s text encoders and write the prompt set to ``out``
    (an existing ``out`` only with ``overwrite``: refused before any encoder is loaded)."""
    if not overwrite and os.path.lexists(out):
        raise FileExistsError(f"{out} exists; choose another --out, or give --overwrite to replace it.")
    name = pipeline_family(base, family)
    prompts = read_prompt_file(prompts_path)
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = DTYPES[dtype or ("bf16" if where.type == "cuda" else "fp32")]
    log.info(
        "[1.x-Distill] encoding %d prompt(s) with the %s text encoders of %s on %s", len(prompts), name, base, where
    )
    pipe = load_text_pipeline(base, where, kind)
    prompt_set = encode_prompt_set(prompts, pipeline_encoder(pipe, name, where, max_tokens), negative=negative)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    prompt_set.save(out, overwrite=overwrite)
    return prompt_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill_core.prompts",
        description="Prompt sets for 1.x-Distill: encode a prompt list once with a model's text encoders.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser(
        "encode",
        help="encode a prompt list (one prompt per line) into a prompt-set file",
        description="Encode a prompt list with the text encoders of a diffusers pipeline folder and "
        "write the prompt-set file a run config names as 'prompts'.",
    )
    enc.add_argument(
        "--base", required=True, help="the diffusers pipeline folder (model_index.json, text_encoder/, tokenizer/ ...)"
    )
    enc.add_argument("--prompts", required=True, help="UTF-8 text file, one prompt per line ('#' lines skipped)")
    enc.add_argument("--out", required=True, help="the prompt-set file to write (.safetensors)")
    enc.add_argument("--family", choices=text_families(), help="the model family (default: read from model_index.json)")
    enc.add_argument("--negative", default="", help="the unconditional prompt (default: empty)")
    enc.add_argument("--device", help="where the text encoders run (default: cuda when present, else cpu)")
    enc.add_argument(
        "--dtype", choices=sorted(DTYPES), help="text encoder precision (default: bf16 on cuda, fp32 on cpu)"
    )
    enc.add_argument("--max-tokens", type=int, help="text sequence length (default: the pipeline's own)")
    enc.add_argument("--overwrite", action="store_true", help="replace --out when it exists (default: refuse)")
    args = parser.parse_args(argv)
    show_on_stdout()
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens must be a whole number >= 1, got {args.max_tokens}")
    try:
        result = encode_file(
            args.base,
            args.prompts,
            args.out,
            args.family,
            args.negative,
            args.device,
            args.dtype,
            args.max_tokens,
            args.overwrite,
        )
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    shape = result.encoder_shape
    print(
        f"{args.out}: {len(result)} prompts + the unconditional one, context {shape['context']}, pooled {shape['pooled']}; "
        f'name it as "prompts" in the run config (teacher: {os.path.join(args.base, "transformer")})'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
