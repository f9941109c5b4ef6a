"""Mask-free attention for one prompt: the trimmed prompt gives the same video as the padded, masked one,
attention receives no mask, and a backend that cannot take a mask is refused at load while one is passed."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_hunyuan_video

from pipeline.generate import VideoGenerator
from pipeline.spec import JobParams
from pipeline.speed import SpeedOptions
from random_models import WIDE, hunyuan_variant

# Same seed, trimmed vs padded+masked prompt: the padded tokens never reach a real token (the mask hides
# them as keys, and every other operation is per token), so only float summation order differs.
LATENT_ATOL = 1e-5  # on latents of unit scale; measured here: below 4e-7
FRAME_MAX_LEVELS = 1  # uint8 levels, after the VAE decode


def params(**kw):
    base = dict(prompt="a red fox runs through the snow", width=64, height=64, num_frames=9, num_inference_steps=3,
                seed=3)
    return JobParams.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def wide_model(data_dir, tiny_model):
    return str(hunyuan_variant(data_dir, "HunyuanVideo-wide", WIDE))


@pytest.fixture(scope="module")
def generators(data_dir, tiny_model, wide_model):
    """(model, mask_free) -> generator, for the tiny and the wide model, trimmed and masked."""
    return {(name, mask_free): VideoGenerator(model, data_dir, speed=SpeedOptions(mask_free=mask_free))
            for name, model in (("tiny", "tiny"), ("wide", wide_model)) for mask_free in (True, False)}


def run(generator, job, path):
    frames = generator.generate(job, latents_path=path)
    return frames, torch.load(path)["latents"]


@pytest.mark.parametrize("model", ["tiny", "wide"])
@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_trimmed_prompt_gives_the_same_video_as_the_masked_one(generators, model, negative, tmp_path):
    job = params(negative_prompt=negative)
    trimmed, trimmed_latents = run(generators[model, True], job, tmp_path / "trimmed.pt")
    masked, masked_latents = run(generators[model, False], job, tmp_path / "masked.pt")
    assert trimmed.shape == masked.shape == (9, 64, 64, 3)
    assert trimmed_latents.abs().mean() > 0.1  # real latents, not zeros
    torch.testing.assert_close(trimmed_latents, masked_latents, atol=LATENT_ATOL, rtol=0)
    assert np.abs(trimmed.astype(int) - masked.astype(int)).max() <= FRAME_MAX_LEVELS
    other_seed = generators[model, True].generate(params(negative_prompt=negative, seed=4))
    assert np.abs(other_seed.astype(int) - trimmed.astype(int)).mean() > 1  # the comparison can tell videos apart


@contextlib.contextmanager
def attention_masks(generator, monkeypatch):
    """Yield a list that fills with the `attn_mask` of every attention call inside the transformer: the
    backend dispatcher (dual and single blocks) and plain SDPA (the token refiner's own attention)."""
    masks, inside = [], [False]
    transformer = generator.pipe.transformer
    handles = [transformer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
               transformer.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    real_dispatch, real_sdpa = transformer_hunyuan_video.dispatch_attention_fn, F.scaled_dot_product_attention

    def dispatch(*args, **kwargs):
        masks.append(("dispatch", kwargs.get("attn_mask")))
        return real_dispatch(*args, **kwargs)

    def sdpa(*args, **kwargs):
        if inside[0]:
            masks.append(("sdpa", kwargs.get("attn_mask", args[3] if len(args) > 3 else None)))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(transformer_hunyuan_video, "dispatch_attention_fn", dispatch)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    try:
        yield masks
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("model", ["tiny", "wide"])
def test_attention_receives_no_mask_for_a_trimmed_prompt(generators, model, monkeypatch):
    with attention_masks(generators[model, True], monkeypatch) as masks:
        generators[model, True].generate(params(num_inference_steps=2))
    assert {source for source, _ in masks} == {"dispatch", "sdpa"}
    assert all(mask is None for _, mask in masks)
    with attention_masks(generators[model, False], monkeypatch) as masks:  # the spy does see masks
        generators[model, False].generate(params(num_inference_steps=2))
    assert masks and all(mask is not None for _, mask in masks)


def test_a_mask_free_backend_runs_once_the_prompt_is_trimmed(data_dir, tiny_model):
    # PyTorch's own flash kernel (it has a CPU build) rejects any attention mask.
    gen = VideoGenerator("tiny", data_dir, speed=SpeedOptions(attention_backend="_native_flash"))
    assert gen.generate(params(num_inference_steps=2)).shape == (9, 64, 64, 3)


def test_a_mask_free_backend_becomes_a_mask_capable_one_while_a_mask_is_passed(data_dir, tiny_model):
    # Before: set_attention_backend accepted it and the job failed at its first step; then it was refused at load,
    # which broke every job of such a model on a worker that serves several. Now the model gets the nearest
    # mask-capable backend (PyTorch's SDPA here) and runs.
    gen = VideoGenerator("tiny", data_dir, speed=SpeedOptions(attention_backend="_native_flash", mask_free=False))
    assert gen.speed.mask_free is False and gen.speed.attention_backend == "native"
    assert gen.generate(params(num_inference_steps=1)).shape == (9, 64, 64, 3)


def test_a_family_without_a_trim_keeps_its_mask(data_dir, tiny_model, monkeypatch):
    from pipeline import families, models

    monkeypatch.setattr(families, "PROMPT_TRIMS", {})
    monkeypatch.setattr(models, "TRIMMED_PIPELINES", frozenset())
    gen = VideoGenerator("tiny", data_dir)
    assert gen.speed.mask_free is False
    assert gen.generate(params(num_inference_steps=1)).shape == (9, 64, 64, 3)


def test_wan_takes_a_mask_free_backend_whatever_t2v_mask_free_says(data_dir):
    # Before: mask_free was keyed on PROMPT_TRIMS, so Wan (which never passes a mask) was refused at load.
    gen = VideoGenerator("tiny:wan2.2-ti2v-5b", data_dir,
                         speed=SpeedOptions(attention_backend="_native_flash", mask_free=False))
    assert gen.speed.mask_free is True
    job = params(num_inference_steps=2, width=64, height=64, num_frames=5)
    assert gen.generate(job.model_copy(update={"model": "wan2.2-ti2v-5b"})).shape == (5, 64, 64, 3)
