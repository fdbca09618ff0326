"""Training throughput and peak memory of lmpipe's TopK SAE (stages/models/sae.py) against a plain PyTorch one.

Usage: python benchmarks/sae_throughput.py [--quick] [--steps 10] [--warmup 2] [--device auto|cpu|cuda]
                                           [--d-model 128] [--num-latents 4096] [--k 32] [--batch 4096]
                                           [--variants sparse,dense,plain,sparse_auxk] [--dead-fraction 0.5]
                                           [--json-out PATH]

Measured, one training step = forward + loss + backward + Adam step + decoder renormalisation, per variant:
- `sparse`: the real loop: TopKSAE, `sae_loss` (FVU; nothing dead, so no AuxK decode), DeadLatentTracker.update,
  `remove_parallel_grad_`, Adam, `normalize_decoder_`. The decode is `F.embedding_bag` over the k active rows;
- `dense`: the same with `decode_dense` (scatter into a dense (N, L) latent matrix, then a matmul with W_dec);
- `plain`: a straightforward TopK SAE written below with no lmpipe import: nn.Linear encoder (x - b_pre) and
  decoder, topk, ReLU, scatter into dense latents, FVU, the same parallel-grad removal and renormalisation;
- `sparse_auxk`: `sparse` with a share of the latents (`--dead-fraction`, default 0.5: a stress case) forced dead,
  so every step also pays the AuxK top-k over the dead columns and its decode (k_aux = d_model / 2, coef 1/32).
All variants run fp32 (no autocast) and Adam(lr=1e-4) on the same fixed pool of layer-normalised Gaussian rows
(throughput does not depend on the data). `--quick` shrinks everything for a few-second smoke run.

Definitions:
- rows/s = batch / step seconds, each of `--steps` steps timed alone after `--warmup` unmeasured ones: `rows/s`
  from the median step, `best rows/s` from the fastest; `x plain` divides best rows/s by the plain variant's
  (the machines are shared, so the fastest step is the least disturbed estimate).
- Peak memory: CUDA: torch.cuda.max_memory_allocated. CPU: each variant runs in its own subprocess; `peak MiB` is
  its ru_maxrss (torch libraries included), `delta MiB` that minus VmRSS just before the model was built.
- `topk_ms`: one more measurement in the parent process: torch.topk(k) of a (batch, num_latents) fp32 matrix with
  sorted=True vs sorted=False (best of 10), the choice `encode` makes (sorted=False).
- `decode_ms`: forward + backward (grads to the decoder and to the values) of the decode alone, best of 10, in the
  parent process: `embedding_bag` (F.embedding_bag with per_sample_weights, what `sparse_decode` uses),
  `gather_bmm` (gather the (N, K, D) rows, then a batched (1, K) x (K, D) product) and `dense` (scatter + matmul).
"""

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from common import (
    MEMORY_METHOD,
    REPO_ROOT,
    PeakMemory,
    best_seconds,
    emit,
    load_average,
    parse_args,
    pick_device,
    spawn_worker,
    step_seconds,
)
from torch import nn

VARIANTS = ("sparse", "dense", "plain", "sparse_auxk")
FULL = {"d_model": 128, "num_latents": 4096, "k": 32, "batch": 4096}
QUICK = {"d_model": 64, "num_latents": 1024, "k": 16, "batch": 512}
POOL_BATCHES = 4  # distinct batches cycled through


class PlainTopKSAE(nn.Module):
    """Plain TopK SAE: enc(x - b_pre), top-k, ReLU, scatter to dense latents, dec (whose bias is b_pre)."""

    def __init__(self, d_model: int, num_latents: int, k: int):
        super().__init__()
        self.k = k
        self.enc = nn.Linear(d_model, num_latents)
        self.dec = nn.Linear(num_latents, d_model)
        with torch.no_grad():
            self.enc.bias.zero_()
            self.dec.bias.zero_()
            self.dec.weight.copy_(self.enc.weight.T)
        self.normalize_decoder_()

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        pre_NL = self.enc(x_ND - self.dec.bias)
        vals_NK, idx_NK = pre_NL.topk(self.k, dim=-1, sorted=False)
        return self.dec(torch.zeros_like(pre_NL).scatter(1, idx_NK, vals_NK.relu()))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.dec.weight.div_(self.dec.weight.norm(dim=0, keepdim=True))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        w_DL, g_DL = self.dec.weight, self.dec.weight.grad
        g_DL.sub_((g_DL * w_DL).sum(dim=0, keepdim=True) * w_DL)


