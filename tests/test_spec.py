from pathlib import Path

import pytest

import config
from pipeline.spec import JobParams, Limits, ParamError


def test_defaults_and_seed_is_picked_and_recorded():
    p = JobParams.from_dict({"prompt": "a red fox"})
    assert (p.width, p.height, p.num_frames, p.fps, p.num_inference_steps, p.guidance_scale) == (960, 544, 129, 24, 30, 6.0)
    assert p.upscale is True and p.outscale == 4
    assert isinstance(p.seed, int) and 0 <= p.seed < 2**32
    assert p.to_dict()["seed"] == p.seed


@pytest.mark.parametrize("body, field, rule", [
    ({}, "prompt", "required"),
    ({"prompt": "   "}, "prompt", "blank"),
    ({"prompt": "x" * 2001}, "prompt", "at most 2000"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": "a\x00b"}, "prompt", "NUL"),
    ({"prompt": "a", "width": 1000}, "width", "multiple of 16"),
    ({"prompt": "a", "height": 1296}, "height", "between 16 and 1280"),
    ({"prompt": "a", "width": "960"}, "width", "integer"),
    ({"prompt": "a", "width": True}, "width", "integer"),
    ({"prompt": "a", "num_frames": 10}, "num_frames", "4k+1"),
    ({"prompt": "a", "num_frames": 133}, "num_frames", "between 1 and 129"),
    ({"prompt": "a", "fps": 0}, "fps", "between 1 and 60"),
    ({"prompt": "a", "num_inference_steps": 101}, "num_inference_steps", "between 1 and 100"),
    ({"prompt": "a", "seed": -1}, "seed", "between"),
    ({"prompt": "a", "upscale": "yes"}, "upscale", "true or false"),
    ({"prompt": "a", "outscale": 3}, "outscale", "2 or 4"),
    ({"prompt": "a", "guidance_scale": "high"}, "guidance_scale", "number"),
    ({"prompt": "a", "colour": "red"}, "colour", "not a known parameter"),
])
def test_errors_name_the_field_and_the_rule(body, field, rule):
    with pytest.raises(ParamError) as err:
        JobParams.from_dict(body)
    assert err.value.field == field
    assert rule in str(err.value)


def test_non_object_body_is_rejected():
    with pytest.raises(ParamError, match="JSON object"):
        JobParams.from_dict(["prompt"])


def test_limits_from_settings_tighten_the_rules():
    limits = Limits(max_prompt_chars=10, max_side=256, max_frames=17, max_steps=8)
    with pytest.raises(ParamError, match="at most 10"):
        JobParams.from_dict({"prompt": "x" * 11}, limits)
    with pytest.raises(ParamError, match="between 16 and 256"):
        JobParams.from_dict({"prompt": "x", "width": 272}, limits)
    p = JobParams.from_dict({"prompt": "x", "width": 256, "height": 144}, limits)
    assert p.num_frames == 17  # the default follows the cap


def test_explicit_values_are_kept():
    p = JobParams.from_dict({"prompt": "fox", "negative_prompt": "blur", "width": 64, "height": 48,
                             "num_frames": 9, "fps": 8, "num_inference_steps": 4, "seed": 7,
                             "upscale": False, "outscale": 2, "guidance_scale": 3})
    assert (p.negative_prompt, p.width, p.height, p.num_frames, p.fps, p.seed, p.upscale, p.outscale) == \
        ("blur", 64, 48, 9, 8, 7, False, 2)
    assert p.guidance_scale == 3.0


# --- per model: the registry's rules and defaults, named in the errors ------------------------------------------

import io  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402

import jsonschema  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.models import MODELS  # noqa: E402
from pipeline.spec import (  # noqa: E402
    Rules, check_image, describe, form_values, job_class, load_image, model_rules, request_schema,
)


@pytest.mark.parametrize("body, field, message", [
    ({"model": "wan2.2-ti2v-5b", "num_frames": 10}, "num_frames",
     "wan2.2-ti2v-5b: num_frames must be of the form 4k+1 (1, 5, 9, ... 121), got 10"),
    ({"model": "wan2.2-ti2v-5b", "width": 48}, "width", "wan2.2-ti2v-5b: width must be a multiple of 32, got 48"),
    ({"model": "wan2.1-t2v-1.3b", "num_frames": 85}, "num_frames",
     "wan2.1-t2v-1.3b: num_frames must be between 1 and 81, got 85"),
    ({"model": "sora"}, "model", "model: unknown model 'sora'; known: hunyuanvideo, "),
    ({"model": 3}, "model", "model: must be a string"),
    ({"model": "hunyuanvideo", "image_key": "inputs/abcdefgh"}, "image_key", "set by the server"),
    ({"model": "wan2.2-i2v-a14b"}, "image", "wan2.2-i2v-a14b: image is required: this model makes video from an image"),
    ({"model": "hunyuanvideo-1.5-480p", "loras": [{"name": "fast"}]}, "loras",
     "hunyuanvideo-1.5-480p: loras are not supported: diffusers 0.42.1 has no LoRA loader for HunyuanVideo15Pipeline"),
    ({"loras": [{"name": "slow"}]}, "loras[0].name", "loras[0].name: is not an installed LoRA: 'slow'; installed: fast"),
    ({"loras": [{"name": "fast", "scale": 5}]}, "loras[0].scale", "must be between -4.0 and 4.0, got 5"),
    ({"loras": [{"name": "fast"}, {"name": "fast"}]}, "loras", "loras: names the LoRA fast twice"),
    ({"loras": [{"name": "fast", "path": "/etc/passwd"}]}, "loras[0].path", "is not a known parameter"),
    ({"loras": "fast"}, "loras", "must be a list"),
])
def test_model_rules_and_their_messages(body, field, message):
    with pytest.raises(ParamError) as err:
        JobParams.from_dict({"prompt": "a fox", **body}, Rules(loras=("fast",)))
    assert err.value.field == field
    assert message in str(err.value)


def test_a_request_without_model_keeps_the_old_messages_and_defaults():
    """Existing clients (no `model`) get HunyuanVideo, its defaults and the error wording they always had."""
    p = JobParams.from_dict({"prompt": "a red fox"})
    assert (p.model, p.loras, p.image_key) == ("hunyuanvideo", [], None)
    with pytest.raises(ParamError, match=r"^num_frames: must be of the form 4k\+1 \(1, 5, 9, ... 129\), got 10$"):
        JobParams.from_dict({"prompt": "a", "num_frames": 10})


@pytest.mark.parametrize("model_id", list(MODELS))
def test_each_model_gets_its_own_defaults(model_id):
    entry = MODELS[model_id]
    image_key = None if entry.inputs == "text" else "inputs/abcdefgh"
    p = JobParams.from_dict({"prompt": "a fox", "model": model_id}, image_key=image_key)
    preset = entry.presets[0]
    assert (p.width, p.height) == (preset.width, preset.height)
    assert (p.num_frames, p.fps, p.num_inference_steps, p.guidance_scale) == \
        (entry.default_frames, entry.fps, entry.default_steps, entry.default_guidance)
    assert p.image_key == image_key and JobParams(**p.to_dict()) == p  # the worker rebuilds it from the record


def test_image_rules_follow_the_models_inputs():
    both, text = "wan2.2-ti2v-5b", "hunyuanvideo"
    assert JobParams.from_dict({"prompt": "a", "model": both}).image_key is None
    assert JobParams.from_dict({"prompt": "a", "model": both}, image_key="inputs/abcdefgh").image_key == "inputs/abcdefgh"
    with pytest.raises(ParamError, match="hunyuanvideo: image is not taken: this model makes video from text only"):
        JobParams.from_dict({"prompt": "a", "model": text}, image_key="inputs/abcdefgh")


def test_only_served_models_are_accepted():
    rules = Rules(models=("wan2.1-t2v-1.3b",), default_model="wan2.1-t2v-1.3b")
    assert JobParams.from_dict({"prompt": "a"}, rules).model == "wan2.1-t2v-1.3b"  # the deployment's default
    with pytest.raises(ParamError, match="hunyuanvideo is not installed on this server \\(it serves: wan2.1-t2v-1.3b\\)"):
        JobParams.from_dict({"prompt": "a", "model": "hunyuanvideo"}, rules)
    with pytest.raises(ParamError, match="it serves: none"):
        JobParams.from_dict({"prompt": "a"}, Rules(models=()))


def test_loras_are_kept_with_their_scale():
    p = JobParams.from_dict({"prompt": "a", "model": "wan2.1-t2v-1.3b", "loras": [{"name": "fast", "scale": 0.5}]},
                            Rules(loras=("fast", "style")))
    assert p.to_dict()["loras"] == [{"name": "fast", "scale": 0.5}]
    with pytest.raises(ParamError, match="at most 4 LoRAs"):
        JobParams.from_dict({"prompt": "a", "loras": [{"name": n} for n in "abcde"]}, Rules(loras=tuple("abcde")))


# --- tiny means small ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_id", list(MODELS))
def test_tiny_builds_default_to_seconds_of_cpu_work(model_id):
    image_key = None if MODELS[model_id].inputs == "text" else "inputs/abcdefgh"
    p = JobParams.from_dict({"prompt": "a fox", "model": model_id}, Rules(tiny=True), image_key=image_key)
    assert (p.width, p.height, p.num_frames, p.num_inference_steps) == (64, 64, 9, 4)
    m = model_rules(Rules(tiny=True), model_id)
    assert (m.max_side, m.max_frames) == (256, 33)
    assert [(s.label, s.width, s.height) for s in m.presets] == \
        [("tiny 1:1", 64, 64), ("tiny 2:1", 128, 64), ("tiny 1:2", 64, 128)]


def test_tiny_caps_and_deployment_caps_both_apply():
    with pytest.raises(ParamError, match="width: must be between 16 and 256, got 272"):
        JobParams.from_dict({"prompt": "a", "width": 272}, Rules(tiny=True))
    with pytest.raises(ParamError, match="num_frames: must be between 1 and 33, got 37"):
        JobParams.from_dict({"prompt": "a", "num_frames": 37}, Rules(tiny=True))
    small = Rules(tiny=True, limits=Limits(max_side=64, max_frames=5, max_steps=2))
    p = JobParams.from_dict({"prompt": "a"}, small)
    assert (p.width, p.height, p.num_frames, p.num_inference_steps) == (64, 64, 5, 2)
    assert [(s.width, s.height) for s in model_rules(small, "hunyuanvideo").presets] == [(64, 64)]


def test_presets_that_do_not_fit_are_scaled_and_labelled_with_their_real_aspect():
    presets = model_rules(Rules(limits=Limits(max_side=64)), "hunyuanvideo").presets
    assert [(p.label, p.width, p.height) for p in presets] == \
        [("small 2:1", 64, 32), ("small 1:2", 32, 64), ("small 1:1", 64, 64)]
    presets = model_rules(Rules(limits=Limits(max_side=512)), "wan2.2-ti2v-5b").presets
    assert [(p.label, p.width, p.height) for p in presets] == [("small 16:9", 512, 288), ("small 9:16", 288, 512)]


def test_describe_is_what_the_validation_does():
    rules = Rules(tiny=True)
    d = describe(rules, "wan2.2-ti2v-5b")
    assert d["inputs"] == "both" and d["lora"] is True and d["tiny"] is True
    assert d["defaults"] == {"width": 64, "height": 64, "num_frames": 9, "fps": 24, "num_inference_steps": 4,
                             "guidance_scale": 5.0}
    assert d["limits"]["size_multiple"] == 32 and d["limits"]["max_frames"] == 33
    p = JobParams.from_dict({"prompt": "a", "model": "wan2.2-ti2v-5b"}, rules)
    assert {k: getattr(p, k) for k in d["defaults"]} == d["defaults"]
    assert describe(Rules(), "hunyuanvideo-1.5-480p")["lora"] is False


@pytest.mark.parametrize("model_id, cache, mask_free", [
    ("hunyuanvideo", ["fbc", "magcache"], True), ("hunyuanvideo-i2v", [], False),
    ("hunyuanvideo-1.5-720p", [], False), ("wan2.2-t2v-a14b", ["fbc"], True), ("wan2.2-ti2v-5b", ["fbc"], True),
])
def test_describe_says_which_speed_features_each_model_gets(model_id, cache, mask_free):
    speed = describe(Rules(), model_id)["speed"]
    assert speed["cache"] == cache and speed["mask_free"] is mask_free
    assert speed["compile"] is True and speed["fp8"] is True
    assert speed["fp8_share"] == MODELS[model_id].fp8_share


@pytest.mark.parametrize("mask_free, expected", [
    (True, {"hunyuanvideo": "flash", "hunyuanvideo-i2v": "flash_varlen", "hunyuanvideo-1.5-480p": "flash_varlen",
            "wan2.2-ti2v-5b": "flash"}),
    (False, {"hunyuanvideo": "flash_varlen", "hunyuanvideo-i2v": "flash_varlen",
             "hunyuanvideo-1.5-480p": "flash_varlen", "wan2.2-ti2v-5b": "flash"}),
])
def test_describe_says_which_attention_backend_each_model_gets(monkeypatch, mask_free, expected):
    monkeypatch.setattr(config, "attention_backend_problem", lambda name, masked: None)  # flash-attn installed
    rules = Rules(attention_backend="flash", mask_free=mask_free)
    assert {model_id: describe(rules, model_id)["speed"]["attention_backend"] for model_id in expected} == expected
    assert describe(Rules(), "hunyuanvideo")["speed"]["attention_backend"] is None  # none named: the preset picks


# --- the schema is generated from the same classes ---------------------------------------------------------------

RULES = Rules(loras=("fast",), models=("hunyuanvideo", "wan2.2-ti2v-5b", "wan2.1-t2v-1.3b", "hunyuanvideo-1.5-480p"))
PROBES = [
    {"prompt": "a"}, {"prompt": " "}, {"prompt": "a\x00"}, {"prompt": "a", "model": "wan2.2-ti2v-5b"},
    {"prompt": "a", "model": "wan2.2-ti2v-5b", "width": 48}, {"prompt": "a", "model": "wan2.2-ti2v-5b", "width": 64},
    {"prompt": "a", "width": 48}, {"prompt": "a", "model": "wan2.1-t2v-1.3b", "num_frames": 85},
    {"prompt": "a", "num_frames": 85}, {"prompt": "a", "num_frames": 86}, {"prompt": "a", "num_frames": 133},
    {"prompt": "a", "model": "sora"}, {"prompt": "a", "loras": [{"name": "fast"}]},
    {"prompt": "a", "loras": [{"name": "slow"}]}, {"prompt": "a", "model": "hunyuanvideo-1.5-480p", "loras": [{"name": "fast"}]},
    {"prompt": "a", "loras": [{"name": "fast", "scale": 4.5}]}, {"prompt": "a", "outscale": 3}, {"prompt": "a", "outscale": 2},
    {"prompt": "a", "seed": 2**32}, {"prompt": "a", "seed": None}, {"prompt": "a", "negative_prompt": None},
    {"prompt": "a", "upscale": 1}, {"prompt": "a", "guidance_scale": 0.5}, {"prompt": "a", "fps": 61},
    {"prompt": "a", "colour": "red"}, {"prompt": "a", "image_key": "inputs/abcdefgh"}, {"prompt": "x" * 2001},
    {"prompt": "a", "model": "wan2.2-i2v-a14b"}, {"prompt": "a", "num_inference_steps": 100},
]


@pytest.mark.parametrize("body", PROBES, ids=lambda b: str(b)[:60])
def test_schema_and_validation_agree(body):
    """A body the generated schema accepts is accepted by from_dict, and the other way round."""
    schema = request_schema(RULES)
    schema_ok = jsonschema.Draft202012Validator(schema).is_valid(body)
    try:
        JobParams.from_dict(body, RULES)
        valid = True
    except ParamError:
        valid = False
    assert schema_ok == valid


def test_schema_carries_each_models_bounds_and_defaults():
    defs = request_schema(RULES)["$defs"]
    wan = defs["Job_wan2_2-ti2v-5b"]["properties"]
    assert (wan["width"]["multipleOf"], wan["width"]["default"], wan["num_frames"]["maximum"]) == (32, 1280, 121)
    assert defs["Job_wan2_2-ti2v-5b"]["required"] == ["prompt", "model"]  # only the default model's may go
    assert defs["Job_hunyuanvideo"]["required"] == ["prompt"]
    assert defs["Job_hunyuanvideo-1_5-480p"]["properties"]["loras"]["maxItems"] == 0
    assert "image_key" not in defs["Job_hunyuanvideo"]["properties"]
    assert job_class(RULES, "wan2.2-ti2v-5b") is job_class(RULES, "wan2.2-ti2v-5b")  # built once per deployment


def test_form_values_read_numbers_and_booleans_from_text():
    values = form_values({"prompt": "42", "model": "true", "width": "64", "upscale": "false", "seed": "null",
                          "guidance_scale": "4.5", "loras": '[{"name": "fast"}]', "fps": "", "height": "wide"})
    assert values == {"prompt": "42", "model": "true", "width": 64, "upscale": False, "seed": None,
                      "guidance_scale": 4.5, "loras": [{"name": "fast"}], "height": "wide"}


# --- input images ------------------------------------------------------------------------------------------------

def encoded(fmt: str, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 60) if mode == "RGB" else 0).save(buf, fmt)
    return buf.getvalue()


