"""The memory plan (`pipeline.memory`): its figures per family against the published peaks it is built
from, the `auto` preset chosen per job, the reload when a job needs a smaller preset, and HunyuanVideo-1.5's
dense masks (counted, and steered to a varlen kernel)."""

import pytest
import torch

from pipeline import families, generate, memory, models, speed
from pipeline.generate import VideoGenerator
from pipeline.spec import JobParams
from pipeline.speed import SpeedOptions

GB, GiB = 10**9, 2**30


def plan(model_id, preset, width=None, height=None, frames=None, **options):
    entry = models.MODELS[model_id]
    width, height = width or entry.default_preset.width, height or entry.default_preset.height
    return memory.estimate(entry.memory, preset, width, height, frames or entry.default_frames, **options)


def test_every_registry_entry_has_a_memory_model_and_smaller_presets_never_need_more():
    for entry in models.ENTRIES:  # a new family (LTX-2) must bring its own
        assert isinstance(entry.memory, memory.MemoryModel), entry.id
        peaks = [plan(entry.id, p).peak for p in memory.PRESETS]
        assert peaks == sorted(peaks, reverse=True) and peaks[-1] > 0, entry.id


def test_hunyuan_video_matches_its_published_model_offload_peaks():
    # HunyuanVideo README: 60 GB at 720x1280x129f and 45 GB at 544x960x129f with model offload.
    assert plan("hunyuanvideo", "model", 1280, 720, 129).peak / GB == pytest.approx(60, abs=1)
    assert plan("hunyuanvideo", "model", 960, 544, 129).peak / GB == pytest.approx(45, abs=1)
    everything = plan("hunyuanvideo", "none", 1280, 720, 129)  # + Llama-3-8B, CLIP and the VAE resident
    assert everything.phase == "denoising" and 74 < everything.peak / GB < 78
    assert plan("hunyuanvideo-i2v", "model", 1280, 720, 129).peak / GB == pytest.approx(60, abs=1)


def test_hunyuan_video_15_counts_its_dense_masks():
    est = plan("hunyuanvideo-1.5-720p", "model", 1280, 720, 121)
    assert est.tokens == 31 * 45 * 80 + 1985  # 31 latent frames of 45x80, plus text, glyph and image tokens
    assert est.mask == 2 * est.tokens**2 and 12.5 < est.tokens**2 / GB < 13.5  # ~13 GB per bool tensor
    native = plan("hunyuanvideo-1.5-720p", "model", 1280, 720, 121, varlen=False)
    assert native.mask == 5 * est.tokens**2 and native.peak - est.peak == 3 * est.tokens**2
    # On an 80 GB card: the whole pipeline does not fit at 720p; model offload does, with a varlen kernel only.
    card = 80 * GB
    assert not plan("hunyuanvideo-1.5-720p", "none").fits(card)
    assert est.fits(card) and not native.fits(card)
    # HunyuanVideo-1.5 README: 14 GB minimum with offloading; at 480p the streaming presets come near it.
    assert 12 < plan("hunyuanvideo-1.5-480p", "sequential").peak / GB < 20


def test_wan_stays_within_its_published_cards():
    # Wan2.2 README: TI2V-5B runs at 1280x704 on 24 GB, A14B at 1280x720 on 80 GB (with model offload).
    assert plan("wan2.2-ti2v-5b", "model").fits(24 * GB)
    assert plan("wan2.2-t2v-a14b", "model").fits(80 * GB) and plan("wan2.2-i2v-a14b", "model").fits(80 * GB)
    both = plan("wan2.2-t2v-a14b", "none")  # both experts resident: 2 x 14.3e9 bf16
    assert both.peak - plan("wan2.2-t2v-a14b", "none", fp8=True).peak == pytest.approx(2 * 0.984 * 14.29e9, rel=1e-3)
    assert not both.fits(80 * GB)


@pytest.mark.parametrize("free_gb, size, expected", [
    (80, (960, 544, 129), "none"),
    (64, (960, 544, 129), "model"),
    (64, (1280, 720, 33), "none"),  # a short clip at 720p fits whole
    (40, (1280, 720, 129), "sequential"),
    (24, (960, 544, 129), "group"),
    (16, (1280, 720, 129), None),
])
def test_auto_picks_the_fastest_preset_that_fits_the_job(free_gb, size, expected):
    assert memory.choose_preset(models.MODELS["hunyuanvideo"].memory, *size, free_gb * GB) == expected


