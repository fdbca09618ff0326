"""The CUDA path: bf16 autocast training, torch.compile, the custom autograd functions, the fused losses, scoring,
the SAE, speculative decoding and a data-parallel step on NCCL. Skipped without a GPU (`pytest -m gpu` on one).

Tolerances are bf16's where autocast is on (8 mantissa bits: ~1e-2 relative) and TF32-free fp32's elsewhere."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.models.gpt import GPT, _RMSNormFunction, _Rotary, _rotate, rotary_tables
from stages.models.losses import token_loss, token_loss_and_entropy
from stages.models.sae import TopKSAE, sae_loss
from stages.runtime.devices import autocast
from tests.helpers import TINY_MODEL, make_token_artifact, tiny_run, tiny_train_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_token_artifact(tmp_path_factory.mktemp("tokens"))


def _model(seed: int = 0, num_future_tokens: int = 1) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY_MODEL, 64, 16, num_future_tokens=num_future_tokens)


def test_bf16_autocast_training_learns_like_fp32_on_cpu(tokens, tmp_path):
    """The same run on CUDA (bf16 autocast) and on CPU (fp32): both learn, to close final losses."""
    cpu = tiny_run(tokens, tmp_path / "cpu", tiny_train_config(max_tokens=24 * 128))
    gpu = tiny_run(tokens, tmp_path / "gpu", tiny_train_config(max_tokens=24 * 128, device="cuda"))
    for name in ("val", "ref_val"):
        cpu_loss, gpu_loss = (summary["val_loss"][name] for summary in (cpu, gpu))
        assert np.isfinite(gpu_loss) and gpu_loss < np.log(64) - 0.1, (name, gpu_loss)
        assert abs(gpu_loss - cpu_loss) < 0.05 * cpu_loss, (name, cpu_loss, gpu_loss)


def test_compiled_blocks_match_eager():
    """torch.compile of every block (the trainer's `compile`): the same logits and gradients as eager."""
    from stages.training.loop import compile_blocks

    eager, compiled = _model().to(CUDA), _model().to(CUDA)
    compile_blocks(compiled)
    idx_BT = torch.randint(0, 64, (4, 16), device=CUDA)
    for model in (eager, compiled):
        F.cross_entropy(model(idx_BT).flatten(0, 1), idx_BT.flatten()).backward()
    torch.testing.assert_close(compiled(idx_BT), eager(idx_BT), rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_custom_autograd_functions_on_cuda():
    """Rotary and RMSNorm's hand-written backwards equal autograd through the plain formulas, on the GPU."""
    x_BHTK = torch.randn(2, 2, 16, 8, device=CUDA, dtype=torch.float64, requires_grad=True)
    cos_TK, sin_TK = (t.to(CUDA, torch.float64) for t in rotary_tables(8, 16, 10000.0))
    half = 4
    grad = torch.randn_like(x_BHTK)
    (custom,) = torch.autograd.grad(_Rotary.apply(x_BHTK, cos_TK[..., :half], sin_TK[..., :half]), x_BHTK, grad)
    plain = x_BHTK * cos_TK + torch.cat([-x_BHTK[..., half:], x_BHTK[..., :half]], -1) * sin_TK
    (expected,) = torch.autograd.grad(plain, x_BHTK, grad)
    torch.testing.assert_close(custom, expected)
    torch.testing.assert_close(_rotate(x_BHTK.detach(), cos_TK[..., :half], sin_TK[..., :half]), plain.detach())

    x = torch.randn(6, 32, device=CUDA, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(32, device=CUDA, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-5), (x, weight))


def test_fused_losses_under_autocast_match_fp32_cross_entropy():
    """bf16 logits into the fused losses: the fp32 cross-entropy of those logits, values and gradients."""
    logits_BTV = torch.randn(4, 16, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    targets_BT = torch.randint(0, 64, (4, 16), device=CUDA)
    targets_BT[0, :3] = -100
    loss_BT = token_loss(logits_BTV, targets_BT, chunk_elements=256)
    expected_BT = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none",
                                  ignore_index=-100).view(4, 16)
    torch.testing.assert_close(loss_BT, expected_BT, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(loss_BT.sum(), logits_BTV)
    (expected_grad,) = torch.autograd.grad(expected_BT.sum(), logits_BTV)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=1e-2, atol=1e-3)
    loss2_BT, entropy_BT = token_loss_and_entropy(logits_BTV.detach(), targets_BT)
    probs = logits_BTV.detach().float().softmax(-1)
    torch.testing.assert_close(loss2_BT, expected_BT.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy_BT, -(probs * probs.log()).sum(-1), rtol=1e-4, atol=1e-4)


def test_scoring_on_cuda_matches_cpu(tokens):
    """Per-token reference losses of score_reference's window pass on CUDA (bf16 autocast) and on CPU."""
    from stages.models.window_losses import token_losses
    from storage.windows import TokenWindows

    windows = TokenWindows.from_manifest(tokens, "val")
    ids = np.arange(len(windows))
    model = _model().eval()
    cpu = token_losses(model, windows, ids, batch_size=4, device=torch.device("cpu"))
    gpu = token_losses(model.to(CUDA), windows, ids, batch_size=4, device=CUDA)
    np.testing.assert_allclose(np.asarray(gpu), np.asarray(cpu), rtol=2e-2, atol=2e-2)


def test_sae_step_on_cuda_matches_cpu():
    """One TopK SAE loss and gradient on CUDA equal the CPU's (fp32: the SAE trains outside autocast)."""
    generator = torch.Generator().manual_seed(0)
    sae = TopKSAE(32, 128, 4, generator=generator)
    x_ND = torch.randn(256, 32, generator=generator)
    results = []
    for device in (torch.device("cpu"), CUDA):
        model = TopKSAE(32, 128, 4)
        model.load_state_dict(sae.state_dict())
        model.to(device)
        loss, metrics = sae_loss(model, x_ND.to(device), torch.zeros(128, dtype=torch.bool, device=device), 8, 1 / 32)
        loss.backward()
        results.append((loss.item(), model.W_enc.grad.cpu(), metrics["l0"].item()))
    (cpu_loss, cpu_grad, cpu_l0), (gpu_loss, gpu_grad, gpu_l0) = results
    assert gpu_l0 == cpu_l0 == 4
    assert abs(gpu_loss - cpu_loss) < 1e-4 * max(1.0, abs(cpu_loss))
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-3, atol=1e-5)


def test_speculative_decoding_on_cuda_equals_greedy():
    """Self-speculative decoding with a 2-head model on the GPU gives greedy decoding's tokens."""
    from stages.inference.generate import generate
    from stages.inference.speculative import generate_speculative

    model = _model(num_future_tokens=2).to(CUDA)
    prompt = [1, 2, 3]
    drafted, stats = generate_speculative(model, prompt, 12)
    assert drafted == generate(model, prompt, 12) and stats.forwards <= 12


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_a_data_parallel_step_on_nccl(parallelism):
    """A one-rank NCCL process group: wrap (replicate / fully_shard with bf16 parameters), a backward under
    autocast and a fused AdamW step. The gradients equal the unwrapped model's to bf16 tolerance (compared before
    the step: Adam's first update is lr * sign(g) wherever |g| is tiny, so updates amplify bf16 noise)."""
    import torch.distributed as dist

    from stages.training import distributed
    from stages.training.optim import build_optimizer

    def full(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().float()

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(distributed.free_port())})
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        idx_BT = torch.randint(0, 64, (4, 16), device=CUDA)
        grads = []
        for wrapped in (False, True):
            model = _model().to(CUDA)
            if wrapped:
                distributed.wrap(model, parallelism, CUDA)
            with autocast(CUDA):
                loss = F.cross_entropy(model(idx_BT).flatten(0, 1).float(), idx_BT.flatten())
            loss.backward()
            grads.append({name: full(p.grad) for name, p in model.named_parameters()})
            build_optimizer(model, tiny_train_config(device="cuda"), CUDA).step()
            assert all(torch.isfinite(full(p)).all() for p in model.parameters())
        for name, plain in grads[0].items():
            scale = float(plain.abs().max())
            torch.testing.assert_close(grads[1][name], plain, rtol=5e-2, atol=2e-2 * scale, msg=name)
    finally:
        dist.destroy_process_group()
