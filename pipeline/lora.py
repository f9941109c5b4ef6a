"""LoRAs per job: why a LoRA state dict does not fit a loaded transformer, and the error a job fails with."""

from __future__ import annotations


class LoraError(ValueError):
    """A job's LoRAs cannot be applied by this loaded model; the message says why."""


def lora_mismatch(state: dict, transformer) -> str | None:
    """Why a LoRA state dict (diffusers' format, `transformer.<module>.lora_A.weight`) does not fit `transformer`:
    a module it names that the transformer has not, or a shape that differs. None when every key fits."""
    modules = dict(transformer.named_modules())
    for key, tensor in sorted(state.items()):
        if not key.startswith("transformer.") or ".lora" not in key:
            return f"{key} is not a transformer LoRA weight"
        path, _, part = key[len("transformer."):].partition(".lora")
        module = modules.get(path)
        if module is None:
            return f"it has weights for {path}, which the model has not"
        size, side = (tensor.shape[1], "in") if part.startswith("_A.") else (tensor.shape[0], "out")
        expected = getattr(module, f"{side}_features", None)
        if part.startswith(("_A.weight", "_B.weight")) and expected is not None and size != expected:
            return f"{path} takes {expected} {side} features, the LoRA has {size}"
    return None
