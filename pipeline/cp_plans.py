"""Context-parallel plans for the transformers diffusers 0.42.1 ships without one (its `_cp_plan`).

A plan names, per submodule, which tensor to split across the ranks of a group (along the token axis) and
where to gather the result back (diffusers' `ContextParallelInput` / `ContextParallelOutput`, read by
`hooks/context_parallel.py`). Wan's and LTX's plans are diffusers' own; this module holds the rest, keyed by
transformer class, beside the family's other adapters (`models.prepare_call`, `generate.PROMPT_TRIMS`).
"""

from __future__ import annotations

from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

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

PLANS = {"HunyuanVideoTransformer3DModel": HUNYUAN_VIDEO_PLAN}
# Transformers whose plan splits the text tokens too: their count varies per prompt.
SPLITS_TEXT = {"HunyuanVideoTransformer3DModel"}
# Transformers whose plan is right only without an attention mask (see HUNYUAN_VIDEO_PLAN).
NEEDS_NO_MASK = {"HunyuanVideoTransformer3DModel"}


def plan_for(transformer) -> dict | None:
    """The plan that splits `transformer`: this module's for its class, else diffusers' own, else None."""
    return PLANS.get(type(transformer).__name__) or getattr(transformer, "_cp_plan", None)
