"""One clip across a group of 2 gloo ranks (pipeline/parallel.py) on the tiny builds, through `run_job`.

Each family that splits makes, on 2 ranks, the frames one process makes from the same seed (within one uint8
level); rank 1 returns no video and writes no file; a model that does not split runs on rank 0 alone and says
so; a cancel that rank 0 decides stops both ranks at the same transformer block. The ranks are spawned with
torch.multiprocessing; each writes what it saw to a file the test reads.
"""

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from diffusers import LTX2Pipeline
from PIL import Image

from config import Settings
from pipeline import models as registry
from pipeline import parallel, run
from pipeline.generate import JobCanceled
from pipeline.run import Models, run_job
from pipeline.spec import JobParams
from test_lora import make_lora

HV, HV_I2V = "hunyuanvideo", "hunyuanvideo-i2v"
WAN_5B, WAN_A14B, WAN_21 = "wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.1-t2v-1.3b"
HV15, HV15_I2V = "hunyuanvideo-1.5-480p", "hunyuanvideo-1.5-480p-i2v-distilled"
LTX, LTX_I2V = "ltx-2.3", "ltx-2.3:i2v"  # a job name: a model id, and `:i2v` for one started from an image
SPLIT = (HV, HV15, HV15_I2V, WAN_5B, WAN_A14B, WAN_21, LTX, LTX_I2V)
SIZES = {HV: (32, 32), HV_I2V: (32, 32), HV15: (48, 32), HV15_I2V: (48, 32), WAN_5B: (64, 32), WAN_A14B: (32, 32),
         WAN_21: (48, 32), LTX: (64, 64)}
FRAMES = {LTX: 9}  # LTX-2's frame rule is 8k+1; the others take 5


def model_of(name: str) -> str:
    return name.split(":")[0]


def job(name: str, loras=None) -> JobParams:
    model_id = model_of(name)
    width, height = SIZES[model_id]
    return JobParams(prompt="a red fox in the snow", width=width, height=height, num_frames=FRAMES.get(model_id, 5),
                     num_inference_steps=2, seed=11, upscale=False, loras=loras or [], model=model_id)


def label(model_id: str, loras) -> str:
    return model_id + ("+lora" if loras else "")


def settings_for(data_dir, out_dir) -> Settings:
    return Settings.from_env(env={}, model="tiny", upscaler="none", data_dir=data_dir, output_dir=out_dir,
                             models_dir=data_dir / "models", preview_every=0)


@contextlib.contextmanager
def frames_encoded():
    """The frames `run_job` hands its encoder (the MP4 is lossy: frames are compared before it)."""
    seen, real = [], run.encode_stream

    def recording(frames, output, fps, crf):
        def passing():
            for frame in frames:
                seen.append(frame.copy())
                yield frame
        return real(passing(), output, fps, crf)

    run.encode_stream = recording
    try:
        yield seen
    finally:
        run.encode_stream = real


def image_for(name):
    """An image for a model that needs one (HunyuanVideo-I2V) or a job named `:i2v`, else None."""
    if registry.MODELS[model_of(name)].inputs != "image" and not name.endswith(":i2v"):
        return None
    width, height = SIZES[model_of(name)]
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    return Image.fromarray((np.stack([x, y, 1 - x], -1) * 255).astype(np.uint8))


def leave_together() -> None:
    """Leave the group once every rank is done: a rank that tore its gloo group down while the other still ran
    once aborted ("terminate called without an active exception", SIGABRT) in a loaded full run."""
    torch.distributed.barrier()
    parallel.leave()


def _rank(rank: int, size: int, init: str, data_dir, out_dir, jobs):
    """One rank: join the group, run each (model, cancel after this many of rank 0's checks, LoRAs) through
    run_job, and write what it saw."""
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    parallel.join(rank, size, init, "cpu", timeout_s=60)
    models = Models(settings_for(data_dir, out_dir / str(rank)))
    report = []
    for index, (model_id, cancel_after, loras) in enumerate(jobs):
        output = out_dir / str(rank) / f"{index}-{model_id}.mp4"
        generator = models.generator_for(model_of(model_id))
        blocks, checks = [], [0]
        hooks = [block.register_forward_hook(lambda *a: blocks.append(1))
                 for transformer in generator.transformers for block in transformer.modules()
                 if type(block).__name__ in (transformer._repeated_blocks or ())]

        def should_cancel():
            checks[0] += 1
            return cancel_after is not None and checks[0] > cancel_after

        with frames_encoded() as seen:
            try:
                result = run_job(job(model_id, loras), models.settings, should_cancel=should_cancel, models=models,
                                 output=output, model=model_of(model_id), image=image_for(model_id))
                outcome = "none" if result is None else "video"
            except JobCanceled:
                outcome = "canceled"
            finally:
                for hook in hooks:
                    hook.remove()
        if seen:
            np.save(out_dir / f"{label(model_id, loras)}.rank{rank}.npy", np.stack(seen))
        report.append({"outcome": outcome, "split": generator.split, "blocks": len(blocks),
                            "file": output.exists(), "checks": checks[0],
                            "parallel_config": all(t._parallel_config is not None for t in generator.transformers)})
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    leave_together()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("parallel")
    for name in (*SPLIT, HV_I2V):
        registry.tiny_model_dir(data_dir, model_of(name))
    make_lora(HV, data_dir, data_dir / "models" / registry.LORA_DIR, "style")
    return data_dir


