"""The labelling rules of extract_concepts (stages/models/sae.window_concepts, ExtractConfig.attribution) on known
tiny models: window-mean gradient, per-token gradient, and activation ranking, with hand-checkable labels."""

import math

import pytest
import torch
import torch.nn.functional as F

from schemas.configs import ExtractConfig, ModelConfig
from stages.models.gpt import GPT
from stages.models.sae import TopKSAE, token_loss_grads, window_concepts


class LinearLoss:
    """A position-wise "model": the residual at layer 0 is the input row itself, and loss_from is the window mean
    of c_t . h_t, so dL/dh_t = c_t / T by hand."""

    def __init__(self, h_BTD: torch.Tensor, c_TD: torch.Tensor):
        self.h_BTD, self.c_TD = h_BTD, c_TD

    def residual_after(self, inputs_BT, layer):
        return self.h_BTD

    def loss_from(self, h_BTD, layer, targets_BT):
        return (h_BTD * self.c_TD).sum(-1).mean()


def identity_sae(d: int = 4, k: int = 2) -> TopKSAE:
    """Latent i = the i-th coordinate of the layer-normalised residual (W_enc = W_dec = I, no biases)."""
    sae = TopKSAE(d, d, k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def test_window_mean_and_activation_labels_by_hand():
    # h = [3, 1, -1, -3]: layer-normalised (unbiased std sqrt(20/3)) it is [1.162, 0.387, -0.387, -1.162], so
    # the active latents (k = 2) are 0 and 1 with those activations
    h = torch.tensor([[[3.0, 1.0, -1.0, -3.0], [3.0, 1.0, -1.0, -3.0]]])
    c = torch.tensor([[-1.0, 2.0, 0.0, 0.0], [1.0, -2.0, 0.0, 0.0]])  # dL/dh_t = c_t / 2
    model, sae = LinearLoss(h, c), identity_sae()
    inputs = targets = torch.zeros(1, 2, dtype=torch.long)
    a0, a1 = 3 / math.sqrt(20 / 3), 1 / math.sqrt(20 / 3)
    ids, scores, _, _ = window_concepts(model, sae, inputs, targets, 0, top=1)
    # position 0: latent 0 scores a0 * (-1/2) = -0.581, latent 1 scores a1 * (2/2) = +0.387 -> latent 1
    # position 1: the signs flip -> latent 0 (+0.581)
    assert ids.tolist() == [[1], [0]]
    assert scores[:, 0].tolist() == pytest.approx([a1, a0 / 2], rel=1e-4)
    ids, scores, _, _ = window_concepts(model, sae, inputs, targets, 0, top=1, attribution="activation")
    assert ids.tolist() == [[0], [0]]  # the larger activation, whatever the gradient says
    assert scores[:, 0].tolist() == pytest.approx([a0, a0], rel=1e-4)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(num_layers=3, num_heads=2, d_model=16), vocab_size=11, max_seq_len=8).eval()


def test_token_gradient_is_each_positions_own_loss_gradient():
    model, layer = tiny_gpt(), 0
    inputs = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = model.residual_after(inputs, layer)
    got = token_loss_grads(model, h, layer, targets)
    for t in range(6):  # brute force: the full window's graph, only position t's loss, its gradient at h_t
        h_req = h.clone().requires_grad_(True)
        out, _ = model.run_blocks(h_req, layer + 1, model.num_trunk_layers + 1)
        loss_t = F.cross_entropy(model.logits(out)[:, t].float(), targets[:, t], reduction="sum")
        (grad,) = torch.autograd.grad(loss_t, h_req)
        assert torch.allclose(got[:, t], grad[:, t], atol=1e-5)
    # the last position's loss is the only one its residual reaches: there the window mean's gradient is the
    # per-token one over T; at earlier positions the later losses make them differ
    h_req = h.clone().requires_grad_(True)
    (mean_grad,) = torch.autograd.grad(model.loss_from(h_req, layer, targets) * 2, h_req)
    assert torch.allclose(mean_grad[:, -1] * 6, got[:, -1], atol=1e-5)
    assert not torch.allclose(mean_grad[:, 0] * 6, got[:, 0], atol=1e-3)


def test_token_rule_labels_use_the_per_token_gradient():
    model, layer = tiny_gpt(), 0
    sae = TopKSAE(16, 32, 4, generator=torch.Generator().manual_seed(3))
    inputs = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(2))
    ids, scores, vals, idx = window_concepts(model, sae, inputs, targets, layer, top=2, attribution="token")
    with torch.no_grad():
        grad = token_loss_grads(model, model.residual_after(inputs, layer), layer, targets).flatten(0, 1)
    expected = vals * torch.einsum("nkd,nd->nk", sae.W_dec[idx], grad)
    best = expected.topk(2, dim=-1).indices
    assert ids.tolist() == idx.gather(-1, best).tolist()
    with pytest.raises(ValueError, match="attribution must be one of"):
        window_concepts(model, sae, inputs, targets, layer, top=2, attribution="mean")


def test_the_default_rule_keeps_the_extract_config_dump():
    assert "attribution" not in ExtractConfig().model_dump()
    assert ExtractConfig(attribution="token").model_dump()["attribution"] == "token"
