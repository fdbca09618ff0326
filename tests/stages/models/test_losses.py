"""stages.models.losses against the plain log-softmax formulas (fp32 and float64), chunked and not."""

import pytest
import torch
import torch.nn.functional as F

from stages.models.losses import frozen_unembed_loss, hidden_loss_and_entropy, token_loss, token_loss_and_entropy

V = 37  # odd, so chunks of whole rows never line up with powers of two


def reference(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, dtype=torch.float32, ignore_index: int = -100):
    """The formulas token_loss_and_entropy replaces (score_reference.score_logits), in `dtype`."""
    logp_BTV = F.log_softmax(logits_BTV.to(dtype), dim=-1)
    valid_BT = targets_BT != ignore_index
    loss_BT = -logp_BTV.gather(-1, targets_BT.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid_BT
    return loss_BT, -(logp_BTV.exp() * logp_BTV).sum(-1)


def random_logits(scale: float, shape=(3, 11, V), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator) * scale
    logits[0, 0] = 0.0  # uniform row: entropy log V
    logits[0, 1, 5] = 40.0 * max(scale, 1.0)  # near one-hot row: entropy ~0, huge loss for other targets
    logits[1, 2] += 1e4  # large common offset (exactness of the shift by the max)
    return logits


def random_targets(shape=(3, 11), seed: int = 1, ignore_every: int = 0) -> torch.Tensor:
    targets = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    return targets


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 1000.0])
@pytest.mark.parametrize("chunk_elements", [None, 1, 3 * V, 1 << 30])
def test_loss_and_entropy_match_log_softmax(scale, chunk_elements):
    logits, targets = random_logits(scale), random_targets()
    loss, entropy = token_loss_and_entropy(logits, targets, chunk_elements=chunk_elements)
    ref_loss, ref_entropy = reference(logits, targets)
    # the same kernels on the same rows: equal to the fp32 formula up to rounding of the reductions
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-6, atol=1e-5)
    # and as close to the exact (float64) values as fp32 allows at this magnitude
    exact_loss, exact_entropy = reference(logits.double(), targets, torch.float64)
    tol = 1e-5 + 2e-7 * logits.abs().amax().item()
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-6, atol=tol)
    torch.testing.assert_close(entropy.double(), exact_entropy, rtol=1e-6, atol=tol)
    torch.testing.assert_close(entropy[0, 0], torch.tensor(V).log(), rtol=0, atol=1e-5)
    assert 0 <= entropy[0, 1] < 1e-5


def test_loss_and_entropy_ignored_targets_shapes_and_dtypes():
    logits, targets = random_logits(3.0), random_targets(ignore_every=4)
    loss, entropy = token_loss_and_entropy(logits, targets, chunk_elements=2 * V)
    assert loss.shape == entropy.shape == targets.shape
    assert loss.dtype == entropy.dtype == torch.float32
    assert (loss[targets == -100] == 0).all() and (loss[targets != -100] > 0).all()
    ref_loss, ref_entropy = reference(logits, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-6, atol=1e-5)
    # any leading shape: (N, V) -> (N,)
    flat_loss, flat_entropy = token_loss_and_entropy(logits.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(flat_loss, loss.reshape(-1))
    torch.testing.assert_close(flat_entropy, entropy.reshape(-1))
    # non-contiguous logits
    transposed = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert not transposed.is_contiguous()
    torch.testing.assert_close(token_loss_and_entropy(transposed, targets), (loss, entropy))
    with pytest.raises(ValueError, match="do not match"):
        token_loss_and_entropy(logits, targets[:, :-1])
    empty_loss, empty_entropy = token_loss_and_entropy(logits[:, :0], targets[:, :0])
    assert empty_loss.shape == empty_entropy.shape == (3, 0)


def test_loss_and_entropy_from_bf16_are_fp32():
    logits_bf16 = random_logits(5.0).bfloat16()
    targets = random_targets()
    loss, entropy = token_loss_and_entropy(logits_bf16, targets, chunk_elements=5 * V)
    assert loss.dtype == entropy.dtype == torch.float32
    ref_loss, ref_entropy = reference(logits_bf16.float(), targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-6, atol=1e-5)


def test_loss_and_entropy_differentiable_when_grad_is_needed():
    logits = random_logits(2.0).requires_grad_()
    targets = random_targets(ignore_every=3)
    loss, entropy = token_loss_and_entropy(logits, targets)
    (loss.sum() + entropy.sum()).backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref_loss, ref_entropy = reference(ref_logits, targets, torch.float64)
    (ref_loss.sum() + ref_entropy.sum()).backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the chunked path gives the same values
        torch.testing.assert_close(token_loss_and_entropy(logits, targets), (loss.detach(), entropy.detach()))


@pytest.mark.parametrize("chunk_elements", [None, 1, 4 * V])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_token_loss_values_and_grads_match_cross_entropy(chunk_elements, scale):
    targets = random_targets(ignore_every=5)
    logits = random_logits(scale).requires_grad_()
    loss = token_loss(logits, targets, chunk_elements=chunk_elements)
    assert loss.shape == targets.shape and loss.dtype == torch.float32
    assert (loss[targets == -100] == 0).all()
    grad_out = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    loss.backward(grad_out)
    ref_logits = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, V), targets.reshape(-1), reduction="none").view(targets.shape)
    ref.backward(grad_out.double())
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-6,
                               atol=1e-5 + 2e-7 * logits.abs().amax().item())
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert (logits.grad[targets == -100] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(token_loss(logits, targets), loss.detach())
        fp32 = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none").view(targets.shape)
        torch.testing.assert_close(token_loss(logits, targets), fp32, rtol=1e-6, atol=1e-5)


def test_token_loss_bf16_and_mean_reduction():
    targets = random_targets(ignore_every=7)
    logits = random_logits(4.0).bfloat16().requires_grad_()
    loss = token_loss(logits, targets, chunk_elements=3 * V)
    assert loss.dtype == torch.float32
    loss.mean().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, V), targets.reshape(-1), reduction="none").view(targets.shape)
    ref.mean().backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits.grad, ref_logits.grad.bfloat16())
    with torch.inference_mode():
        torch.testing.assert_close(token_loss(logits, targets), loss.detach())


