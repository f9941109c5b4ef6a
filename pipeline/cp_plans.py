"""Context-parallel plans for the transformers diffusers 0.42.1 ships without one (its `_cp_plan`).

A plan names, per submodule, which tensor to split across the ranks of a group (along the token axis) and
where to gather the result back (diffusers' `ContextParallelInput` / `ContextParallelOutput`, read by
`hooks/context_parallel.py`). Wan's plan is diffusers' own; LTX-2's is diffusers' with its RoPE tables fixed;
this module holds the rest, keyed by transformer class, beside the family's other adapters
(`models.prepare_call`, `families.PROMPT_TRIMS`).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput, gather_size_by_comm
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

# HunyuanVideo: split after the embedders, so the token refiner's own attention still sees the whole prompt,
# and gather at `proj_out`. Both streams are split: the joint attention concatenates each rank's video and text
# shards, and attention does not depend on the order of its keys, so the result is the single-rank one. The
# RoPE tables (cos, sin; each (tokens, dim)) are split like the video tokens they rotate. The attention mask the
# transformer builds from local lengths is only right when it is all ones, so this plan needs the trimmed,
# unpadded prompt (T2V_MASK_FREE, the default), whose mask the block hook drops.
HUNYUAN_VIDEO_PLAN = {
    "rope": {
        0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
    },
    "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    "context_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}

# HunyuanVideo-1.5: the video tokens split after the patch embedding, with their RoPE tables; the text (image,
# ByT5 and Qwen tokens, combined and reordered inside `forward`) splits where the first block receives it,
# with its mask. Its processor is replaced by `HunyuanVideo15KeyMaskProcessor` (see there).
HUNYUAN_VIDEO_15_PLAN = {
    "rope": {
        0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
    },
    "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
    # Each block returns its shard of the text to the next; the mask comes from `forward` to every block.
    "transformer_blocks.0": {"encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
    "transformer_blocks.*": {"attention_mask": ContextParallelInput(split_dim=1, expected_dims=2)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}


class HunyuanVideo15KeyMaskProcessor(HunyuanVideo15AttnProcessor2_0):
    """diffusers' HunyuanVideo-1.5 attention, with its text mask applied to the keys only and gathered across the
    ranks here, in the order attention sees the keys. diffusers' own processor builds a (tokens x tokens) mask
    from the local tokens, whose rows Ulysses attention does not gather. The valid tokens attend exactly as
    before; a padding token's own output (a query the full mask left with nothing) is never read: it meets
    attention again only as a masked key, and the text stream is dropped at the output."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value = (layer(hidden_states).unflatten(2, (attn.heads, -1))
                             for layer in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text = (encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0)
        if encoder_hidden_states is not None:
            added = [layer(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                     for layer in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                added[0] = attn.norm_added_q(added[0])
            if attn.norm_added_k is not None:
                added[1] = attn.norm_added_k(added[1])
            query, key, value = (torch.cat([x, a], dim=1) for x, a in zip((query, key, value), added))
        batch, tokens = query.shape[:2]
        keys = F.pad(attention_mask, (tokens - attention_mask.shape[1], 0), value=True).to(torch.uint8)
        if self._parallel_config is not None:  # every rank's keys: (B, all tokens), as attention orders them
            keys = _gather_keys(keys, self._parallel_config.context_parallel_config._ulysses_mesh.get_group())
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=keys.bool().view(batch, 1, 1, -1),
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if not text:
            return hidden_states
        hidden_states, encoder_hidden_states = hidden_states[:, :-text], hidden_states[:, -text:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, attn.to_add_out(encoder_hidden_states)


def _gather_keys(keys: torch.Tensor, group) -> torch.Tensor:
    """(B, local tokens) from every rank -> (B, all tokens) in rank order. Shards may differ by one token (the
    "anything" split): each is padded to the longest for the all-gather (gloo needs equal sizes), then cut back."""
    sizes = gather_size_by_comm(keys.shape[1], group)
    padded = F.pad(keys, (0, max(sizes) - keys.shape[1]))
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([chunk[:, :size] for chunk, size in zip(chunks, sizes)], dim=1)


def ltx2_plan(transformer) -> dict:
    """diffusers' own LTX-2 plan (`_cp_plan`: the video and its prompt split at the input, gathered at `proj_out`),
    with its RoPE tables split on their token axis. diffusers splits them on dim 1, which is the tokens of the
    interleaved tables (B, tokens, dim) but the heads of the split ones (B, heads, tokens, dim / 2) that LTX-2.3
    uses; and it leaves the video's cross-modal table (`cross_attn_rope`, for the audio-video attention) whole
    beside the split video. Image-to-video gives each video token its own timestep (B, tokens; the image's frame
    is at 0): it splits with them (text-to-video's (B,) is left whole, as diffusers' hook then logs once). The audio
    stream stays whole on every rank: Ulysses attention then gathers N equal
    copies of its keys, which softmax weighs as one, so each rank's result is the one-process result."""
    if transformer.config.rope_type == "split":
        table = ContextParallelInput(split_dim=2, expected_dims=4, split_output=True)
    else:
        table = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)
    inputs = {**transformer._cp_plan[""], "timestep": ContextParallelInput(split_dim=1, expected_dims=2)}
    return {**transformer._cp_plan, "": inputs, "rope": {0: table, 1: table}, "cross_attn_rope": {0: table, 1: table}}


def share_key_mask_across_heads() -> None:
    """LTX-2's attention processors repeat the prompt's key mask once per head (`prepare_attention_mask`, then a
    (B, heads, 1, keys) view); under Ulysses a rank attends with heads / N of them, which that shape does not
    broadcast to. Every head's row is the same, so the first is passed for all: the attention is unchanged.
    Installed once on `transformer_ltx2`'s `dispatch_attention_fn`, acting only on a split call (a parallel
    config) with a per-head mask."""
    from diffusers.models.transformers import transformer_ltx2

    dispatch = transformer_ltx2.dispatch_attention_fn
    if getattr(dispatch, "shares_key_mask", False):
        return

    @functools.wraps(dispatch)
    def dispatched(*args, attn_mask=None, parallel_config=None, **kwargs):
        if attn_mask is not None and parallel_config is not None and attn_mask.ndim == 4 and attn_mask.shape[1] > 1:
            attn_mask = attn_mask[:, :1]
        return dispatch(*args, attn_mask=attn_mask, parallel_config=parallel_config, **kwargs)

    dispatched.shares_key_mask = True
    transformer_ltx2.dispatch_attention_fn = dispatched


# A plan, or a function of the transformer that makes it (by its config).
PLANS = {"HunyuanVideoTransformer3DModel": HUNYUAN_VIDEO_PLAN,
         "HunyuanVideo15Transformer3DModel": HUNYUAN_VIDEO_15_PLAN,
         "LTX2VideoTransformer3DModel": ltx2_plan}
# The processor each plan needs instead of the transformer's own, if any.
PROCESSORS = {"HunyuanVideo15Transformer3DModel": HunyuanVideo15KeyMaskProcessor}
# What a plan needs set up before the split, if anything.
SETUP = {"LTX2VideoTransformer3DModel": share_key_mask_across_heads}
# The forward arguments whose token counts add up to the text a plan splits (the count varies per prompt).
TEXT_INPUTS = {
    "HunyuanVideoTransformer3DModel": ("encoder_hidden_states",),
    "HunyuanVideo15Transformer3DModel": ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds"),
    "LTX2VideoTransformer3DModel": ("encoder_hidden_states",),
}
# Plans whose attention takes a mask: ring attention does not carry one (Ulysses only).
MASKED = {"HunyuanVideo15Transformer3DModel", "LTX2VideoTransformer3DModel"}
# Transformers whose plan is right only without an attention mask (see HUNYUAN_VIDEO_PLAN).
NEEDS_NO_MASK = {"HunyuanVideoTransformer3DModel"}


def plan_for(transformer) -> dict | None:
    """The plan that splits `transformer`: this module's for its class, else diffusers' own, else None."""
    plan = PLANS.get(type(transformer).__name__)
    if callable(plan):
        return plan(transformer)
    return plan or getattr(transformer, "_cp_plan", None)