def png(width: int, height: int, rows: int | None = None) -> bytes:
    """A 1-bit grayscale PNG of `width` x `height` whose IDAT holds `rows` zero rows (all of them by default):
    a few KB that decode to width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(height if rows is None else rows)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_accepted(fmt, tmp_path):
    info = check_image(encoded(fmt), max_pixels=40 * 30)
    assert (info.format, info.width, info.height) == (fmt, 40, 30)
    (tmp_path / "i").write_bytes(encoded(fmt, mode="L"))
    image = load_image(tmp_path / "i")
    assert image.mode == "RGB" and image.size == (40, 30)


@pytest.mark.parametrize("data, message", [
    (encoded("GIF"), "not a decodable PNG, JPEG or WebP"),
    (encoded("BMP"), "not a decodable PNG, JPEG or WebP"),
    (b"hello, not an image", "not a decodable PNG, JPEG or WebP"),
    (encoded("PNG")[:60], "not a decodable PNG, JPEG or WebP"),  # truncated
    (encoded("JPEG")[:200], "not a decodable PNG, JPEG or WebP"),
    (encoded("PNG", size=(41, 30)), "is 41x30, 1230 pixels; the cap is 1200 (T2V_MAX_IMAGE_PIXELS)"),
])
def test_bad_or_large_images_are_refused(data, message):
    with pytest.raises(ParamError) as err:
        check_image(data, max_pixels=1200)
    assert err.value.field == "image" and message in str(err.value)


def test_decompression_bombs_are_refused_before_decoding():
    # 5000 x 5000 claimed, one row of data: the header alone is enough to refuse it (a decoder would fail instead).
    with pytest.raises(ParamError, match="is 5000x5000, 25000000 pixels; the cap is 16777216"):
        check_image(png(5000, 5000, rows=1), max_pixels=4096 * 4096)
    bomb = png(20000, 20000)  # 400 million pixels in about 60 KB
    assert len(bomb) < 100_000
    with pytest.raises(ParamError, match="too many pixels"):
        check_image(bomb, max_pixels=4096 * 4096)
    assert check_image(png(64, 48), max_pixels=4096).width == 64  # the same builder makes a good PNG


def test_validating_a_job_never_imports_torch():
    """The CLI checks its flags, and the API its requests, before torch is loaded (seconds on a cold start)."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.spec import JobParams, Rules; "
            "JobParams.from_dict({'prompt': 'a', 'model': 'wan2.2-ti2v-5b'}, Rules(tiny=True)); "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]