# Every job of this module, run once on one group of 2 ranks (starting the ranks is the slow part).
STYLE = [{"name": "style", "scale": 1.0}]
JOBS = [*((model_id, None, None) for model_id in SPLIT), (HV, None, STYLE), (HV_I2V, None, None), (WAN_21, 3, None),
        (WAN_21, None, None)]


@pytest.fixture(scope="module")
def group(tmp_path_factory, data_dir):
    """(out_dir, reports): each rank's report per job of JOBS, in order."""
    tmp_path = tmp_path_factory.mktemp("group")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", data_dir, out_dir, JOBS), nprocs=2, join=True)
    reports = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return out_dir, list(zip(*reports))


def one_process_frames(data_dir, out_dir, model_id, loras=None) -> np.ndarray:
    settings = settings_for(data_dir, out_dir)
    with frames_encoded() as seen:
        run_job(job(model_id, loras), settings, models=Models(settings), output=out_dir / f"{model_id}.mp4",
                model=model_of(model_id), image=image_for(model_id))
    return np.stack(seen)


def test_every_family_that_splits_makes_the_one_process_frames_on_two_ranks(tmp_path, data_dir, group):
    out_dir, reports = group
    for i, model_id in enumerate(SPLIT):
        assert registry.MODELS[model_of(model_id)].parallel
        leader, follower = reports[i]
        assert leader["outcome"] == "video" and follower["outcome"] == "none", model_id
        assert leader["split"] and follower["split"] and leader["parallel_config"] and follower["parallel_config"]
        assert leader["file"] and not follower["file"]  # rank 0 alone encodes
        assert leader["blocks"] == follower["blocks"] > 0
        assert not (out_dir / f"{model_id}.rank1.npy").exists()
        two = np.load(out_dir / f"{model_id}.rank0.npy")
        one = one_process_frames(data_dir, tmp_path / "one", model_id)
        # HunyuanVideo-1.5 I2V sizes its video by the image
        assert two.shape == one.shape and one.shape[0] == FRAMES.get(model_of(model_id), 5)
        difference = np.abs(two.astype(int) - one.astype(int))
        assert difference.max() <= 1, (model_id, difference.max())
        assert one.std() > 1  # a picture, not a constant


def test_a_lora_applies_on_every_rank_and_makes_the_one_process_frames(tmp_path, data_dir, group):
    out_dir, reports = group
    leader, follower = reports[JOBS.index((HV, None, STYLE))]
    assert (leader["outcome"], follower["outcome"]) == ("video", "none") and leader["split"]
    two = np.load(out_dir / f"{label(HV, STYLE)}.rank0.npy")
    one = one_process_frames(data_dir, tmp_path, HV, STYLE)
    assert np.abs(two.astype(int) - one.astype(int)).max() <= 1
    without = np.load(out_dir / f"{HV}.rank0.npy")
    assert np.abs(two.astype(int) - without.astype(int)).mean() > 1  # the LoRA acts


def test_a_model_that_does_not_split_runs_on_rank_zero_alone(tmp_path, data_dir, group):
    entry = registry.MODELS[HV_I2V]
    assert not entry.parallel and entry.parallel_note
    out_dir, reports = group
    leader, follower = reports[JOBS.index((HV_I2V, None, None))]
    assert (leader["outcome"], follower["outcome"]) == ("video", "none")
    assert not leader["split"] and not follower["split"] and not leader["parallel_config"]
    assert follower["blocks"] == 0 and leader["blocks"] > 0
    alone = np.load(out_dir / f"{HV_I2V}.rank0.npy")
    assert np.array_equal(alone, one_process_frames(data_dir, tmp_path, HV_I2V))


