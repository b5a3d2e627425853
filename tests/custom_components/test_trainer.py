from __future__ import annotations

import copy
import math

import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import UNet

from custom_components import (
    DualAttentionKeys,
    DualAttentionTrainer,
    GlobalCritic,
    LocalDiscriminator,
    Variant,
    image_panels,
    scalar_outputs,
    uses_global_critic,
    uses_local_discriminator,
    validate_hyperparameters,
)


def _batches(spatial_dims: int, n: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(0)
    shape = (2, 1) + (size,) * spatial_dims
    return [{"image": torch.rand(shape, generator=g), "label": torch.rand(shape, generator=g)} for _ in range(n)]


def _make(variant, spatial_dims=2, **kwargs):
    torch.manual_seed(0)
    g = UNet(spatial_dims, 1, 1, (4, 8, 16), (2, 2), num_res_units=0)
    d1 = GlobalCritic(spatial_dims, channels=(4, 8, 8, 8), fc_features=(8, 4, 1)) if uses_global_critic(variant) else None
    d2 = LocalDiscriminator(spatial_dims, channels=(4, 4, 8, 8)) if uses_local_discriminator(variant) else None
    factory = lambda params: torch.optim.Adam(params, lr=1e-3)  # noqa: E731
    trainer = DualAttentionTrainer(
        "cpu", 1, _batches(spatial_dims), g, torch.optim.Adam(g.parameters(), lr=1e-3), variant,
        d1, factory, d2, factory, **kwargs,
    )
    return trainer, g, d1, d2


def _changed(net, before):
    return any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), before.values()))


EXPECTED_TERMS = {
    "unet": set(),
    "global": {"loss_critic", "gradient_penalty", "wasserstein", "loss_adv_global"},
    "local": {"loss_local_d", "loss_adv_local", "confidence_mean"},
    "dual": {"loss_critic", "gradient_penalty", "wasserstein", "loss_adv_global", "loss_local_d", "loss_adv_local",
             "confidence_mean"},
}
EXPECTED_TERMS["dual_attention"] = EXPECTED_TERMS["dual"]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("variant", [v.value for v in Variant])
def test_variant_updates_exactly_its_networks(variant, spatial_dims):
    trainer, g, d1, d2 = _make(variant, spatial_dims)
    before = {name: copy.deepcopy(net.state_dict()) for name, net in (("g", g), ("d1", d1), ("d2", d2)) if net}
    trainer.run()
    assert _changed(g, before["g"])
    assert (d1 is not None) == uses_global_critic(variant)
    assert (d2 is not None) == uses_local_discriminator(variant)
    if d1 is not None:
        assert _changed(d1, before["d1"])
    if d2 is not None:
        assert _changed(d2, before["d2"])
    out = trainer.state.output
    scalars = scalar_outputs(out)
    assert set(scalars) == {"loss", "loss_recon", "attention_mean"} | EXPECTED_TERMS[variant]
    assert all(isinstance(v, float) for v in scalars.values())
    assert (out[DualAttentionKeys.ATTENTION_MEAN] < 1.0) == (variant == "dual_attention")
    panels = image_panels(out)
    assert panels.shape[1] == (2 if uses_local_discriminator(variant) else 1)
    assert set(trainer.checkpoint_dict()) == {"generator", "g_optimizer", "trainer"} | (
        {"global_critic", "global_optimizer"} if d1 else set()) | (
        {"local_discriminator", "local_optimizer"} if d2 else set())


def test_total_loss_is_eq7():
    trainer, *_ = _make("dual", lambda_adv_global=0.3, lambda_adv_local=0.7)
    trainer.run()
    o = trainer.state.output
    assert o["loss"] == pytest.approx(o["loss_recon"] + 0.3 * o["loss_adv_global"] + 0.7 * o["loss_adv_local"], rel=1e-5)