@pytest.mark.parametrize("block_elements", [None, 1, 5 * V])
def test_hidden_loss_and_entropy_equals_logits_path(block_elements):
    generator = torch.Generator().manual_seed(3)
    h_BTD = torch.randn(3, 11, 8, generator=generator)
    unembed_VD = torch.randn(V, 8, generator=generator)
    targets = random_targets(ignore_every=6)
    expected = token_loss_and_entropy(F.linear(h_BTD, unembed_VD), targets)
    got = hidden_loss_and_entropy(h_BTD, unembed_VD, targets, block_elements=block_elements, chunk_elements=2 * V)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert got[0].dtype == torch.float32 and got[0].shape == targets.shape
    empty = hidden_loss_and_entropy(h_BTD[:, :0], unembed_VD, targets[:, :0])
    assert empty[0].shape == empty[1].shape == (3, 0)


@pytest.mark.parametrize("block_elements", [V, 4 * V, 10_000 * V])  # one row, 4 rows, everything in one block
def test_frozen_unembed_loss_values_and_gradient_match_cross_entropy(block_elements):
    """Loss equal to F.cross_entropy on the materialized logits; dLoss/dh equal to autograd's for a loss that
    weighs the rows unequally (backward scales each row's kept gradient); the unembedding gets none."""
    generator = torch.Generator().manual_seed(4)
    h_BTD = (torch.randn(3, 11, 8, generator=generator) * 3).requires_grad_(True)
    unembed_VD = torch.randn(V, 8, generator=generator)
    targets = random_targets()
    weights_BT = torch.rand(3, 11, generator=generator)
    loss_BT = frozen_unembed_loss(h_BTD, unembed_VD, targets, block_elements=block_elements)
    (grad,) = torch.autograd.grad((loss_BT * weights_BT).sum(), h_BTD)
    h_ref = h_BTD.detach().double().requires_grad_(True)
    expected_BT = F.cross_entropy(F.linear(h_ref, unembed_VD.double()).flatten(0, 1), targets.flatten(),
                                  reduction="none").view(3, 11)
    (expected_grad,) = torch.autograd.grad((expected_BT * weights_BT.double()).sum(), h_ref)
    torch.testing.assert_close(loss_BT, expected_BT.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient wanted: the loss alone
        torch.testing.assert_close(frozen_unembed_loss(h_BTD, unembed_VD, targets), loss_BT.detach())


def test_frozen_unembed_loss_refuses_a_trainable_unembedding_and_other_dtypes():
    h_BTD, targets = torch.randn(2, 3, 8), random_targets((2, 3))
    with pytest.raises(ValueError, match="requires_grad_"):
        frozen_unembed_loss(h_BTD, torch.randn(V, 8, requires_grad=True), targets)
    with pytest.raises(ValueError, match="fp32"):
        frozen_unembed_loss(h_BTD.bfloat16(), torch.randn(V, 8).bfloat16(), targets)
    with pytest.raises(ValueError, match="do not match"):
        frozen_unembed_loss(h_BTD, torch.randn(V, 8), targets[:, :2])


def test_loss_from_gives_cross_entropy_and_its_gradient_with_a_frozen_or_trainable_unembedding():
    """GPT.loss_from: F.cross_entropy's value and dL/dh whether the unembedding is frozen (frozen_unembed_loss)
    or trainable (token_loss, whose weight gradient flows)."""
    from schemas.configs import ModelConfig
    from stages.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, num_heads=2, d_model=16), V, 8).eval()
    inputs, targets = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))
    h = model.residual_after(inputs, 0).detach()
    grads = []
    for frozen in (True, False):
        model.requires_grad_(not frozen)
        h_req = h.clone().requires_grad_(True)
        loss = model.loss_from(h_req, 0, targets)
        expected = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        grads.append(torch.autograd.grad(loss, h_req)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
