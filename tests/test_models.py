"""The model registry, and each family's tiny build run through the real diffusers pipeline classes."""

import inspect
import json
import typing
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from diffusers.loaders.lora_base import LoraBaseMixin
from PIL import Image

from pipeline import models, tiny
from pipeline.models import FAMILIES, MEMORY_PRESETS, MODELS, MODES

PROMPT = "a red fox runs through the snow"


def pipeline_class(entry, mode):
    return getattr(diffusers, entry.pipeline_class_name(mode))


def call_params(cls) -> set[str]:
    return set(inspect.signature(cls.__call__).parameters)


@pytest.mark.parametrize("entry", models.ENTRIES, ids=lambda e: e.id)
def test_entry_is_well_formed(entry):
    family = FAMILIES[entry.family]
    assert set(entry.modes) <= set(MODES) and entry.modes
    assert entry.inputs in ("text", "image", "both")
    assert entry.hub_repo.count("/") == 1
    assert entry.default_frames % entry.frame_multiple == 1 and entry.max_frames % entry.frame_multiple == 1
    assert 1 <= entry.default_frames <= entry.max_frames
    assert entry.fps > 0 and entry.default_steps >= 1 and entry.default_guidance >= 1.0
    assert set(entry.vram_gb) == set(MEMORY_PRESETS)
    assert all(v is None or v > 0 for v in entry.vram_gb.values())
    assert "default" in entry.dtypes and all(isinstance(d, torch.dtype) for d in entry.torch_dtypes().values())
    for mode in entry.modes:
        cls = pipeline_class(entry, mode)
        params = call_params(cls)
        assert issubclass(cls, LoraBaseMixin) == entry.lora
        assert family.lora_loader in (None, *(base.__name__ for base in cls.__mro__))
        assert ("guidance_scale" in params) == (family.guidance == "guidance_scale")
        assert ("guider" in inspect.signature(cls.__init__).parameters) == (family.guidance == "guider")
        assert ("callback_on_step_end" in params) == family.step_callback
        assert ("image" in params) == (mode == "i2v")
        assert {"prompt", "num_frames", "num_inference_steps", "generator", "output_type"} <= params
        if mode == "i2v":
            assert ("height" not in params) == entry.size_from_image
        assert (entry.default_guidance_2 is not None) <= ("guidance_scale_2" in params)


def transformer_class(pipeline):
    """The transformer class a pipeline class takes (Wan's is annotated `WanTransformer3DModel | None`)."""
    annotation = inspect.signature(pipeline.__init__).parameters["transformer"].annotation
    return next(c for c in (annotation, *typing.get_args(annotation)) if isinstance(c, type))


