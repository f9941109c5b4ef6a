"""What differs per family beyond the pipeline call (`models.prepare_call`): trimming the prompt's padding,
decoding kept latents, LTX-2's soundtrack, packed step latents and prompt enhancer. One small function each,
looked up by the pipeline's class name in the tables at the end; a family without one takes the generic path.
"""

from __future__ import annotations

import torch

from pipeline import models
from pipeline.spec import JobParams
from pipeline.video import Audio


def trim_hunyuan_video_prompt(pipe, prompt: str, negative_prompt: str | None, call_kwargs: dict) -> dict:
    """Encode the prompt (and negative prompt) with the pipeline's own `encode_prompt`, then cut the
    padding off. For one prompt the text then has no padding token, so its mask is all ones and the
    transformer blocks get no mask at all (see `_BlockHook`): SDPA's flash and cuDNN kernels apply."""
    encode = {k: call_kwargs[k] for k in ("prompt_template", "max_sequence_length") if k in call_kwargs}

    def encoded(text: str):
        embeds, pooled, mask = pipe.encode_prompt(prompt=text, device=pipe._execution_device, **encode)
        length = int(mask[0].sum())
        if not bool(mask[0, :length].all()):  # padding on the left: cannot cut it off the end
            raise ValueError("the tokenizer pads on the left")
        return embeds[:, :length], pooled, mask[:, :length]

    embeds, pooled, mask = encoded(prompt)
    trimmed = dict(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, prompt_attention_mask=mask)
    if negative_prompt:
        embeds, pooled, mask = encoded(negative_prompt)
        trimmed.update(negative_prompt=None, negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled,
                       negative_prompt_attention_mask=mask)
    return trimmed


def decode_hunyuan_video(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> (F, C, H, W) floats in [0, 1], as HunyuanVideoPipeline decodes them."""
    latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
    video = pipe.vae.decode(latents, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="pt")[0]


def decode_ltx2_video(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> (F, C, H, W) floats in [0, 1], as LTX2Pipeline decodes them at its default decode_timestep
    of 0 (no noise is mixed in; a timestep-conditioned VAE is told 0)."""
    vae = pipe.vae
    timestep = None
    if vae.config.timestep_conditioning:
        timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=vae.dtype)
    video = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="pt")[0]


def decode_ltx2_audio(pipe, audio_latents: torch.Tensor) -> Audio:
    """Audio latents -> the waveform, as LTX2Pipeline decodes them: the audio VAE makes a mel spectrogram, the
    vocoder the samples, at the vocoder's own rate (`output_sampling_rate`)."""
    mel = pipe.audio_vae.decode(audio_latents.to(pipe.audio_vae.dtype), return_dict=False)[0]
    waveform = pipe.vocoder(mel.to(pipe.vocoder.dtype))[0]  # (channels, samples)
    return Audio(waveform.float().cpu().numpy(), int(pipe.vocoder.config.output_sampling_rate))


def unpack_ltx2_latents(pipe, params: JobParams, latents: torch.Tensor) -> torch.Tensor:
    """LTX-2's step latents are packed into tokens (B, sequence, C): back to (B, C, F, H, W) for a preview."""
    frames = (params.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1
    height, width = (side // pipe.vae_spatial_compression_ratio for side in (params.height, params.width))
    return pipe._unpack_latents(latents, frames, height, width, pipe.transformer_spatial_patch_size,
                                pipe.transformer_temporal_patch_size)


class EnhancerUnavailable(RuntimeError):
    """The loaded model cannot suggest a prompt here; the message says why."""


def enhance_ltx2_prompt(pipe, prompt: str, image, seed: int, should_cancel=None, **options) -> str:
    """LTX-2's own suggestion (`enhance_prompt`), with Lightricks' system prompt for text or for an image: LTX-2.5's
    for its dedicated Gemma 4 enhancer, else those of LTX-2 and 2.3, whose Gemma 3 text encoder writes it. A
    cancel stops the generation at its next token. `options`: a folder's own (a tiny build's shorter length)."""
    from diffusers.pipelines.ltx2 import utils
    from transformers import StoppingCriteria, StoppingCriteriaList

    if getattr(pipe, "processor", None) is None:
        raise EnhancerUnavailable("the model folder has no `processor` (the Gemma processor its enhancer needs; a tiny "
                                  "build made before t2v had prompt suggestions gets one when its folder is deleted)")
    dedicated = getattr(pipe, "prompt_enhancer", None) is not None
    config = utils.GEMMA4_PROMPT_ENHANCEMENT_CONFIG if dedicated else utils.GEMMA3_PROMPT_ENHANCEMENT_CONFIG
    kind = "T2V" if image is None else "I2V"
    system_prompt = getattr(utils, f"LTX2_5_{kind}_DEFAULT_SYSTEM_PROMPT" if dedicated else f"{kind}_DEFAULT_SYSTEM_PROMPT")

    class Canceled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_cancel and should_cancel()), device=input_ids.device)

    generation = {**config.generation_kwargs, "stopping_criteria": StoppingCriteriaList([Canceled()])}
    return pipe.enhance_prompt(prompt, system_prompt, seed=seed, image=image, generation_kwargs=generation,
                               max_new_tokens=options.get("max_new_tokens"))[0]


# Keyed by the pipeline's class name. Other families (Wan, HunyuanVideo-1.5) could add theirs here; without
# one, a pipeline decodes inside its own call and its padded prompt keeps its mask.
PROMPT_TRIMS = {"HunyuanVideoPipeline": trim_hunyuan_video_prompt}
LATENT_DECODERS = {"HunyuanVideoPipeline": decode_hunyuan_video, "LTX2Pipeline": decode_ltx2_video,
                   "LTX2ImageToVideoPipeline": decode_ltx2_video}
# Pipelines that denoise a soundtrack with the video (returned as latents beside the video's, then decoded here).
AUDIO_DECODERS = {"LTX2Pipeline": decode_ltx2_audio, "LTX2ImageToVideoPipeline": decode_ltx2_audio}
# Pipelines with a prompt enhancer (`models.ENHANCING_PIPELINES`).
PROMPT_ENHANCERS = {"LTX2Pipeline": enhance_ltx2_prompt}
# Pipelines whose step latents are packed: the unpacking a preview needs.
LATENT_UNPACKERS = {"LTX2Pipeline": unpack_ltx2_latents, "LTX2ImageToVideoPipeline": unpack_ltx2_latents}
# Pipelines whose transformer builds dense (B, 1, N, N) masks in every block (HunyuanVideo-1.5). Never give
# them a prompt trim: their processor pads the mask and passes it whatever the prompt.
DENSE_MASK_PIPELINES = frozenset(name for entry in models.ENTRIES if entry.memory.dense_mask
                                 for name in entry.pipelines.values())