def test_attention_warmup_keeps_plain_l1():
    trainer, *_ = _make("dual_attention", attention_warmup=2)  # both iterations inside the warm-up
    trainer.run()
    assert trainer.state.output["attention_mean"] == 1.0
    assert trainer.attention_active(3) and not trainer.attention_active(2)


def test_dual_attention_with_beta_zero_matches_dual():
    a, g_a, *_ = _make("dual_attention", beta=0.0)
    b, g_b, *_ = _make("dual")
    torch.manual_seed(1)
    a.run()
    torch.manual_seed(1)
    b.run()
    for x, y in zip(g_a.state_dict().values(), g_b.state_dict().values()):
        assert torch.allclose(x, y)


def test_n_critic_steps_the_critic_more_often():
    trainer, _, d1, _ = _make("global", n_critic=3)
    trainer.run()
    steps = trainer.global_optimizer.state[next(iter(d1.parameters()))]["step"]
    assert int(steps) == 3 * 2  # 3 critic steps on each of the 2 batches


def test_variant_and_network_mismatch_errors():
    g = UNet(2, 1, 1, (4, 8), (2,), num_res_units=0)
    opt = torch.optim.Adam(g.parameters())
    with pytest.raises(ValueError, match="variant must be one of"):
        DualAttentionTrainer("cpu", 1, [], g, opt, "triple")
    with pytest.raises(ValueError, match="needs global_critic"):
        DualAttentionTrainer("cpu", 1, [], g, opt, "global")
    with pytest.raises(ValueError, match="does not use local_discriminator"):
        DualAttentionTrainer("cpu", 1, [], g, opt, "unet", local_discriminator=LocalDiscriminator(),
                             local_optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match="beta"):
        DualAttentionTrainer("cpu", 1, [], g, opt, "unet", beta=-0.5)


@pytest.mark.parametrize("kwargs,name", [
    ({"variant": "gan"}, "variant"), ({"beta": -1}, "beta"), ({"p": 3}, "p must"), ({"lambda_gp": -1}, "lambda_gp"),
    ({"n_critic": 0}, "n_critic"), ({"attention_warmup": -2}, "attention_warmup"), ({"attention_norm": "max"}, "attention_norm"),
])
def test_validate_hyperparameters_names_the_option(kwargs, name):
    with pytest.raises(ValueError, match=name):
        validate_hyperparameters(**kwargs)


def test_bf16_autocast_trains_all_networks_on_cpu():
    trainer, g, d1, d2 = _make("dual_attention", precision="bf16")
    before = [copy.deepcopy(n.state_dict()) for n in (g, d1, d2)]
    trainer.run()
    assert all(_changed(n, b) for n, b in zip((g, d1, d2), before))
    assert all(math.isfinite(v) for v in scalar_outputs(trainer.state.output).values())


def test_fp16_needs_cuda_and_bad_precision_is_named():
    with pytest.raises(ValueError, match="fp16"):
        _make("unet", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        _make("unet", precision="int8")


def test_lazy_gradient_penalty_every_k_critic_steps():
    trainer, *_ = _make("global", n_critic=1, gp_interval=2)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output.get("gradient_penalty")))
    trainer.run()
    assert seen[0] is None and seen[1] is not None


def test_non_finite_loss_stops_before_updating_and_names_the_term():
    trainer, g, d1, d2 = _make("dual")
    trainer.run()  # one good epoch
    good = [copy.deepcopy(n.state_dict()) for n in (g, d1, d2)]
    bad = _batches(2)
    bad[0]["label"][0, 0, 0, 0] = float("nan")  # a NaN in the target poisons the critic loss first
    trainer.state.max_epochs = 2
    trainer.data_loader = bad
    trainer.set_data(bad)
    with pytest.raises(FloatingPointError, match=r"iteration 3 .*'loss_critic' is nan"):
        trainer.run()
    assert not any(_changed(n, b) for n, b in zip((g, d1, d2), good))
