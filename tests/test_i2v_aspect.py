"""Image-to-video keeps the image's aspect: Wan and HunyuanVideo-I2V get the image centre-cropped to the video's
aspect (their pipelines resize to width x height, which would stretch it), and HunyuanVideo-1.5, which sizes its
video by the image, has the size it rendered recorded with the result (tiny builds)."""

import numpy as np
import pytest
from PIL import Image

from config import Settings
from pipeline.models import tiny_model_dir
from pipeline.generate import VideoGenerator
from pipeline.run import Models, run_job
from pipeline.spec import JobParams

WAN, HV_I2V, HV15_I2V = "wan2.2-ti2v-5b", "hunyuanvideo-i2v", "hunyuanvideo-1.5-480p-i2v-distilled"


def params(width, height, **kw):
    return JobParams.from_dict({"prompt": "a red fox", "width": width, "height": height, "num_frames": 5,
                                "num_inference_steps": 1, "seed": 3, "upscale": False, **kw})


def white_middle(width: int, height: int) -> Image.Image:
    """White in the middle half of the width, black at both ends: only a centre crop stays all white."""
    x = np.zeros((height, width, 3), np.uint8)
    x[:, width // 4: 3 * width // 4] = 255
    return Image.fromarray(x)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aspect")
    for model_id in (WAN, HV_I2V, HV15_I2V):
        tiny_model_dir(folder, model_id)
    return folder


@pytest.mark.parametrize("model_id, width, height", [(WAN, 64, 32), (HV_I2V, 48, 32)])
def test_the_pipeline_gets_the_image_centre_cropped_to_the_videos_aspect(data_dir, monkeypatch, model_id, width,
                                                                         height):
    generator = VideoGenerator(f"tiny:{model_id}", data_dir)
    processor = generator.pipes["i2v"].video_processor
    seen, real = [], processor.preprocess
    monkeypatch.setattr(processor, "preprocess", lambda image, *a, **k: seen.append(image) or real(image, *a, **k))
    image = white_middle(2 * width, height)  # twice as wide as the video: its middle half is the video's aspect
    frames = generator.generate(params(width, height), image=image)
    assert frames.shape == (5, height, width, 3)
    given = np.asarray(seen[0])
    assert given.shape == (height, width, 3)
    assert given.min() >= 250  # all of it from the white middle; a stretch would keep the black ends


def test_hunyuanvideo_15_records_the_size_it_rendered_from_the_image(data_dir, tmp_path):
    settings = Settings.from_env(env={}, model="tiny", upscaler="none", data_dir=data_dir, output_dir=tmp_path)
    models = Models(settings)
    job = params(64, 64)  # the request's size; the image's aspect picks the bucket
    image = white_middle(32, 96)  # portrait
    rendered = models.generator_for(HV15_I2V).output_size(job, image)
    assert rendered[1] > rendered[0] and rendered != (64, 64)
    result = run_job(job, settings, models=models, output=tmp_path / "hv15.mp4", model=HV15_I2V, image=image)
    assert result.rendered == rendered == (result.width, result.height)
    assert generator_image_whole(models.generator_for(HV15_I2V), image)


def generator_image_whole(generator, image) -> bool:
    """HunyuanVideo-1.5 gets the image uncropped: its own bucket keeps the aspect."""
    from pipeline.generate import fit_image

    return fit_image(image, generator.entry, 64, 64).size == image.size