@pytest.mark.parametrize("entry", models.ENTRIES, ids=lambda e: e.id)
def test_the_speed_facts_are_what_diffusers_does(entry):
    """First Block Cache needs every pipeline of the model to open a cache_context and its main block in diffusers'
    TransformerBlockRegistry; regional compile needs `_repeated_blocks`. Checked against diffusers' own classes,
    so a diffusers upgrade that changes one fails here."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()
    registered = {c.__name__ for c in TransformerBlockRegistry._registry}
    classes = [pipeline_class(entry, mode) for mode in entry.modes]
    transformers = {transformer_class(cls) for cls in classes}
    takes_fbc = all("cache_context" in inspect.getsource(cls.__call__) for cls in classes) and all(
        t._repeated_blocks[0] in registered for t in transformers)
    assert ("fbc" in entry.caches) == takes_fbc
    assert set(entry.caches) <= {"fbc", "magcache"} and ("magcache" in entry.caches) <= takes_fbc
    assert all(bool(t._repeated_blocks) for t in transformers) == FAMILIES[entry.family].regional_compile
    assert entry.fp8_share is None or 0 < entry.fp8_share <= 1


@pytest.mark.parametrize("entry", models.ENTRIES, ids=lambda e: e.id)
def test_presets_obey_the_size_multiple_and_their_aspect_label(entry):
    labels = [p.label for p in entry.presets]
    assert entry.presets and len(set(labels)) == len(labels)
    for preset in entry.presets:
        assert preset.width % entry.size_multiple == 0 and preset.height % entry.size_multiple == 0, preset
        tier, aspect = preset.label.split()
        w, h = (int(n) for n in aspect.split(":"))
        assert abs(Fraction(preset.width, preset.height) / Fraction(w, h) - 1) < 0.04, preset
        lines = int(tier.removesuffix("p"))  # a tier is a pixel count: that of a 16:9 frame `lines` high
        assert abs(preset.width * preset.height / (lines * lines * 16 / 9) - 1) < 0.1, preset


def test_lookup_by_id_and_tiny_name():
    assert models.get("wan2.2-ti2v-5b") is MODELS["wan2.2-ti2v-5b"]
    assert models.get("tiny:wan2.2-ti2v-5b") is MODELS["wan2.2-ti2v-5b"]
    assert models.split_tiny("tiny:wan2.1-t2v-1.3b") == ("wan2.1-t2v-1.3b", True)
    assert models.split_tiny("tiny") == (models.DEFAULT_MODEL, True)
    assert models.split_tiny("wan2.1-t2v-1.3b") == ("wan2.1-t2v-1.3b", False)
    assert models.DEFAULT_MODEL == "hunyuanvideo" and models.ENTRIES[0].id == "hunyuanvideo"
    with pytest.raises(KeyError, match="unknown model 'sora'.*hunyuanvideo"):
        models.get("sora")
    assert [e.inputs for e in (MODELS["hunyuanvideo"], MODELS["wan2.2-i2v-a14b"], MODELS["wan2.2-ti2v-5b"])] == \
        ["text", "image", "both"]


def test_tiny_model_dir_builds_once_and_keeps_the_hunyuanvideo_folder(tmp_path):
    folder = models.tiny_model_dir(tmp_path, "tiny:wan2.1-t2v-1.3b")
    assert folder == tmp_path / "tiny" / "wan2.1-t2v-1.3b"
    assert (folder / "model_index.json").is_file() and (folder / "transformer").is_dir()
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert models.tiny_model_dir(tmp_path, "wan2.1-t2v-1.3b") == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp  # cached, not rebuilt
    hunyuan = models.tiny_model_dir(tmp_path)  # as its first callers use it: the tiny HunyuanVideo, same folder
    assert hunyuan == tmp_path / "tiny" / "HunyuanVideo" == models.tiny_model_dir(tmp_path, "tiny")
    assert json.loads((hunyuan / "model_index.json").read_text())["_class_name"] == "HunyuanVideoPipeline"


def test_the_tiny_builders_do_not_import_the_registry_back():
    """The registry names each id's tiny builder; pipeline/tiny.py imports nothing of pipeline/, so no cycle."""
    import ast

    tree = ast.parse(open(tiny.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    # pipeline.loading (the construction lock) imports nothing of pipeline/ itself.
    assert not {name for name in imported if name == "pipeline" or name.startswith("pipeline.")} - \
        {"pipeline.loading"}, imported
    assert "from pipeline" not in open(Path(tiny.__file__).with_name("loading.py")).read()


@pytest.mark.parametrize("entry,mode", [(e, m) for e in models.ENTRIES for m in e.modes],
                         ids=lambda v: getattr(v, "id", v))
def test_adapter_passes_only_arguments_the_pipeline_takes(entry, mode):
    """Every keyword the adapter builds is a parameter of the pipeline's __call__; guidance goes where it belongs."""
    from diffusers.guiders import ClassifierFreeGuidance

    holder = SimpleNamespace(guider=ClassifierFreeGuidance(guidance_scale=1.0))
    image = gradient("a", 32) if mode == "i2v" else None
    kwargs = models.prepare_call(holder, entry, prompt=PROMPT, num_frames=9, steps=2, width=64, height=64,
                                 guidance=7.5, negative_prompt="blurry", image=image, generator=None)
    params = call_params(pipeline_class(entry, mode))
    assert set(kwargs) <= params, set(kwargs) - params
    guided_by_call = FAMILIES[entry.family].guidance == "guidance_scale"
    assert kwargs.get("guidance_scale") == (7.5 if guided_by_call else None)
    assert holder.guider.guidance_scale == (1.0 if guided_by_call else 7.5)
    assert ("width" in kwargs) == (mode == "t2v" or not entry.size_from_image)
    assert kwargs.get("guidance_scale_2") == entry.default_guidance_2
    assert ("true_cfg_scale" in kwargs) == (entry.family == "hunyuanvideo")


# --- the tiny builds, each loaded by its registry class and run for 2 steps ---------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Build on first use, once per module: {id: folder}."""
    root = tmp_path_factory.mktemp("tiny-models")
    built = {}

    def get(model_id):
        if model_id not in built:
            built[model_id] = models.tiny_model_dir(root, model_id)
        return built[model_id]

    return get


@pytest.fixture(scope="module")
def load(tiny_dirs):
    loaded = {}

    def get(model_id):
        if model_id not in loaded:
            entry = MODELS[model_id]
            pipe = pipeline_class(entry, entry.modes[0]).from_pretrained(tiny_dirs(model_id))
            pipe.set_progress_bar_config(disable=True)
            loaded[model_id] = pipe
        return loaded[model_id]

    return get


def gradient(kind: str, size: int) -> Image.Image:
    """Two different smooth pictures of the same size."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.stack([x, y, 1 - x], -1) if kind == "a" else np.stack([1 - y, 1 - x, y * x], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def generate(pipe, entry, mode, size, call_defaults, image=None, frames=5):
    """Two denoising steps through the registry's adapter, as the service calls diffusers.

    Returns the frames (F, C, H, W) in [0, 1] and, where the pipeline has step callbacks, the latents
    after the last step.
    """
    pipe = models.pipeline_for(pipe, entry, mode)
    kwargs = models.prepare_call(pipe, entry, prompt=PROMPT, num_frames=frames, steps=2, width=size, height=size,
                                 image=image, generator=torch.Generator().manual_seed(0), output_type="pt")
    params = call_params(type(pipe))
    kwargs.update({k: v for k, v in call_defaults.items() if k in params})
    last = {}
    if FAMILIES[entry.family].step_callback:
        kwargs["callback_on_step_end"] = lambda p, i, t, tensors: last.update(tensors) or tensors
    with torch.inference_mode():
        return pipe(**kwargs).frames[0], last.get("latents")


@pytest.mark.parametrize("model_id", list(MODELS))
def test_tiny_build_keeps_the_real_rules(load, model_id):
    """Each tiny folder loads with the registry's class and accepts every size and frame count the real model does."""
    entry = MODELS[model_id]
    pipe = load(model_id)
    assert type(pipe).__name__ == entry.pipeline_class_name(entry.modes[0])
    transformer = pipe.transformer
    patch = transformer.config.patch_size
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    # LTX-2's pipelines name their VAE's compression differently from the others'.
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_spatial_compression_ratio
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) or pipe.vae_temporal_compression_ratio
    assert entry.size_multiple % (spatial * patch) == 0
    assert temporal == entry.frame_multiple
    assert (getattr(pipe, "transformer_2", None) is not None) == (entry.default_guidance_2 is not None)
    if entry.family == "hunyuanvideo15":
        assert pipe.guider.guidance_scale == entry.default_guidance


# One run per distinct tiny build (ids that differ only in config share a builder); the tiny HunyuanVideo
# runs in test_generate.py.
RUNS = [
    ("hunyuanvideo-1.5-480p", "t2v"),
    ("hunyuanvideo-1.5-480p-i2v-distilled", "i2v"),
    ("hunyuanvideo-i2v", "i2v"),
    ("wan2.2-ti2v-5b", "t2v"),
    ("wan2.2-ti2v-5b", "i2v"),
    ("wan2.2-t2v-a14b", "t2v"),
    ("wan2.2-i2v-a14b", "i2v"),
    ("wan2.1-t2v-1.3b", "t2v"),
]


@pytest.fixture(scope="module")
def runs(tiny_dirs, load):
    """Each run, generated once: (id, mode) -> (frames (F, C, H, W), last latents or None)."""
    done = {}

    def get(model_id, mode):
        if (model_id, mode) not in done:
            entry = MODELS[model_id]
            size = 2 * entry.size_multiple
            image = gradient("a", size) if mode == "i2v" else None
            folder_config = json.loads((tiny_dirs(model_id) / tiny.FOLDER_CONFIG).read_text())
            done[model_id, mode] = generate(load(model_id), entry, mode, size, folder_config.get("call_defaults", {}),
                                            image=image)
        return done[model_id, mode]

    return get


@pytest.mark.parametrize("model_id,mode", RUNS)
def test_tiny_build_generates_frames(load, runs, model_id, mode):
    entry = MODELS[model_id]
    video, _ = runs(model_id, mode)
    size = 2 * entry.size_multiple
    image = gradient("a", size) if mode == "i2v" else None
    width, height = models.size_for_image(load(model_id), entry, image, size, size)
    assert video.shape == (5, 3, height, width)
    assert torch.isfinite(video).all() and 0 <= video.min() and video.max() <= 1
    assert video.std() > 1e-3  # not a constant picture


def test_wan_ti2v_first_frame_is_the_input_image(load, runs):
    """Wan TI2V (expand_timesteps) keeps the image's latent as the first latent frame, and its causal VAE decodes
    frame 0 from that frame alone: frame 0 is the input image as this VAE reproduces it, not another image.

    (A random-weight VAE does not give a picture back, so the reference is the VAE round trip of each image.)
    """
    entry = MODELS["wan2.2-ti2v-5b"]
    size = 2 * entry.size_multiple
    frame0 = runs(entry.id, "i2v")[0][0]
    pipe = load(entry.id)

    def round_trip(image):
        x = pipe.video_processor.preprocess(image, size, size).unsqueeze(2)
        with torch.inference_mode():
            return (pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample[0, :, 0] / 2 + 0.5).clamp(0, 1)

    mse_own = float(((frame0 - round_trip(gradient("a", size))) ** 2).mean())
    mse_other = float(((frame0 - round_trip(gradient("b", size))) ** 2).mean())
    assert mse_own * 100 < mse_other, (mse_own, mse_other)
    assert mse_own < 1e-8
    t2v_frame0 = runs(entry.id, "t2v")[0][0]
    assert float(((t2v_frame0 - frame0) ** 2).mean()) > mse_other  # without the image, frame 0 is elsewhere


def test_hunyuanvideo_i2v_first_latent_frame_is_the_input_image(load, runs):
    """HunyuanVideo-I2V's token replace keeps the image's latent as the first latent frame through every step.
    Its VAE's group norms span all frames, so the decoded frame 0 is compared in latent space."""
    entry = MODELS["hunyuanvideo-i2v"]
    size = 2 * entry.size_multiple
    _, latents = runs(entry.id, "i2v")
    pipe = load(entry.id)

    def latent(image):
        x = pipe.video_processor.preprocess(image, size, size).unsqueeze(2)
        with torch.inference_mode():
            return pipe.vae.encode(x).latent_dist.mode()[0, :, 0] * pipe.vae.config.scaling_factor

    first = latents[0, :, 0]
    own, other = latent(gradient("a", size)), latent(gradient("b", size))
    assert torch.allclose(first, own, atol=1e-5)
    assert float(((first - other) ** 2).mean()) > 1e-3


def test_image_mode_shares_modules_and_keeps_their_dtypes(load):
    """Wan TI2V's image pipeline shares the loaded modules; unlike `from_pipe` it casts none of them."""
    entry = MODELS["wan2.2-ti2v-5b"]
    pipe = load(entry.id)
    pipe.transformer.to(torch.bfloat16)
    try:
        image_pipe = models.pipeline_for(pipe, entry, "i2v")
        assert type(image_pipe).__name__ == "WanImageToVideoPipeline"
        assert image_pipe.transformer is pipe.transformer and image_pipe.vae is pipe.vae
        assert image_pipe.transformer.dtype == torch.bfloat16 and image_pipe.vae.dtype == torch.float32
        assert image_pipe.config.expand_timesteps is True
        assert models.pipeline_for(pipe, entry, "t2v") is pipe
    finally:
        pipe.transformer.to(torch.float32)


def test_a_folder_is_served_and_loaded_as_one_id(tmp_path):
    """The registry id of a folder is decided by one rule, for /models and for loading alike: a Wan folder
    (three ids share WanPipeline) is known by its Hub name or its id, and any other name is refused
    with the names to use, never loaded as whichever id came first."""
    import shutil

    from config import ConfigError
    from pipeline.generate import resolve_model

    built = models.tiny_model_dir(tmp_path, "tiny:wan2.1-t2v-1.3b")
    hub_named = shutil.copytree(built, tmp_path / MODELS["wan2.1-t2v-1.3b"].folder_name)
    assert models.model_id_for_folder(hub_named) == "wan2.1-t2v-1.3b"
    assert resolve_model(str(hub_named), tmp_path)[0].id == "wan2.1-t2v-1.3b"
    odd = shutil.copytree(built, tmp_path / "my-wan")
    with pytest.raises(ConfigError, match="name the folder as its Hub folder"):
        resolve_model(str(odd), tmp_path)


def test_the_fp8_share_in_the_registry_is_what_bench_fp8_share_measures():
    """Full-size transformers built on the meta device (no weights): the registry's figure is the measured one."""
    import importlib.util

    path = Path(__file__).parents[1] / "bench" / "fp8_share.py"
    spec = importlib.util.spec_from_file_location("bench_fp8_share", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    measured = {model_id: bench.fp8_share(*bench.CONFIGS[model_id])["fp8_share"]
                for model_id in ("wan2.1-t2v-1.3b", "hunyuanvideo-1.5-480p-i2v-distilled", "hunyuanvideo")}
    assert measured == {model_id: MODELS[model_id].fp8_share for model_id in measured}
    assert measured["hunyuanvideo"] < 0.75  # the AdaLN modulation Linears stay in bf16 ("norm" skip pattern)
