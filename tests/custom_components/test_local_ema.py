"""local_ema: F's confidence map from an exponential moving average of D2's weights (issue 16, item 3)."""

from __future__ import annotations

import pytest
import torch

from custom_components import DualAttentionKeys, DualAttentionTrainer, GlobalCritic, LocalDiscriminator
from custom_components.losses.synthesis import attention_weight, confidence_map
from unit_options import trainer_options
from monai.networks.nets import UNet


def _make(**kwargs):
    torch.manual_seed(0)
    g = UNet(2, 1, 1, (4, 8, 16), (2, 2), num_res_units=0)
    d1 = GlobalCritic(2, channels=(4, 8, 8, 8), fc_features=(8, 4, 1))
    d2 = LocalDiscriminator(2, channels=(4, 4, 8, 8))
    factory = lambda params: torch.optim.Adam(params, lr=1e-2)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    batches = [{"source": torch.rand(2, 1, 16, 16, generator=gen), "target": torch.rand(2, 1, 16, 16, generator=gen)}]
    trainer = DualAttentionTrainer("cpu", 1, batches, g, torch.optim.Adam(g.parameters(), lr=1e-3), "dual_attention",
                                   d1, factory, d2, factory, **trainer_options(**kwargs))
    return trainer, d2, batches[0]["source"], batches[0]["target"]


def test_the_average_follows_d2_with_the_decay():
    trainer, d2, source, target = _make(local_ema=0.9)
    ema = trainer.local_discriminator_ema
    trainer.local_step(source, target, target * 0.5)  # the first update copies D2
    first = [p.detach().clone() for p in d2.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), first))
    trainer.local_step(source, target, target * 0.5)
    for avg, old, new in zip(ema.module.parameters(), first, d2.parameters()):
        assert torch.allclose(avg, 0.9 * old + 0.1 * new.detach(), atol=1e-6)
    assert not all(torch.equal(a, b.detach()) for a, b in zip(ema.module.parameters(), d2.parameters()))


def test_the_attention_map_comes_from_the_averaged_d2_and_the_adversarial_term_from_the_live_one():
    trainer, d2, source, target = _make(local_ema=0.5, beta=2.0)
    trainer.local_step(source, target, target * 0.5)
    with torch.no_grad():  # an averaged D2 that finds every voxel half real: M = 0.5, F = (1 - 0.5)^2 everywhere
        for p in trainer.local_discriminator_ema.module.parameters():
            p.zero_()
    trainer.state.iteration = 1
    out = trainer.generator_step(source, target)
    assert out[DualAttentionKeys.ATTENTION_MEAN] == pytest.approx(0.25)
    live = confidence_map(d2(out[DualAttentionKeys.PRED]))
    assert torch.allclose(out[DualAttentionKeys.CONFIDENCE], live, atol=1e-6)  # logged M: the live D2
    assert float(attention_weight(live, 2.0).std()) > 0  # the live D2's F would not be uniform


def test_without_the_average_the_attention_uses_the_live_d2():
    trainer, d2, source, target = _make(beta=2.0)
    assert trainer.local_discriminator_ema is None and "local_discriminator_ema" not in trainer.checkpoint_dict()
    trainer.state.iteration = 1
    out = trainer.generator_step(source, target)
    expected = attention_weight(confidence_map(d2(out[DualAttentionKeys.PRED])), 2.0)
    assert out[DualAttentionKeys.ATTENTION_MEAN] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_the_average_is_checkpointed():
    trainer, _, source, target = _make(local_ema=0.9)
    trainer.local_step(source, target, target * 0.5)
    state = trainer.checkpoint_dict()["local_discriminator_ema"].state_dict()
    other, *_ = _make(local_ema=0.9)
    other.checkpoint_dict()["local_discriminator_ema"].load_state_dict(state)
    assert int(other.local_discriminator_ema.n_averaged) == 1
    for a, b in zip(other.local_discriminator_ema.parameters(), trainer.local_discriminator_ema.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.9", True])
def test_bad_decays_are_refused(value):
    with pytest.raises(ValueError, match="local_ema"):
        _make(local_ema=value)
