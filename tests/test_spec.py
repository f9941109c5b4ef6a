import pytest

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
