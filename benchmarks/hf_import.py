"""Load time and peak memory of importing a Hugging Face Llama checkpoint (stages/models/hf_import.py).

Usage: python benchmarks/hf_import.py [--quick] [--shape smollm2_360m] [--dir PATH] [--loaders a,b,...]
                                      [--json-out PATH]

The checkpoint: a random-init `LlamaForCausalLM` of a real shape (default SmolLM2-360M's: 32 layers, d 960,
15 query / 5 key-value heads, MLP 2560, vocab 49152, tied; 362M parameters), built by transformers directly in
bf16 and written with `save_pretrained` in shards of at most 200 MB (`--dir` keeps it; default a temp dir).
`--quick`: a 4-layer model of the same widths, for a smoke run.

Each loader runs in its own subprocess (its own peak memory), twice; the table shows the faster load:
- `lmpipe_fp32`: `import_llama(dir, dtype=float32, max_seq_len=2048)`: built on the meta device, allocated once,
  the bf16 shards streamed in tensor by tensor and cast on copy;
- `lmpipe_bf16`: the same with `dtype=bfloat16` (half the memory, for inference);
- `transformers_fp32`: `AutoModelForCausalLM.from_pretrained(dir, dtype=float32)`, the reference.
`load s` is the wall time of that call (files in the page cache after the first load); `peak MiB` the worker's
ru_maxrss (torch and libraries included), `delta MiB` that minus VmRSS just before loading, `model MiB` the bytes
of the loaded parameters: delta ≈ model means no second copy was held. `max_abs_dlogits` (JSON; a third lmpipe_fp32
worker, not timed) compares one forward on 64 tokens with the transformers fp32 load of the same checkpoint.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import MEMORY_METHOD, PeakMemory, emit, load_average, parse_args, spawn_worker

SHAPES = {
    "smollm2_360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5},
}
LOADERS = ("lmpipe_fp32", "lmpipe_bf16", "transformers_fp32")
REPEATS = 2


def build_checkpoint(directory: Path, shape: dict) -> dict:
    """Random-init Llama of `shape` in bf16, saved sharded; returns its size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": shape["rope_theta"]}
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "rope_theta"}, rope_parameters=rope,
                         max_position_embeddings=8192, dtype=torch.bfloat16)
    tick = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: one copy
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory, max_shard_size="200MB")
    files = list(directory.glob("*.safetensors"))
    return {"params": sum(p.numel() for p in model.parameters()), "shards": len(files),
            "file_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "build_s": round(time.perf_counter() - tick, 2)}


def run_worker(spec: dict) -> dict:
    """Load the checkpoint with one loader; time, memory, and (lmpipe_fp32) the logits gap to transformers."""
    directory, loader = Path(spec["dir"]), spec["loader"]
    if loader.startswith("lmpipe"):
        from stages.models.hf_import import import_llama  # imported before measuring: library pages are not load
    else:
        from transformers import AutoModelForCausalLM
    memory = PeakMemory(torch.device("cpu"))
    tick = time.perf_counter()
    if loader.startswith("lmpipe"):
        dtype = torch.float32 if loader == "lmpipe_fp32" else torch.bfloat16
        model = import_llama(directory, dtype=dtype, max_seq_len=2048)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    seconds = time.perf_counter() - tick
    row = {"loader": loader, "load_s": round(seconds, 2), **{k: round(v, 1) for k, v in memory.row().items()},
           "model_mib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)}
    if loader == "lmpipe_fp32" and spec.get("check_logits"):
        from transformers import AutoModelForCausalLM

        idx_BT = torch.randint(0, model.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model(idx_BT)
            del model
            theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()(idx_BT).logits
        row["max_abs_dlogits"] = float((ours - theirs).abs().max())
    return row


def table(report: dict) -> str:
    """The Markdown table of the fastest repeat per loader."""
    lines = ["| loader | load s | peak MiB | delta MiB | model MiB |", "|---|---|---|---|---|"]
    for row in report["results"]:
        lines.append(f"| {row['loader']} | {row['load_s']:.2f} | {row['peak_mem_mib']:,.0f} | "
                     f"{row['mem_delta_mib']:,.0f} | {row['model_mib']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Build the checkpoint, load it with every loader in subprocesses, print JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 layers instead of the shape's")
    parser.add_argument("--shape", default="smollm2_360m", choices=sorted(SHAPES))
    parser.add_argument("--dir", type=Path, default=None, help="write (and keep) the checkpoint here")
    parser.add_argument("--loaders", default=",".join(LOADERS), help=f"comma list of {list(LOADERS)}")
    args = parse_args(parser, run_worker)
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    if set(loaders) - set(LOADERS):
        parser.error(f"unknown loader(s) {sorted(set(loaders) - set(LOADERS))}; choose from {list(LOADERS)}")
    shape = SHAPES[args.shape] | ({"num_hidden_layers": 4} if args.quick else {})

    with tempfile.TemporaryDirectory(prefix="hf_import_") as tmp:
        directory = args.dir or Path(tmp) / "llama"
        directory.mkdir(parents=True, exist_ok=True)
        checkpoint = build_checkpoint(directory, shape)
        print(f"# checkpoint: {checkpoint}", file=sys.stderr)
        report = {"torch": torch.__version__, "num_threads": torch.get_num_threads(), "shape": shape,
                  "checkpoint": checkpoint, "memory": MEMORY_METHOD["cpu"],
                  "load_average_1min": {"before": load_average()}, "results": []}
        for loader in loaders:
            rows = [spawn_worker(__file__, {"dir": str(directory), "loader": loader}) for _ in range(REPEATS)]
            best = min(rows, key=lambda r: r["load_s"]) | {"load_s_all": [r["load_s"] for r in rows]}
            if loader == "lmpipe_fp32":  # its own worker: the second model it loads must not count as peak
                check = spawn_worker(__file__, {"dir": str(directory), "loader": loader, "check_logits": True})
                best["max_abs_dlogits"] = check["max_abs_dlogits"]
            report["results"].append(best)
            print(f"# {loader}: {best['load_s']:.2f} s, peak {best['peak_mem_mib']:,.0f} MiB", file=sys.stderr)
        report["load_average_1min"]["after"] = load_average()
    emit(report, table(report), args.json_out)


if __name__ == "__main__":
    main()
