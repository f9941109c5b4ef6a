"""The share of each full-size transformer's parameters that fp8 layerwise casting stores in fp8.

diffusers' `enable_layerwise_casting` keeps every module matching the model class's
`_skip_layerwise_casting_patterns` (e.g. "norm", which also matches the AdaLN modulation Linears) in the
compute dtype. This builds each transformer at its published size on the meta device (no weights, no
download), applies the casting as t2v does (`pipeline.speed.apply_speed_options`), and counts.

    python bench/fp8_share.py          # a table: model, parameters, fp8 share, the largest modules kept
"""

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _published_ltx2_config() -> dict:
    """LTX-2's published transformer config, defined once in bench/gpu.py (loaded by path: `tests/gpu` is a
    package named `gpu` too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("t2v_bench_gpu", ROOT / "bench" / "gpu.py")
    bench_gpu = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(bench_gpu)
    return bench_gpu.LTX2_TRANSFORMER

# Transformer configs at full size. The class defaults of diffusers 0.42.1 are HunyuanVideo's (13B), HunyuanVideo-1.5's
# (8.3B) and Wan 2.2 A14B's (one 14B expert); the other Wan sizes from the Wan2.1/Wan2.2 configs
# (github.com/Wan-Video/Wan2.2, wan/configs: dim = heads x 128, ffn_dim, num_layers, in/out channels).
CONFIGS = {
    "hunyuanvideo": ("HunyuanVideoTransformer3DModel", {}),
    "hunyuanvideo-1.5": ("HunyuanVideo15Transformer3DModel", {}),
    "hunyuanvideo-1.5-480p-i2v-distilled": ("HunyuanVideo15Transformer3DModel", {"use_meanflow": True}),
    "wan2.2-t2v-a14b": ("WanTransformer3DModel", {}),
    "wan2.2-i2v-a14b": ("WanTransformer3DModel", {"in_channels": 36}),
    "wan2.2-ti2v-5b": ("WanTransformer3DModel", {"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30,
                                                 "in_channels": 48, "out_channels": 48}),
    "wan2.1-t2v-1.3b": ("WanTransformer3DModel", {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}),
    "ltx-2": ("LTX2VideoTransformer3DModel", _published_ltx2_config()),  # Lightricks/LTX-2's published config
}


def fp8_share(class_name: str, config: dict) -> dict:
    """Build the transformer on the meta device, cast it as t2v does, and count parameters by storage dtype."""
    import diffusers
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        transformer = getattr(diffusers, class_name)(**config)
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    total, fp8, kept = 0, 0, Counter()
    for name, parameter in transformer.named_parameters():
        total += parameter.numel()
        if parameter.dtype == torch.float8_e4m3fn:
            fp8 += parameter.numel()
        else:
            kept[re.sub(r"\.\d+(?=\.)", "", name.rsplit(".", 1)[0])] += parameter.numel()  # blocks.0.x -> blocks.x
    return {"parameters_b": round(total / 1e9, 2), "fp8_share": round(fp8 / total, 3),
            "kept_largest": {k: round(v / 1e9, 2) for k, v in kept.most_common(3)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = {model: fp8_share(*spec) for model, spec in CONFIGS.items()}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| model | parameters (B) | fp8 share | largest kept in the compute dtype (B, by module name) |")
    print("|---|---|---|---|")
    for model, row in rows.items():
        kept = ", ".join(f"{k} {v}" for k, v in row["kept_largest"].items())
        print(f"| {model} | {row['parameters_b']} | {row['fp8_share']:.1%} | {kept} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