def test_what_fits_names_fewer_frames_a_smaller_size_and_the_preset():
    message = memory.what_fits(models.MODELS["hunyuanvideo"], 1280, 720, 129, 24 * GB)
    assert message.startswith("hunyuanvideo at 1280x720, 129 frames needs about 36 GB")
    assert "with 73 frames at 1280x720 (group) or 960x544 at 129 frames (group)" in message


# ------------------------------------------------------------------ the preset per job, on a "GPU" (the CPU)

@pytest.fixture
def fake_gpu(monkeypatch):
    """Load the tiny build as if for CUDA with `free` bytes free: placement is recorded, the weights stay here."""
    free = [64 * GB]
    monkeypatch.setattr(generate, "use_device", lambda device: None)
    monkeypatch.setattr(generate, "component_dtypes", lambda device, entry=None: {"default": torch.float32})
    monkeypatch.setattr(generate, "free_vram_bytes", lambda device: free[0])
    monkeypatch.setattr(generate, "apply_memory_preset", lambda pipe, preset, device: None)
    return free


def job(width, height, frames):
    return JobParams.from_dict({"prompt": "a fox", "width": width, "height": height, "num_frames": frames})


def test_the_generator_plans_its_preset_for_the_job_that_loads_it(data_dir, tiny_model, fake_gpu):
    # The tiny build plans as its registry entry: full-size HunyuanVideo.
    assert VideoGenerator("tiny", data_dir, device="cuda:0").memory_preset == "model"  # default job, 64 GB
    small = VideoGenerator("tiny", data_dir, device="cuda:0", job=job(1280, 720, 33))
    assert small.memory_preset == "none"
    assert small.needs_smaller_preset(job(1280, 720, 129)) and not small.needs_smaller_preset(job(960, 544, 33))
    fixed = VideoGenerator("tiny", data_dir, device="cuda:0", memory="none", job=job(1280, 720, 33))
    assert not fixed.needs_smaller_preset(job(1280, 720, 129))  # an operator's T2V_MEMORY is kept


def test_models_reload_with_a_smaller_preset_only_when_a_job_needs_it(data_dir, tiny_model, fake_gpu, monkeypatch):
    from config import Settings
    from pipeline.run import Models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    loaded = Models(Settings.from_env(env={}, model="tiny", data_dir=data_dir))
    first = loaded.generator_for(None, job(1280, 720, 33))
    assert first.memory_preset == "none" and loaded.generator_for(None, job(960, 544, 33)) is first
    bigger = loaded.generator_for(None, job(1280, 720, 129))
    assert bigger is not first and bigger.memory_preset == "group"
    assert loaded.generator_for(None, job(1280, 720, 33)) is bigger  # a smaller job keeps the loaded preset


# ------------------------------------------------------------------ HunyuanVideo-1.5's dense masks (item 6)

def test_dense_mask_pipelines_get_a_varlen_kernel_and_never_a_prompt_trim(monkeypatch):
    assert families.DENSE_MASK_PIPELINES == {"HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"}
    assert not families.DENSE_MASK_PIPELINES & set(families.PROMPT_TRIMS)
    monkeypatch.setattr(speed, "attention_backend_problem",
                        lambda name, masked: None if name == "flash_varlen" else f"{name} is not installed")
    dense = [e for e in models.ENTRIES if set(e.pipelines.values()) & families.DENSE_MASK_PIPELINES]
    assert {e.family for e in dense} == {"hunyuanvideo15"}
    for entry in dense:
        assert speed.resolve_speed(SpeedOptions(), entry, "cuda:0", "model").attention_backend == "flash_varlen"
        assert speed.resolve_speed(SpeedOptions(attention_backend="native"), entry, "cuda:0",
                                      "model").attention_backend == "native"  # an explicit setting wins
        assert speed.resolve_speed(SpeedOptions(), entry, "cpu", "none").attention_backend == "native"
    plain = speed.resolve_speed(SpeedOptions(), models.MODELS["hunyuanvideo"], "cuda:0", "model")
    assert plain.attention_backend == "native"