def build_step(spec: dict, device: torch.device, pool: list[torch.Tensor]):
    """The variant's model and a zero-argument training step."""
    cfg = spec["config"]
    D, L, K = cfg["d_model"], cfg["num_latents"], cfg["k"]
    count = [0]
    if spec["variant"] == "plain":
        model = PlainTopKSAE(D, L, K).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def plain_step() -> None:
            x_ND = pool[count[0] % len(pool)]
            count[0] += 1
            loss = (model(x_ND) - x_ND).pow(2).sum() / (x_ND - x_ND.mean(dim=0)).pow(2).sum()
            loss.backward()
            model.remove_parallel_grad_()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.normalize_decoder_()

        return model, plain_step

    sys.path.insert(0, str(REPO_ROOT))
    from stages.models.sae import DeadLatentTracker, TopKSAE, sae_loss

    model = TopKSAE(D, L, K).to(device)
    if spec["variant"] == "dense":
        model.decode = model.decode_dense  # forward() decodes through the dense reference
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tracker = DeadLatentTracker(L, device=device)
    dead_L = torch.zeros(L, dtype=torch.bool, device=device)
    if spec["variant"] == "sparse_auxk":
        dead_L[torch.randperm(L, generator=torch.Generator().manual_seed(0))[: round(spec["dead_fraction"] * L)]] = True

    def step() -> None:
        x_ND = pool[count[0] % len(pool)]
        count[0] += 1
        out = model(x_ND)
        loss, _ = sae_loss(model, x_ND, dead_L, k_aux=max(1, D // 2), aux_coef=1 / 32, out=out)
        tracker.update(out.idx_NK, out.vals_NK)
        loss.backward()
        model.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.normalize_decoder_()

    return model, step


def run_worker(spec: dict) -> dict:
    """Measure one variant in this process; returns the result row."""
    device = torch.device(spec["device"])
    cfg = spec["config"]
    torch.manual_seed(0)
    x = torch.randn(POOL_BATCHES, cfg["batch"], cfg["d_model"], device=device)
    x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)  # what layer_norm_stats gives
    pool = list(x.unbind(0))
    memory = PeakMemory(device)
    model, step = build_step(spec, device, pool)
    seconds = step_seconds(step, spec["steps"], warmup=spec["warmup"], device=device)
    row = {"variant": spec["variant"], "device": device.type,
           "num_params": sum(p.numel() for p in model.parameters()),
           "rows_per_s": cfg["batch"] / statistics.median(seconds),
           "rows_per_s_best": cfg["batch"] / min(seconds), "step_seconds": seconds}
    return {**row, **memory.row()}


def topk_ms(device: torch.device, batch: int, num_latents: int, k: int) -> dict:
    """Best-of-10 milliseconds of topk(k) on a (batch, num_latents) matrix, sorted vs unsorted."""
    pre_NL = torch.randn(batch, num_latents, device=device)
    result = {}
    for sorted_ in (True, False):
        best = best_seconds(lambda s=sorted_: pre_NL.topk(k, dim=-1, sorted=s), 10, warmup=1, device=device)
        result["sorted" if sorted_ else "unsorted"] = 1e3 * best
    return result


def decode_ms(device: torch.device, batch: int, num_latents: int, k: int, d_model: int) -> dict:
    """Best-of-10 milliseconds of forward + backward of three ways to decode k active latents per row."""
    torch.manual_seed(0)
    W_LD = torch.randn(num_latents, d_model, device=device, requires_grad=True)
    vals_NK = torch.rand(batch, k, device=device, requires_grad=True)
    idx_NK = torch.rand(batch, num_latents, device=device).topk(k, dim=-1, sorted=False).indices
    grad_ND = torch.randn(batch, d_model, device=device)
    ways = {
        "embedding_bag": lambda: F.embedding_bag(idx_NK, W_LD, per_sample_weights=vals_NK, mode="sum"),
        "gather_bmm": lambda: torch.bmm(vals_NK[:, None, :], W_LD[idx_NK]).squeeze(1),
        "dense": lambda: torch.zeros(batch, num_latents, device=device).scatter(1, idx_NK, vals_NK) @ W_LD,
    }
    result = {}
    for name, decode in ways.items():
        best = best_seconds(lambda d=decode: torch.autograd.grad(d(), (W_LD, vals_NK), grad_ND), 10, warmup=1,
                            device=device)
        result[name] = 1e3 * best
    return result


def markdown_table(report: dict) -> str:
    """The results as a Markdown table."""
    rows = report["results"]
    plain = next((r["rows_per_s_best"] for r in rows if r["variant"] == "plain"), None)
    plain_mem = next((r["peak_mem_mib"] for r in rows if r["variant"] == "plain"), None)
    cpu = report["device"] == "cpu"
    lines = ["| variant | params | rows/s | best rows/s | x plain | peak MiB | x plain mem"
             f"{' | delta MiB' if cpu else ''} |",
             f"|---|---|---|---|---|---|---|{'---|' if cpu else ''}"]
    for r in rows:
        cells = [r["variant"], f"{r['num_params'] / 1e6:.2f}M", f"{r['rows_per_s']:,.0f}",
                 f"{r['rows_per_s_best']:,.0f}", f"{r['rows_per_s_best'] / plain:.2f}" if plain else "-",
                 f"{r['peak_mem_mib']:,.0f}", f"{r['peak_mem_mib'] / plain_mem:.2f}" if plain_mem else "-"]
        if cpu:
            cells.append(f"{r['mem_delta_mib']:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    cfg, topk = report["config"], report["topk_ms"]
    lines.append("")
    lines.append(f"Device {report['device']} ({report['num_threads']} threads), fp32; d_model={cfg['d_model']}, "
                 f"num_latents={cfg['num_latents']}, k={cfg['k']}, batch={cfg['batch']} rows; "
                 f"{report['steps']} timed steps after {report['warmup']} warmup; sparse_auxk dead fraction "
                 f"{report['dead_fraction']}. topk ms: sorted "
                 f"{topk['sorted']:.2f}, unsorted {topk['unsorted']:.2f}. Decode fwd+bwd ms: "
                 + ", ".join(f"{name} {ms:.1f}" for name, ms in report["decode_ms"].items()) + ".")
    return "\n".join(lines)


def main() -> None:
    """Parse flags, run every variant in a subprocess, print JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}, 3 steps, 1 warmup")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--dead-fraction", type=float, default=0.5, help="share of dead latents in sparse_auxk")
    args = parse_args(parser, run_worker)

    device = pick_device(args.device)
    config = {name: getattr(args, name) or value for name, value in (QUICK if args.quick else FULL).items()}
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variant(s) {sorted(set(variants) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    if steps < 1 or warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if not 0.0 < args.dead_fraction <= 1.0:
        parser.error(f"--dead-fraction must be in (0, 1], got {args.dead_fraction}")
    if not 1 <= config["k"] <= config["num_latents"]:
        parser.error(f"--k must be in [1, num_latents={config['num_latents']}], got {config['k']}")

    report = {"device": device.type, "num_threads": torch.get_num_threads(), "torch": torch.__version__,
              "steps": steps, "warmup": warmup, "config": config, "dead_fraction": args.dead_fraction,
              "memory": MEMORY_METHOD[device.type], "load_average_1min": {"before": load_average()}, "results": []}
    for variant in variants:
        spec = {"variant": variant, "config": config, "device": str(device), "steps": steps, "warmup": warmup,
                "dead_fraction": args.dead_fraction}
        row = spawn_worker(__file__, spec)
        report["results"].append(row)
        print(f"# {variant}: {row['rows_per_s']:,.0f} rows/s", file=sys.stderr)
    report["topk_ms"] = topk_ms(device, config["batch"], config["num_latents"], config["k"])
    report["decode_ms"] = decode_ms(device, config["batch"], config["num_latents"], config["k"], config["d_model"])
    report["load_average_1min"]["after"] = load_average()
    emit(report, markdown_table(report), args.json_out)


if __name__ == "__main__":
    main()
