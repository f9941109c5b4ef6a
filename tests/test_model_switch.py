"""One process, several models one after another (issue 20): every ordered pair of families A -> B -> A loads,
generates and unloads, with no weight left on the meta device and nothing of the model before left behind."""

import torch

from config import Settings
from pipeline.run import Models
from pipeline.spec import JobParams

HV, HV15, WAN = "hunyuanvideo", "hunyuanvideo-1.5-480p", "wan2.2-ti2v-5b"
# Every A -> B -> A of the three families appears in this one sequence (10 loads instead of 18).
SEQUENCE = (HV, HV15, HV, HV15, WAN, HV15, WAN, HV, WAN, HV)


def meta_tensors(pipe) -> list[str]:
    return [f"{name}.{key}" for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)
            for key, tensor in (*component.named_parameters(), *component.named_buffers()) if tensor.is_meta]


def test_every_pair_of_families_loads_a_b_a_in_one_process(data_dir, tiny_model):
    triples = {SEQUENCE[i:i + 3] for i in range(len(SEQUENCE) - 2)}
    assert {(a, b, a) for a in (HV, HV15, WAN) for b in (HV, HV15, WAN) if a != b} <= triples
    models = Models(Settings.from_env(env={}, model="tiny", data_dir=data_dir))
    previous = None
    for model_id in SEQUENCE:
        generator = models.generator_for(model_id)
        assert models.resident == f"tiny:{model_id}" and generator.entry.id == model_id
        assert previous is None or previous.pipe is None  # the model before was unloaded
        assert meta_tensors(generator.pipe) == []
        # One frame at the smallest size every family takes: the load is under test, not the clip.
        frames = generator.generate(JobParams(prompt="a fox", model=model_id, width=32, height=32, num_frames=1,
                                              num_inference_steps=1, seed=3))
        assert frames.shape == (1, 32, 32, 3) and frames.std() > 0
        previous = generator
