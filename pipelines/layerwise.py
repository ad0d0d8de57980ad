"""Layer-wise prompt encoding (P+ / ED-LoRA, Mix-of-Show section 3.3.1).

A concept is two new words, V_rand and V_class, each with one embedding per UNet cross-attention
layer (16 in SD1.5: 6 down, 1 mid, 9 up, in that order). A prompt that names a concept, written
`<mochi>`, is encoded 16 times; in copy l the concept becomes its two layer-l tokens. Cross-attention
layer l then reads copy l. An imported LoRA (`lora_import`) is a concept of n words, the tokens of
its "trigger class" phrase, with the same vectors in all 16 layers.

Layout: the 16 encodings travel through the UNet as one tensor `[B, 16 * 77, d]` (copy l is the
sequence slice `l*77 : (l+1)*77`), and `LayerwiseAttnProcessor` on layer l takes its slice. The
UNet's own call signature is untouched, so every sampler and trainer works with it unchanged.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

NUM_LAYERS = 16  # cross-attention layers of the SD1.5 UNet
WORDS = ("r", "c")  # V_rand, V_class
# One letter per word of a concept: ED-LoRA's V_rand and V_class, then the further words of an
# imported LoRA's "trigger class" phrase (`<name-a3>` is word 2 in layer 3), at most 26 words.
WORD_LABELS = "rcabdefghijklmnopqstuvwxyz"
# `<mochi>`; `<Mochi>` means the same concept (names are lowercase; CLIP lowercases all text anyway)
CONCEPT_REF = re.compile(r"<([a-z0-9][a-z0-9_-]*)>", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Tokens and prompts


def concept_tokens(name: str, words: int = len(WORDS)) -> list[str]:
    """The 16 * words tokenizer tokens of a concept, word-major: V_rand layers 0..15, then V_class 0..15, ..."""
    return [f"<{name}-{word}{layer}>" for word in WORD_LABELS[:words] for layer in range(NUM_LAYERS)]


CONCEPT_TOKEN_OF_LAYER = re.compile(r"<[a-z0-9][a-z0-9_-]*-[a-z]([1-9]|1[0-5])>")  # a concept token of layers 1-15


def concepts_in(prompt: str) -> list[str]:
    """Names of the concepts a prompt refers to as `<name>`, in order of first appearance."""
    names: list[str] = []
    for match in CONCEPT_REF.finditer(prompt):
        if match.group(1).lower() not in names:
            names.append(match.group(1).lower())
    return names


def expand_prompt(prompt: str, layer: int, known: set[str] | dict[str, int]) -> str:
    """Copy `layer` of a prompt: each `<name>` becomes its layer-`layer` tokens, one per word.

    `known` names the loaded concepts: a set (two words each, ED-LoRA) or name -> word count
    (`concept_words`, which also knows imported LoRAs' longer phrases).
    """

    def replace(match: re.Match) -> str:
        name = match.group(1).lower()
        if name not in known:
            raise UserError(f"unknown concept <{name}> in prompt {prompt!r}; known: {', '.join(sorted(known)) or 'none'}")
        words = known[name] if isinstance(known, dict) else len(WORDS)
        return " ".join(f"<{name}-{word}{layer}>" for word in WORD_LABELS[:words])

    return CONCEPT_REF.sub(replace, prompt)


# ---------------------------------------------------------------------------------------------
# The concept token table


class ConceptTokenTable(nn.Module):
    """CLIP's token embedding plus one `[words, 16, d]` block of vectors per concept (2 words for ED-LoRA).

    It replaces the text encoder's input embeddings (`set_input_embeddings`). The base table stays frozen and untouched;
    concept vectors live in their own parameters (trainable in training, fp32), so no optimizer
    step can disturb a vocabulary row, and several concepts can sit side by side for sampling.
    Token ids past the base vocabulary map to concept vectors in the order concepts were added.
    """

    def __init__(self, base_table: nn.Embedding):
        super().__init__()
        self.base_table = base_table
        self.base_vocab = base_table.num_embeddings
        self.concept_vectors = nn.ParameterDict()  # name -> [words, 16, d]
        self.order: list[str] = []  # names in token-id order

    @property
    def weight(self) -> torch.Tensor:  # transformers reads the dtype/device from here
        return self.base_table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base_table(input_ids.clamp(max=self.base_vocab - 1))
        if not self.order:
            return embeds
        extra = torch.cat([self.concept_vectors[name].flatten(0, 1) for name in self.order])  # [16 * all words, d]
        rows = (input_ids - self.base_vocab).clamp(0, extra.shape[0] - 1)
        is_base = (input_ids < self.base_vocab).unsqueeze(-1)
        return torch.where(is_base, embeds, extra[rows].to(embeds.dtype))


def token_table(text_encoder: nn.Module) -> ConceptTokenTable:
    """The text encoder's ConceptTokenTable, installed on first use."""
    table = text_encoder.get_input_embeddings()
    if not isinstance(table, ConceptTokenTable):
        table = ConceptTokenTable(table)
        text_encoder.set_input_embeddings(table)
    return table


def add_concept_tokens(tokenizer, text_encoder: nn.Module, name: str, vectors: torch.Tensor) -> nn.Parameter:
    """Register concept `name` with its `[words, 16, d]` vectors (2 words for ED-LoRA); returns the (fp32) parameter.

    Adding a name that is already there replaces its vectors and keeps its token ids.
    """
    table = token_table(text_encoder)
    dim = table.base_table.embedding_dim
    words = vectors.shape[0] if vectors.ndim == 3 else 0
    if vectors.ndim != 3 or not 1 <= words <= len(WORD_LABELS) or tuple(vectors.shape[1:]) != (NUM_LAYERS, dim):
        raise UserError(f"concept <{name}> has embeddings of shape {tuple(vectors.shape)}, this base needs {(len(WORDS), NUM_LAYERS, dim)}"
                        f" (an imported LoRA: 1 to {len(WORD_LABELS)} words instead of {len(WORDS)})")
    if name in table.order and table.concept_vectors[name].shape[0] != words:
        raise UserError(f"concept <{name}> was loaded into this base with {table.concept_vectors[name].shape[0]} words and now has"
                        f" {words}; load the base model again to use it")
    param = nn.Parameter(vectors.detach().to(table.base_table.weight.device, torch.float32).clone())
    if name not in table.order:
        if len(tokenizer) != table.base_vocab + NUM_LAYERS * sum(concept_words(text_encoder).values()):
            raise UserError("the tokenizer and the text encoder disagree on the vocabulary size; reload the base model")
        tokenizer.add_tokens(concept_tokens(name, words))
        table.order.append(name)
    ids = tokenizer.convert_tokens_to_ids(concept_tokens(name, words))
    earlier = table.order[: table.order.index(name)]
    first = table.base_vocab + NUM_LAYERS * sum(table.concept_vectors[n].shape[0] for n in earlier)
    if ids != list(range(first, first + words * NUM_LAYERS)):
        raise RuntimeError(f"token ids of <{name}> are not contiguous from {first}: {ids[:3]}...")
    table.concept_vectors[name] = param
    return param


def known_concepts(text_encoder: nn.Module) -> list[str]:
    table = text_encoder.get_input_embeddings()
    return list(table.order) if isinstance(table, ConceptTokenTable) else []


def concept_words(text_encoder: nn.Module) -> dict[str, int]:
    """Loaded concept name -> its number of words (2 for ED-LoRA), in token-id order; for `expand_prompt`."""
    table = text_encoder.get_input_embeddings()
    if not isinstance(table, ConceptTokenTable):
        return {}
    return {name: table.concept_vectors[name].shape[0] for name in table.order if name in table.concept_vectors}


# ---------------------------------------------------------------------------------------------
# Encoding


def check_prompt_length(tokenizer, texts: list[str], limit: int) -> None:
    """CLIP reads `limit` (77) tokens, start and end of text included; the rest is cut off.

    A concept cut off would silently vanish from the picture: that is an error. Plain words cut
    off are a warning (`PromptTooLong`, which the CLI prints).
    """
    for text in dict.fromkeys(texts):
        ids = tokenizer(text, truncation=False, verbose=False).input_ids
        if len(ids) <= limit:
            continue
        dropped = tokenizer.convert_ids_to_tokens(ids[limit - 1 : -1])
        lost = sorted({t[1:-1].rsplit("-", 1)[0] for t in dropped if t.startswith("<") and t.endswith(">") and "-" in t})
        if lost:
            raise UserError(f"the prompt is {len(ids) - 2} tokens long, and CLIP reads 75: {', '.join('<' + n + '>' for n in lost)}"
                            f" would be cut off; shorten the prompt or name the concept earlier")
        words = tokenizer.decode(ids[limit - 1 : -1]).strip()
        message = f"the prompt is {len(ids) - 2} tokens long, and CLIP reads 75; these words are ignored: {words!r}"
        warnings.warn(message, PromptTooLong, stacklevel=3)


class PromptTooLong(UserWarning):
    """A prompt past CLIP's 77-token window: its end is ignored."""


def encode_layerwise(tokenizer, text_encoder: nn.Module, prompts: list[str]) -> torch.Tensor:
    """Encode prompts layer-wise: `[B, 16 * 77, d]`, copy l = the prompt with layer-l concept tokens.

    A prompt without concepts is encoded once and repeated (the 16 copies are identical), which is
    also how the negative prompt is treated in Mix-of-Show.
    """
    known = concept_words(text_encoder)
    device = text_encoder.device
    texts: list[str] = []
    for prompt in prompts:
        if concepts_in(prompt):
            texts += [expand_prompt(prompt, layer, known) for layer in range(NUM_LAYERS)]
        else:
            texts.append(prompt)
    limit = text_encoder.config.max_position_embeddings
    # every layer's copy has the same length: checking copy 0 of each prompt is enough
    check_prompt_length(tokenizer, [t for t in texts if not CONCEPT_TOKEN_OF_LAYER.search(t)], limit)
    ids = tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    hidden = text_encoder(ids.to(device))[0]  # [n_texts, 77, d]
    out, i = [], 0
    for prompt in prompts:
        if concepts_in(prompt):
            out.append(hidden[i : i + NUM_LAYERS].flatten(0, 1))  # [16 * 77, d]
            i += NUM_LAYERS
        else:
            out.append(hidden[i].repeat(NUM_LAYERS, 1))
            i += 1
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Attention


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's cross-attention modules (attn2) in ED-LoRA's order: down blocks, mid, up blocks.

    The order is spelled out because `named_modules()` visits `up_blocks` before `mid_block` in
    diffusers' UNet2DConditionModel (it registers them in that order); Mix-of-Show does the same.
    """
    layers = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        for name, module in getattr(unet, part).named_modules():
            if name.endswith("attn2"):
                layers.append((f"{part}.{name}", module))
    if len(layers) != NUM_LAYERS:
        raise UserError(f"this base model has {len(layers)} cross-attention layers; ED-LoRA needs an SD1.x UNet with {NUM_LAYERS}")
    return layers


class LayerwiseAttnProcessor:
    """Cross-attention for layer l: attend to copy l of the layer-wise prompt, then as usual (SDPA)."""

    def __init__(self, layer: int):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.layer = layer
        self.attention = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 self_attention_bias=None, cross_attention_bias=None):
        # `self_attention_bias` is for the self-attention layers (pipelines.layout); declared so
        # diffusers passes it on without a warning, and ignored here. `cross_attention_bias`
        # {tokens: [B, 1, N, S]} (layout.cross_attention_biases) bounds which words a pixel sees.
        context = select_layer(encoder_hidden_states, self.layer)
        bias = None if cross_attention_bias is None else cross_attention_bias.get(hidden_states.shape[1])
        if bias is None:
            return self.attention(attn, hidden_states, context, attention_mask, temb)
        return attention_with_bias(attn, hidden_states, context, bias)


def attention_with_bias(attn, hidden_states: torch.Tensor, context: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One attention layer (SDPA) of `hidden_states` [B, N, C] over `context` [B, S, d] with an
    additive bias broadcast to [B, heads, N, S]: the bounded attention of `pipelines.layout`."""
    batch, tokens, channels = hidden_states.shape
    head_dim = channels // attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, heads, N, head_dim]
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=bias.to(query.dtype))
    out = attn.to_out[0](out.transpose(1, 2).reshape(batch, tokens, channels).to(query.dtype))
    return attn.to_out[1](out)


def select_layer(encoder_hidden_states: torch.Tensor, layer: int) -> torch.Tensor:
    """Copy `layer` of a layer-wise encoding: `[B, 16 * S, d] -> [B, S, d]`."""
    batch, length, dim = encoder_hidden_states.shape
    if length % NUM_LAYERS:
        raise ValueError(f"layer-wise encoder states need a length divisible by {NUM_LAYERS}, got {length}")
    return encoder_hidden_states.view(batch, NUM_LAYERS, length // NUM_LAYERS, dim)[:, layer]


def install_layerwise_attention(unet: nn.Module) -> None:
    """Give cross-attention layer l a LayerwiseAttnProcessor(l); self-attention is untouched."""
    for layer, (_, module) in enumerate(cross_attention_layers(unet)):
        module.set_processor(LayerwiseAttnProcessor(layer))
