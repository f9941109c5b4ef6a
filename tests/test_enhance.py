"""Prompt enhancement, never silent: POST /prompts/enhance runs the model's own enhancer (LTX-2's
`enhance_prompt`, its Gemma text encoder) on a worker as a short job, and hands back a suggestion; the user's
video job then renders the prompt they chose, and its record keeps the user's own. The CLI prints the suggestion
and asks first (--enhance-prompt, --yes)."""

import pytest
from diffusers import LTX2Pipeline
from PIL import Image

from conftest import wait_for
from pipeline import models as registry
from pipeline.generate import JobCanceled
from pipeline.run import fit_prompt
from test_cli_models import run_script
from test_models_api import data_uri, picture

LTX = "ltx-2.3"
PROMPT = "a red fox runs through the snow"
VIDEO = {"model": LTX, "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 1, "upscale": False}


def finished(client, ref):
    return wait_for(lambda: (j := client.get(f"/jobs/{ref}").json)["status"] in ("completed", "failed") and j,
                    timeout=300)


def enhance(client, body):
    r = client.post("/prompts/enhance", json=body)
    assert r.status_code == 202, r.json
    assert r.headers["Location"].endswith(f"/jobs/{r.json['reference_id']}")
    return finished(client, r.json["reference_id"])


@pytest.fixture
def rendered_prompts(monkeypatch):
    """The prompts LTX-2's pipeline encodes, as the transformer gets them."""
    seen = []
    encode = LTX2Pipeline.encode_prompt

    def spy(self, prompt, *args, **kwargs):
        seen.append(prompt if isinstance(prompt, str) else prompt[0])
        return encode(self, prompt, *args, **kwargs)

    monkeypatch.setattr(LTX2Pipeline, "encode_prompt", spy)
    return seen


def test_the_api_suggests_a_prompt_and_the_video_renders_the_one_the_user_chose(make_app, rendered_prompts):
    app, _ = make_app()
    client = app.test_client()
    job = enhance(client, {"prompt": PROMPT, "model": LTX, "seed": 3})
    assert job["status"] == "completed", job["error"]
    assert job["kind"] == "enhance" and job["video_url"] is None
    suggestion = job["result"]["prompt"]
    assert suggestion.strip() and suggestion != PROMPT
    assert job["result"]["original_prompt"] == PROMPT and job["result"]["seed"] == 3
    assert not rendered_prompts, "an enhance job renders nothing"
    for route in (f"/jobs/{job['reference_id']}/video", f"/jobs/{job['reference_id']}/poster"):
        r = client.get(route)
        assert r.status_code == 404 and "enhance job" in r.json["error"]["message"]

    r = client.post("/generate_video", json={**VIDEO, "prompt": suggestion, "original_prompt": PROMPT})
    assert r.status_code == 200, r.json
    video = finished(client, r.json["reference_id"])
    assert video["status"] == "completed", video["error"]
    assert rendered_prompts == [suggestion]
    assert (video["params"]["prompt"], video["params"]["original_prompt"]) == (suggestion, PROMPT)

    r = client.post("/generate_video", json={**VIDEO, "prompt": PROMPT})  # ignored: the user's own prompt
    assert finished(client, r.json["reference_id"])["params"]["original_prompt"] is None
    assert rendered_prompts[-1] == PROMPT


def test_the_same_seed_gives_the_same_suggestion_and_an_image_reaches_the_enhancer(tiny_models, monkeypatch):
    generator = tiny_models.generator_for(registry.TINY_PREFIX + LTX)
    assert generator.enhance_prompt(PROMPT, 5) == generator.enhance_prompt(PROMPT, 5)
    calls = []
    generate = type(generator.pipe.text_encoder).generate
    monkeypatch.setattr(type(generator.pipe.text_encoder), "generate",
                        lambda self, **kw: calls.append(sorted(kw)) or generate(self, **kw))
    text = generator.enhance_prompt(PROMPT, 5, image=Image.new("RGB", (96, 64), (200, 30, 30)))
    assert text.strip()
    assert "pixel_values" in calls[0], "the enhancer looks at the image"


def test_an_image_reaches_an_enhance_job_through_the_api(make_app):
    app, _ = make_app()
    client = app.test_client()
    job = enhance(client, {"prompt": PROMPT, "model": LTX, "image": data_uri(picture(size=(64, 64)))})
    assert job["status"] == "completed", job["error"]
    assert job["params"]["image_key"] and job["result"]["prompt"].strip()


def test_a_model_without_an_enhancer_is_a_400_naming_it_and_models_say_which_have_one(make_app):
    app, _ = make_app(worker=False)
    client = app.test_client()
    r = client.post("/prompts/enhance", json={"prompt": PROMPT, "model": "wan2.2-ti2v-5b"})
    assert r.status_code == 400
    assert r.json["error"]["message"] == "wan2.2-ti2v-5b: model has no prompt enhancer (the LTX-2 models have one)"
    r = client.post("/prompts/enhance", json={"prompt": " ", "model": LTX})
    assert r.status_code == 400 and r.json["error"]["message"] == "prompt: must not be blank"
    flags = {m["id"]: m["prompt_enhancer"] for m in client.get("/models").json["models"]}
    assert flags["ltx-2.3"] and flags["ltx-2.5"] and not flags["hunyuanvideo"] and not flags["wan2.2-ti2v-5b"]
    assert app.extensions["t2v"].jobs.count_queued() == 0


def test_a_cancel_stops_the_enhancer_within_a_token(tiny_models):
    generator = tiny_models.generator_for(registry.TINY_PREFIX + LTX)
    asked = []

    def canceled():
        asked.append(True)
        return len(asked) > 2

    with pytest.raises(JobCanceled):
        generator.enhance_prompt(PROMPT, 5, should_cancel=canceled)
    assert len(asked) <= 4, f"the generation went on after the cancel ({len(asked)} checks)"


def test_an_empty_suggestion_fails_the_job_with_its_own_code(make_app, monkeypatch):
    from pipeline import families

    monkeypatch.setitem(families.PROMPT_ENHANCERS, "LTX2Pipeline", lambda *args, **kwargs: " \n ")
    app, _ = make_app()
    job = enhance(app.test_client(), {"prompt": PROMPT, "model": LTX})
    assert job["status"] == "failed"
    assert job["error"]["code"] == "empty_suggestion"


def test_a_suggestion_is_cut_at_a_word_to_fit_the_prompt_limit():
    assert fit_prompt("  a fox\n\nin  snow ", 100) == "a fox in snow"
    assert fit_prompt("a red fox runs", 10) == "a red fox"
    assert fit_prompt("abcdefghijkl", 5) == "abcde"


@pytest.mark.parametrize("answer,rendered", [("y\n", "suggestion"), ("\n", "suggestion"), ("n\n", "yours")])
def test_the_command_line_prints_the_suggestion_and_asks_before_it_renders(tmp_path, data_dir, answer, rendered):
    registry.tiny_model_dir(data_dir, LTX)
    proc = run_script("test.py", "--model", f"tiny:{LTX}", "--prompt", PROMPT, "--steps", "1", "--seed", "4",
                      "--enhance-prompt", "--output", "clip.mp4", cwd=tmp_path, T2V_DATA_DIR=str(data_dir),
                      input=answer)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    suggestion = lines[lines.index(f"suggested prompt ({LTX}'s enhancer):") + 1].strip()
    assert suggestion and suggestion != PROMPT
    assert "render it instead of yours? [Y/n]" in proc.stdout
    assert f"rendering {'the suggestion' if rendered == 'suggestion' else 'your prompt'}" in proc.stdout
    assert (tmp_path / "clip.mp4").stat().st_size > 0


def test_the_command_line_takes_the_suggestion_with_yes_and_refuses_what_cannot_run(tmp_path, data_dir):
    registry.tiny_model_dir(data_dir, LTX)
    base = ("test.py", "--model", f"tiny:{LTX}", "--prompt", PROMPT, "--steps", "1", "--output", "clip.mp4")
    env = dict(cwd=tmp_path, T2V_DATA_DIR=str(data_dir))
    taken = run_script(*base, "--enhance-prompt", "--yes", **env, input="")
    assert taken.returncode == 0, taken.stderr
    assert "[Y/n]" not in taken.stdout and "rendering the suggestion" in taken.stdout

    closed = run_script(*base, "--enhance-prompt", **env, input="")
    assert closed.returncode == 2
    assert closed.stderr.strip().splitlines()[-1] == (
        "test.py: error: no answer on stdin to take the suggestion or not; pass --yes to take it without asking")

    lone = run_script(*base, "--yes", **env)
    assert lone.returncode == 2 and "--yes takes the suggestion of --enhance-prompt" in lone.stderr

    silent = run_script("test.py", "--model", "tiny:wan2.2-ti2v-5b", "--prompt", PROMPT, "--enhance-prompt", **env)
    assert silent.returncode == 2
    assert silent.stderr.strip().splitlines()[-1] == (
        "test.py: error: --enhance-prompt: wan2.2-ti2v-5b: model has no prompt enhancer (the LTX-2 models have one)")


def test_an_overlong_prompt_is_refused_by_its_length_before_its_pattern_is_tried():
    """The prompt pattern backtracks in time that grows with the square of the text: a long prompt with a NUL in
    it is refused for its length first, as a generate job's is (pydantic checks max_length there first)."""
    from pipeline.spec import EnhanceParams, ParamError

    with pytest.raises(ParamError) as refused:
        EnhanceParams.from_dict({"prompt": "a" * 5000 + "\x00", "model": LTX})
    assert str(refused.value) == "prompt: must be at most 2000 characters, got 5001"


def test_a_tiny_folder_of_an_older_build_is_built_again_with_the_processor(tmp_path):
    """A tiny LTX-2 made before prompt suggestions has no processor: its enhance jobs could only fail. Its t2v.json
    says no build (1), so its next use builds it again, and the old files go."""
    import json
    import shutil

    from pipeline import tiny

    folder = registry.tiny_model_dir(tmp_path, LTX)
    shutil.rmtree(folder / "processor")
    config = json.loads((folder / tiny.FOLDER_CONFIG).read_text())
    del config["build"]
    (folder / tiny.FOLDER_CONFIG).write_text(json.dumps(config))
    assert tiny.tiny_build(folder) == 1

    assert registry.tiny_model_dir(tmp_path, LTX) == folder
    assert (folder / "processor").is_dir() and tiny.tiny_build(folder) == tiny.TINY_BUILD
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [LTX], "nothing stale is left beside it"
    assert LTX2Pipeline.from_pretrained(folder).processor is not None