def test_rank_zeros_cancel_stops_both_ranks_at_the_same_block_and_the_next_job_runs(group):
    """Rank 0's checks: one before the job, one before each block. Canceled at its 4th check, both ranks stop
    before the third block of the first step (of 2 steps x 2 guidance passes x 2 blocks), and the group's next
    job completes."""
    _, reports = group
    canceled = reports[JOBS.index((WAN_21, 3, None))]
    assert [c["outcome"] for c in canceled] == ["canceled", "canceled"]
    assert [c["blocks"] for c in canceled] == [2, 2]
    assert canceled[0]["checks"] == 4 and canceled[1]["checks"] == 0  # only rank 0's own check is read
    assert not canceled[0]["file"]
    after = reports[JOBS.index((WAN_21, 3, None)) + 1]
    assert [a["outcome"] for a in after] == ["video", "none"] and after[0]["blocks"] == after[1]["blocks"] == 8



def test_the_registry_claims_a_split_only_where_a_plan_exists():
    """Every model the registry says splits has a context-parallel plan for its transformer class (diffusers' own,
    or pipeline/cp_plans.py); one that does not says why."""
    import inspect
    import typing

    import diffusers

    from pipeline import cp_plans

    for entry in registry.ENTRIES:
        pipeline = getattr(diffusers, entry.pipelines[entry.modes[0]])
        transformer = inspect.signature(pipeline.__init__).parameters["transformer"].annotation
        transformer = getattr(diffusers, transformer) if isinstance(transformer, str) else transformer
        transformer = next((t for t in typing.get_args(transformer) if t is not type(None)), transformer)  # X | None
        has_plan = transformer.__name__ in cp_plans.PLANS or getattr(transformer, "_cp_plan", None) is not None
        assert has_plan or not entry.parallel, entry.id
        assert entry.parallel or entry.parallel_note, entry.id


def hv15_transformer():
    """HunyuanVideo-1.5's transformer at tiny sizes with 3 blocks (the tiny build has 1): the text mask reaches
    every block from `forward`, so each block's mask must be split, not only the first's."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4)).eval()


def hv15_inputs():
    """Padded text (7 of 11 Qwen tokens, 3 of 6 ByT5 tokens) and 4 image tokens: 21 text tokens, which do not
    divide by 2 (the uneven split), beside 48 video tokens."""
    generator = torch.Generator().manual_seed(1)
    mask, mask_2 = torch.zeros(1, 11, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)
    mask[:, :7], mask_2[:, :3] = 1, 1
    return dict(hidden_states=torch.randn(1, 9, 2, 4, 6, generator=generator), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 11, 16, generator=generator), encoder_attention_mask=mask,
                encoder_hidden_states_2=torch.randn(1, 6, 32, generator=generator), encoder_attention_mask_2=mask_2,
                image_embeds=torch.zeros(1, 4, 12), return_dict=False)


def _hv15_rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    group = parallel.join(rank, 2, init, "cpu", timeout_s=60)
    transformer = hv15_transformer()
    parallel.split(transformer, group, "native", masked=True)
    with torch.inference_mode():
        output = transformer(**hv15_inputs())[0]
    if rank == 0:
        torch.save(output, out)
    leave_together()


def test_hunyuanvideo15_with_padded_text_and_several_blocks_splits_exactly(tmp_path):
    with torch.inference_mode():
        one = hv15_transformer()(**hv15_inputs())[0]
    out = tmp_path / "two.pt"
    mp.spawn(_hv15_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    two = torch.load(out)
    assert two.shape == one.shape and one.abs().max() > 0.1
    assert torch.allclose(two, one, atol=1e-5), (two - one).abs().max()


def _build_rank(rank: int, init: str, data_dir: str) -> None:
    parallel.join(rank, 2, init, "cpu", timeout_s=60)
    if rank == 0:
        time.sleep(2)  # rank 1 reaches the build first: unguarded, its folder (without weights) would win
    folder = registry.tiny_model_dir(Path(data_dir), "ltx-2.3")
    (Path(data_dir) / f"rank{rank}.txt").write_text(str(folder))
    leave_together()


def test_a_tiny_build_in_a_group_is_written_by_rank_zero_with_every_weight(tmp_path):
    """transformers' save_pretrained writes no weights on a rank but 0, so a rank 1 that built a tiny folder first
    left an LTX-2 without its text encoder's weights (a worker group's enhance job failed on it)."""
    mp.spawn(_build_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    folders = {(tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    assert folders == {str(tmp_path / "tiny" / "ltx-2.3")}
    assert (tmp_path / "tiny" / "ltx-2.3" / "text_encoder" / "model.safetensors").stat().st_size > 0
    LTX2Pipeline.from_pretrained(tmp_path / "tiny" / "ltx-2.3")  # every component loads
