"""A generative head must reproduce a multi-modal action distribution, not its mean.

The data: every chunk is +0.8 or -0.8 everywhere (a fair coin per sample) plus a little noise; the observation
says nothing about which. A regression head trained with MSE converges to the mean chunk (~0), which
`both_modes` rejects; a flow-matching or EDM head must put samples near both modes and almost none in between.
"""

from __future__ import annotations

import pytest
import torch

from vla.action import ActionHead
from vla.backbones.prefix import Prefix
from vla.config import ActionConfig, ObjectiveConfig

MODE, CHUNK, DIM, BATCH = 0.8, 4, 2, 32


def both_modes(chunks: torch.Tensor) -> bool:
    """True if at least 20 % of the chunks sit near each mode (within 0.4) and at most 10 % near the mean (0)."""
    m = chunks.mean(dim=(1, 2))
    near_pos = ((m - MODE).abs() < 0.4).float().mean()
    near_neg = ((m + MODE).abs() < 0.4).float().mean()
    near_mean = (m.abs() < 0.3).float().mean()
    return bool(near_pos >= 0.2 and near_neg >= 0.2 and near_mean <= 0.1)


def test_the_mode_check_rejects_the_mean_and_a_single_mode():
    assert not both_modes(torch.zeros(64, CHUNK, DIM))  # what an MSE regression head predicts
    assert not both_modes(torch.full((64, CHUNK, DIM), MODE))  # mode collapse
    coin = (torch.arange(64) % 2 * 2 - 1).float()[:, None, None]
    assert both_modes(coin * MODE * torch.ones(64, CHUNK, DIM))


@pytest.mark.parametrize("kind", ["flow", "edm"])
def test_head_reproduces_both_modes_of_a_bimodal_action_distribution(kind):
    torch.manual_seed(0)
    cfg = ActionConfig(chunk_size=CHUNK, n_action_steps=2, width=32, num_heads=2, ffn_dim=64, layers="d,nm",
                       nm_num_experts=4, nm_top_k=2)
    head = ActionHead(cfg, ObjectiveConfig(kind=kind, num_inference_steps=10), prefix_width=8, prefix_layers=None,
                      action_dim=DIM, state_dim=2)
    prefix = Prefix(torch.ones(BATCH, 1, 8), torch.ones(BATCH, 1, dtype=torch.bool))
    state, ones = torch.zeros(BATCH, 2), torch.ones(BATCH, 2, dtype=torch.bool)
    pad = torch.zeros(BATCH, CHUNK, dtype=torch.bool)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0, foreach=True)
    for _ in range(250):
        coin = torch.randint(0, 2, (BATCH, 1, 1)).float() * 2 - 1
        actions = coin * MODE + 0.05 * torch.randn(BATCH, CHUNK, DIM)
        loss = head.compute_loss(prefix, state, ones, actions, ones, pad)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    big = 128
    samples = head.sample(Prefix(torch.ones(big, 1, 8), torch.ones(big, 1, dtype=torch.bool)),
                          torch.zeros(big, 2), torch.ones(big, 2, dtype=torch.bool),
                          torch.ones(big, 2, dtype=torch.bool)).actions
    assert both_modes(samples), samples.mean(dim=(1, 2))
