"""The toy world's text-to-image model: SD1.5's architecture at toy size, saved as a diffusers folder.

- UNet: SD1.5's block structure (3 cross-attention down blocks + 1 plain, mid block, 1 plain + 3
  cross-attention up blocks), so it has the same 16 cross-attention layers in the same order,
  with 64/96/96/96 channels and head size 32; 8.1 M parameters.
- VAE: AutoencoderKL with a downsampling factor of 4: 64x64 images, 4x16x16 latents.
- Text encoder: CLIP, 4 layers of width 128, 32 positions; a CLIP BPE tokenizer whose vocabulary
  is the 512 byte symbols plus every word of the world as one token (`write_tokenizer`).

Everything is stored in half precision, so the folder stays under about 20 MB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.toyworld.world import SIZE, vocabulary
from pipelines.base import _bytes_to_unicode

LATENT_FACTOR = 4
MAX_TOKENS = 32  # captions are at most ~20 words

UNET = dict(
    sample_size=SIZE // LATENT_FACTOR,
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(64, 96, 96, 96),
    norm_num_groups=16,
    cross_attention_dim=128,
    attention_head_dim=(2, 3, 3, 3),  # diffusers' legacy name for the number of heads: head size 32
)
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=16,
    latent_channels=4,
    sample_size=SIZE,
)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS)
# SD1.5's noise schedule, as in its scheduler_config.json
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """vocab.json contents and merges for a CLIP tokenizer in which each of `words` is one token.

    Merges are added word by word, left to right, after simulating BPE with the merges so far.
    A new merge has a higher rank than every earlier one, so it cannot change how an earlier word
    is split (that word's path always had a lower-ranked pair available).
    """
    byte_symbols = list(_bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab)
    for word in words:
        symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            merged = pair[0] + pair[1]
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, [f"{a} {b}" for a, b in merges]


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files(vocabulary())
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=MAX_TOKENS)


def build(tokenizer_dir: Path, seed: int = 0):
    """Random-initialised (tokenizer, text_encoder, unet, vae) of the toy architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos, pad_token_id=eos, **TEXT))
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE)
    return tokenizer, text_encoder, unet, vae


def save(folder: Path, tokenizer, text_encoder, unet, vae, card: dict) -> Path:
    """Write a standard diffusers folder (fp16 weights) that `pipelines.base.load_base` loads."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, **SCHEDULE)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    write_tokenizer(folder / "tokenizer")
    (folder / "toyworld.json").write_text(json.dumps(card, indent=1))
    return folder
