"""Context-parallel plans for the transformers diffusers 0.42.1 ships without one (its `_cp_plan`).

A plan names, per submodule, which tensor to split across the ranks of a group (along the token axis) and
where to gather the result back (diffusers' `ContextParallelInput` / `ContextParallelOutput`, read by
`hooks/context_parallel.py`). Wan's and LTX's plans are diffusers' own; this module holds the rest, keyed by
transformer class, beside the family's other adapters (`models.prepare_call`, `families.PROMPT_TRIMS`).
"""

from __future__ import annotations

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


PLANS = {"HunyuanVideoTransformer3DModel": HUNYUAN_VIDEO_PLAN,
         "HunyuanVideo15Transformer3DModel": HUNYUAN_VIDEO_15_PLAN}
# The processor each plan needs instead of the transformer's own, if any.
PROCESSORS = {"HunyuanVideo15Transformer3DModel": HunyuanVideo15KeyMaskProcessor}
# The forward arguments whose token counts add up to the text a plan splits (the count varies per prompt).
TEXT_INPUTS = {
    "HunyuanVideoTransformer3DModel": ("encoder_hidden_states",),
    "HunyuanVideo15Transformer3DModel": ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds"),
}
# Plans whose attention takes a mask: ring attention does not carry one (Ulysses only).
MASKED = {"HunyuanVideo15Transformer3DModel"}
# Transformers whose plan is right only without an attention mask (see HUNYUAN_VIDEO_PLAN).
NEEDS_NO_MASK = {"HunyuanVideoTransformer3DModel"}


def plan_for(transformer) -> dict | None:
    """The plan that splits `transformer`: this module's for its class, else diffusers' own, else None."""
    return PLANS.get(type(transformer).__name__) or getattr(transformer, "_cp_plan", None)
