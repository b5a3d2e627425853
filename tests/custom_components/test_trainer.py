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
    all_variants,
    uses_global_critic,
    uses_local_discriminator,
    validate_hyperparameters,
)
from custom_components.engines.events import DualAttentionEvents
from custom_components.handlers.training import image_panels, loss_terms
from unit_options import trainer_options


#: the networks each variant trains, written out from the paper (section 3.1-3.2) rather than computed from
#: ``uses_global_critic``/``uses_local_discriminator``, so a wrong predicate or a skipped sub-step shows up
NETWORKS = {
    Variant.UNET: {"g"},
    Variant.GLOBAL: {"g", "d1"},
    Variant.LOCAL: {"g", "d2"},
    Variant.DUAL: {"g", "d1", "d2"},
    Variant.DUAL_ATTENTION: {"g", "d1", "d2"},
    Variant.ERROR_WEIGHTED: {"g"},
}


def _batches(spatial_dims: int, n: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(0)
    shape = (2, 1) + (size,) * spatial_dims
    return [{"source": torch.rand(shape, generator=g), "target": torch.rand(shape, generator=g)} for _ in range(n)]


def _make(variant, spatial_dims=2, max_epochs=1, **kwargs):
    torch.manual_seed(0)
    g = UNet(spatial_dims, 1, 1, (4, 8, 16), (2, 2), num_res_units=0)
    nets = NETWORKS[Variant(variant)]
    d1 = GlobalCritic(spatial_dims, channels=(4, 8, 8, 8), fc_features=(8, 4, 1)) if "d1" in nets else None
    d2 = LocalDiscriminator(spatial_dims, channels=(4, 4, 8, 8)) if "d2" in nets else None
    factory = lambda params: torch.optim.Adam(params, lr=1e-3)  # noqa: E731
    trainer = DualAttentionTrainer(
        "cpu", max_epochs, _batches(spatial_dims), g, torch.optim.Adam(g.parameters(), lr=1e-3), variant,
        d1, factory, d2, factory, **trainer_options(**kwargs),
    )
    return trainer, g, d1, d2


def _changed(net, before):
    return any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), before.values()))


EXPECTED_TERMS = {
    "unet": set(),
    "global": {"loss_global_critic", "gradient_penalty", "wasserstein", "loss_adv_global"},
    "local": {"loss_local_discriminator", "loss_adv_local", "confidence_mean"},
    "dual": {"loss_global_critic", "gradient_penalty", "wasserstein", "loss_adv_global", "loss_local_discriminator", "loss_adv_local",
             "confidence_mean"},
}
EXPECTED_TERMS["dual_attention"] = EXPECTED_TERMS["dual"]
EXPECTED_TERMS["error_weighted"] = set()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("variant", [v.value for v in Variant])
def test_variant_updates_exactly_its_networks(variant, spatial_dims):
    trainer, g, d1, d2 = _make(variant, spatial_dims)  # the trainer refuses networks its variant does not use
    nets = {name: net for name, net in (("g", g), ("d1", d1), ("d2", d2)) if net is not None}
    before = {name: copy.deepcopy(net.state_dict()) for name, net in nets.items()}
    trainer.run()
    assert {name for name, net in nets.items() if _changed(net, before[name])} == NETWORKS[Variant(variant)]
    out = trainer.state.output
    scalars = loss_terms(out)
    assert set(scalars) == {"loss", "loss_recon", "attention_mean"} | EXPECTED_TERMS[variant]
    assert all(isinstance(v, float) for v in scalars.values())
    assert (out[DualAttentionKeys.ATTENTION_MEAN] < 1.0) == (variant in ("dual_attention", "error_weighted"))
    panels = image_panels(out)
    assert panels.shape[1] == (2 if "d2" in NETWORKS[Variant(variant)] else 1)  # G(X), and M when D2 is trained
    assert set(trainer.checkpoint_dict()) == {"generator", "g_optimizer", "trainer"} | (
        {"global_critic", "global_optimizer"} if d1 else set()) | (
        {"local_discriminator", "local_optimizer"} if d2 else set())


def test_all_variants_are_the_five_of_the_paper_then_the_error_weighted_baseline():
    """The arms of scripts/ablation.py and the rows of scripts/benchmark.py: the UNet reference, the GANs, then the
    error-weighted L1 the paper never compared with."""
    assert all_variants() == ["unet", "global", "local", "dual", "dual_attention", "error_weighted"]


@pytest.mark.parametrize("variant", list(Variant))
def test_network_predicates_follow_the_paper(variant):
    assert uses_global_critic(variant) == ("d1" in NETWORKS[variant])
    assert uses_local_discriminator(variant) == ("d2" in NETWORKS[variant])


def test_total_loss_is_eq7():
    trainer, *_ = _make("dual", lambda_adv_global=0.3, lambda_adv_local=0.7)
    trainer.run()
    o = trainer.state.output
    assert o["loss"] == pytest.approx(o["loss_recon"] + 0.3 * o["loss_adv_global"] + 0.7 * o["loss_adv_local"], rel=1e-5)


def test_attention_warmup_keeps_plain_l1():
    trainer, *_ = _make("dual_attention", attention_warmup=1)  # iteration 1 inside the warm-up, 2 after it
    means = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: means.append(e.state.output["attention_mean"]))
    trainer.run()
    assert means[0] == 1.0 and means[1] != 1.0
    assert trainer.attention_active(2) and not trainer.attention_active(1)


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "dual", "adversarial_warmup": 2}, "discriminators would never train"),
    ({"variant": "dual_attention", "adversarial_warmup": 1, "attention_warmup": 1}, "attention would never start"),
    ({"variant": "error_weighted", "adversarial_warmup": 0, "attention_warmup": 2}, "attention would never start"),
])
def test_a_run_whose_phase_never_begins_is_refused_before_any_update(kwargs, message):
    """A warm-up as long as the run used to give a silent UNet (the discriminators never trained, nothing said so)."""
    trainer, g, *_ = _make(**kwargs)  # 1 epoch of 2 iterations
    before = copy.deepcopy(g.state_dict())
    with pytest.raises(ValueError, match=message):
        trainer.run()
    assert not _changed(g, before)


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
        DualAttentionTrainer("cpu", 1, [], g, opt, "triple", **trainer_options())
    with pytest.raises(ValueError, match="needs global_critic"):
        DualAttentionTrainer("cpu", 1, [], g, opt, "global", **trainer_options())
    with pytest.raises(ValueError, match="does not use local_discriminator"):
        DualAttentionTrainer("cpu", 1, [], g, opt, "unet", local_discriminator=LocalDiscriminator(),
                             local_optimizer=torch.optim.Adam, **trainer_options())
    with pytest.raises(ValueError, match="beta"):
        DualAttentionTrainer("cpu", 1, [], g, opt, "unet", **trainer_options(beta=-0.5))


@pytest.mark.parametrize("kwargs,name", [
    ({"variant": "gan"}, "variant"), ({"beta": -1}, "beta"), ({"p": 3}, "p must"), ({"lambda_gp": -1}, "lambda_gp"),
    ({"n_critic": 0}, "n_critic"), ({"attention_warmup": -2}, "attention_warmup"), ({"attention_norm": "max"}, "attention_norm"),
])
def test_validate_hyperparameters_names_the_option(kwargs, name):
    validate_hyperparameters(**trainer_options(variant="dual_attention"))  # the unit tests' options are valid
    with pytest.raises(ValueError, match=name):
        validate_hyperparameters(**trainer_options(**{"variant": "dual_attention", **kwargs}))


def test_validate_hyperparameters_refuses_a_mistyped_option_instead_of_dropping_it():
    with pytest.raises(ValueError, match=r"'lamda_gp' \(value 5\) is not a training option: did you mean 'lambda_gp'"):
        validate_hyperparameters(**trainer_options(variant="dual_attention"), lamda_gp=5)


def test_bf16_autocast_trains_all_networks_on_cpu():
    trainer, g, d1, d2 = _make("dual_attention", precision="bf16")
    before = [copy.deepcopy(n.state_dict()) for n in (g, d1, d2)]
    trainer.run()
    assert all(_changed(n, b) for n, b in zip((g, d1, d2), before))
    assert all(math.isfinite(v) for v in loss_terms(trainer.state.output).values())


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
    bad[0]["target"][0, 0, 0, 0] = float("nan")  # a NaN in the target poisons the critic loss first
    trainer.state.max_epochs = 2
    trainer.data_loader = bad
    trainer.set_data(bad)
    with pytest.raises(FloatingPointError, match=r"iteration 3 .*'loss_global_critic' is nan"):
        trainer.run()
    assert not any(_changed(n, b) for n, b in zip((g, d1, d2), good))


# ----------------------------------------------------------------------------------------------------------------------
# Direction tests: each sub-step of the trainer, on one fixed batch, moves its network the way the paper's equation says.
# ----------------------------------------------------------------------------------------------------------------------
def _fixed_batch(size: int = 16):
    g = torch.Generator().manual_seed(1)
    source = torch.rand(4, 1, size, size, generator=g)
    target = (1.0 - source) * 0.8 + 0.1 * torch.rand(4, 1, size, size, generator=g)
    return source, target


def _critic_gap(d1, target, fake):
    with torch.no_grad():
        return float(d1(target).mean() - d1(fake).mean())


def _mean_confidence(d2, image):
    with torch.no_grad():
        return float(torch.sigmoid(d2(image)).mean())


def test_critic_step_widens_the_wasserstein_gap():
    trainer, g, d1, _ = _make("global", lambda_gp=0.0)  # the Wasserstein term of Eq. 2 alone
    source, target = _fixed_batch()
    fake = g(source).detach()
    before = _critic_gap(d1, target, fake)
    for _ in range(2):
        trainer.critic_step(source, target, fake)
    scored_by = copy.deepcopy(d1)  # the critic the third step scores with, before its update
    out = trainer.critic_step(source, target, fake)
    assert _critic_gap(d1, target, fake) > before  # Eq. 2: D1 learns to score Y above G(X)
    # the reported estimate is E[D1(Y)] - E[D1(G(X))] of the critic the step scored with
    expected = _critic_gap(scored_by, target, fake)
    assert out[DualAttentionKeys.WASSERSTEIN] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_local_step_raises_confidence_on_real_and_lowers_it_on_synthetic():
    trainer, g, _, d2 = _make("local")
    source, target = _fixed_batch()
    fake = g(source).detach()
    real_before, fake_before = _mean_confidence(d2, target), _mean_confidence(d2, fake)
    for _ in range(3):
        trainer.local_step(source, target, fake)
    assert _mean_confidence(d2, target) > real_before  # Eq. 4: real voxels -> 1
    assert _mean_confidence(d2, fake) < fake_before  # Eq. 4: synthetic voxels -> 0


def _adversarial_only_step(trainer, g, source):
    """A G step whose voxel loss has no gradient (target = current G(X)), so only L_ADV1/L_ADV2 move G."""
    with torch.no_grad():
        g.train()
        target = g(source).clone()
    trainer.state.iteration = max(trainer.state.iteration, 1)  # 1-based, as during a run
    trainer.generator_step(source, target)


def test_generator_adversarial_term_global_moves_critic_score_of_synthetic_up():
    trainer, g, d1, _ = _make("global")
    source, target = _fixed_batch()
    for _ in range(3):  # a critic that already separates real from synthetic
        trainer.critic_step(source, target, g(source).detach())
    with torch.no_grad():
        before = float(d1(g(source)).mean())
    for _ in range(3):
        _adversarial_only_step(trainer, g, source)
    with torch.no_grad():
        after = float(d1(g(source)).mean())
    assert after > before  # Eq. 3: G maximises D1(G(X))


def test_generator_adversarial_term_local_moves_confidence_of_synthetic_up():
    trainer, g, _, d2 = _make("local")
    source, target = _fixed_batch()
    for _ in range(3):
        trainer.local_step(source, target, g(source).detach())
    with torch.no_grad():
        before = _mean_confidence(d2, g(source))
    for _ in range(3):
        _adversarial_only_step(trainer, g, source)
    with torch.no_grad():
        after = _mean_confidence(d2, g(source))
    assert after > before  # Eq. 5: G pushes D2(G(X)) toward "real"


def test_generator_step_leaves_discriminators_unchanged_and_trainable():
    trainer, g, d1, d2 = _make("dual_attention")
    source, target = _fixed_batch()
    trainer.critic_step(source, target, g(source).detach())
    trainer.local_step(source, target, g(source).detach())
    before = {n: copy.deepcopy(net.state_dict()) for n, net in (("d1", d1), ("d2", d2), ("g", g))}
    trainer.state.iteration = 1
    trainer.generator_step(source, target)
    assert not _changed(d1, before["d1"]) and not _changed(d2, before["d2"])
    assert _changed(g, before["g"])
    assert all(p.requires_grad for net in (d1, d2) for p in net.parameters())


def test_trainer_penalty_equals_gradient_penalty_module():
    from custom_components import GradientPenalty

    trainer, g, d1, _ = _make("global", lambda_gp=10.0)
    source, target = _fixed_batch()
    fake = g(source).detach()
    reference_critic = copy.deepcopy(d1)
    torch.manual_seed(7)
    out = trainer.critic_step(source, target, fake)
    torch.manual_seed(7)  # same interpolation coefficients
    expected = GradientPenalty(10.0)(reference_critic, target, fake)
    assert out[DualAttentionKeys.GP] == pytest.approx(float(expected.detach()), rel=1e-4)
    assert out[DualAttentionKeys.GP] > 0


@pytest.mark.parametrize("norm,floor", [("none", 0.0), ("mean", 0.0), ("mean", 0.4), ("none", 0.4)])
def test_attention_reaches_the_voxel_loss_as_specified(norm, floor):
    from custom_components import attention_weight

    trainer, g, _, d2 = _make("dual_attention", beta=2.0, attention_norm=norm, attention_floor=floor,
                              lambda_adv_global=0.0, lambda_adv_local=0.0)
    source, target = _fixed_batch()
    trainer.local_step(source, target, g(source).detach())
    with torch.no_grad():
        g.train()
        fake = g(source)
        m = torch.sigmoid(d2(fake))
    f = (1 - m) ** 2
    if norm == "mean":
        f = f / f.mean(dim=(1, 2, 3), keepdim=True)
    f = floor + (1 - floor) * f
    expected = float((f * (target - fake).abs()).mean())
    assert torch.allclose(attention_weight(m, 2.0, norm, floor), f, atol=1e-6)
    trainer.state.iteration = 1
    out = trainer.generator_step(source, target)
    assert out[DualAttentionKeys.RECON] == pytest.approx(expected, rel=1e-4)
    assert out[DualAttentionKeys.ATTENTION_MEAN] == pytest.approx(float(f.mean()), rel=1e-4)
    plain = float((target - fake).abs().mean())
    assert abs(out[DualAttentionKeys.RECON] - plain) > 1e-6  # the weighting changed the loss


def test_attention_is_off_during_warmup():
    trainer, g, _, d2 = _make("dual_attention", attention_warmup=5, lambda_adv_global=0.0, lambda_adv_local=0.0)
    source, target = _fixed_batch()
    trainer.state.iteration = 5
    with torch.no_grad():
        g.train()
        plain = float((target - g(source)).abs().mean())
    out = trainer.generator_step(source, target)
    assert out[DualAttentionKeys.RECON] == pytest.approx(plain, rel=1e-5)
    assert out[DualAttentionKeys.ATTENTION_MEAN] == 1.0


def test_conditional_local_discriminator_sees_source_then_image():
    torch.manual_seed(0)
    g = UNet(2, 1, 1, (4, 8, 16), (2, 2), num_res_units=0)
    d2 = LocalDiscriminator(2, in_channels=2, channels=(4, 4, 8, 8))
    seen = []
    d2.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    factory = lambda params: torch.optim.Adam(params, lr=1e-3)  # noqa: E731
    trainer = DualAttentionTrainer("cpu", 1, _batches(2), g, torch.optim.Adam(g.parameters(), lr=1e-3), "local",
                                   None, None, d2, factory, **trainer_options(local_conditional=True))
    source, target = _fixed_batch()
    fake = g(source).detach()
    trainer.local_step(source, target, fake)
    pair = seen[-1]
    assert pair.shape[1] == 2
    assert torch.equal(pair[:4, 0:1], source) and torch.equal(pair[:4, 1:2], target)
    assert torch.equal(pair[4:, 0:1], source) and torch.allclose(pair[4:, 1:2], fake)


@pytest.mark.parametrize("fresh,draws", [("none", 0), ("generator", 1), ("all", 3)])
def test_fresh_batches_draw_other_minibatches(fresh, draws):
    trainer, g, d1, d2 = _make("dual_attention", n_critic=3, fresh_batches=fresh, epoch_length=1)
    other = _fixed_batch(16)
    calls = []

    def next_batch():
        calls.append(1)
        return other

    trainer.next_batch = next_batch
    trainer.run()
    assert len(calls) == draws
    used = trainer.state.output[DualAttentionKeys.SOURCE]
    assert torch.equal(used, other[0]) == (fresh != "none")


def test_adversarial_warmup_trains_only_the_generator_first():
    trainer, g, d1, d2 = _make("dual_attention", max_epochs=2, adversarial_warmup=2, attention_warmup=1)
    before = {n: copy.deepcopy(net.state_dict()) for n, net in (("d1", d1), ("d2", d2), ("g", g))}
    outputs, after_warmup = [], {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(loss_terms(e.state.output)))

    @trainer.on(Events.EPOCH_COMPLETED(once=1))  # epoch 1 = 2 iterations: the warm-up
    def _(_):
        after_warmup.update(g=_changed(g, before["g"]), d1=_changed(d1, before["d1"]), d2=_changed(d2, before["d2"]))

    trainer.run()  # iterations 3-4: adversarial training
    assert after_warmup == {"g": True, "d1": False, "d2": False}
    assert all(set(o) == {"loss", "loss_recon", "attention_mean"} for o in outputs[:2])
    assert not trainer.attention_active(3) and trainer.attention_active(4)  # attention warm-up counts after it
    assert _changed(d1, before["d1"]) and _changed(d2, before["d2"])
    assert "loss_local_discriminator" in outputs[-1] and "loss_global_critic" in outputs[-1]
    assert outputs[-1]["attention_mean"] != 1.0


def test_error_source_weights_the_voxel_loss_by_the_true_error():
    """attention_source 'error' (the ablation's oracle): F = (e / max e)^beta, e = |Y - G(X)|, normalised by its mean."""
    trainer, g, _, d2 = _make("dual_attention", beta=2.0, attention_norm="mean", attention_source="error",
                              lambda_adv_global=0.0, lambda_adv_local=0.0)
    source, target = _fixed_batch()
    with torch.no_grad():
        g.train()
        fake = g(source)
    err = (target - fake).abs()
    f = (err / err.amax(dim=(1, 2, 3), keepdim=True)) ** 2
    f = f / f.mean(dim=(1, 2, 3), keepdim=True)
    expected = float((f * err).mean())
    trainer.state.iteration = 1
    out = trainer.generator_step(source, target)
    assert out[DualAttentionKeys.RECON] == pytest.approx(expected, rel=1e-4)
    # the voxels with the largest error weigh most: the weighted loss exceeds plain L1
    assert out[DualAttentionKeys.RECON] > float(err.mean()) * 1.05
    # D2's own map is still reported (and still trains D2), only F's map changed
    assert DualAttentionKeys.CONFIDENCE_MEAN in out


def test_unknown_attention_source_is_refused():
    with pytest.raises(ValueError, match="attention_source must be one of"):
        _make("dual_attention", attention_source="tumour")


def test_error_weighted_variant_weights_by_the_error_without_discriminators():
    """error_weighted: G alone, F from |Y - G(X)|; beta 0 makes it plain L1 (the unet variant)."""
    trainer, g, d1, d2 = _make("error_weighted", beta=2.0, attention_norm="mean")
    assert d1 is None and d2 is None and trainer.attention_source == "error"
    source, target = _fixed_batch()
    with torch.no_grad():
        g.train()
        err = (target - g(source)).abs()
    trainer.state.iteration = 1
    out = trainer.generator_step(source, target)
    assert out[DualAttentionKeys.RECON] > float(err.mean()) * 1.05  # the largest errors weigh most
    flat, *_ = _make("error_weighted", beta=0.0)
    flat.state.iteration = 1
    assert flat.generator_step(source, target)[DualAttentionKeys.RECON] == pytest.approx(float(err.mean()), rel=1e-5)


def test_mixed_local_target_labels_each_voxel_of_a_composite():
    trainer, _, _, d2 = _make("local", local_target="mixed", local_mix_cell=4)
    source, target = _fixed_batch()
    mask = trainer.mix_mask(target)
    assert mask.shape == (target.shape[0], 1, *target.shape[2:]) and set(mask.unique().tolist()) <= {0.0, 1.0}
    cells = mask[:, :, ::4, ::4]  # constant on 4 x 4 cells, both labels present
    assert torch.equal(mask, cells.repeat_interleave(4, 2).repeat_interleave(4, 3)) and 0 < mask.mean() < 1
    seen = []
    d2.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    trainer.local_step(source, target, target * 0.5)
    assert seen == [3 * target.shape[0]]  # real, fake and the composite in one forward pass
    binary, _, _, d2b = _make("local", n_local=3)
    calls = []
    d2b.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    binary.local_step(source, target, target * 0.5)
    assert calls == [2 * target.shape[0]] * 3  # n_local updates, real and fake only


def test_gap_source_is_zero_where_the_synthesis_equals_the_target():
    """attention_source 'gap': M from D2(Y) - D2(G(X)); where G(X) = Y the gap is 0 and F is uniform."""
    from custom_components.losses.synthesis import gap_confidence

    logits = torch.randn(2, 1, 8, 8)
    assert torch.allclose(gap_confidence(logits, logits), torch.ones_like(logits))
    fake = logits.clone()
    fake[:, :, 2:4, 2:4] -= 3.0  # D2 finds this region of G(X) much less real than the same region of Y
    m = gap_confidence(logits, fake)
    assert float(m[:, :, 2:4, 2:4].max()) < 0.01 and float(m.mean()) > 0.9
    trainer, *_ = _make("dual_attention", attention_source="gap", beta=2.0)
    source, target = _fixed_batch()
    trainer.state.iteration = 1
    out = trainer.generator_step(source, target)
    assert out[DualAttentionKeys.ATTENTION_MEAN] != 1.0


@pytest.mark.parametrize("kwargs, name", [
    ({"local_target": "soft"}, "local_target"), ({"n_local": 0}, "n_local"), ({"attention_smoothing": -1}, "attention_smoothing"),
    ({"local_mix_cell": 0}, "local_mix_cell"),
])
def test_new_d2_options_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _make("dual_attention", **kwargs)


def test_error_weighted_refuses_the_gap_source():
    with pytest.raises(ValueError, match="gap"):
        _make("error_weighted", attention_source="gap")


def _with_head(variant="unet", **kwargs):
    from custom_components.networks.nets import ErrorPredictor

    torch.manual_seed(0)
    head = ErrorPredictor(2, channels=(4, 4, 8, 8), stem_stride=1)
    factory = lambda params: torch.optim.Adam(params, lr=1e-2)  # noqa: E731
    trainer, g, d1, d2 = _make(variant, error_predictor=head, error_optimizer=factory, **kwargs)
    return trainer, g, head


def test_error_head_learns_where_the_synthesis_is_wrong():
    """The head regresses the detached |Y - G(X)|: after some updates on a fixed batch it ranks the error well."""
    from custom_components.metrics.synthesis import confidence_qa

    trainer, g, head = _with_head()
    source, noise = _fixed_batch(32)
    source = source.clone()
    source[:, :, 8:19, 8:19] = 1.0  # a region the source shows (e.g. a lesion) where the target differs
    fake = 0.2 + 0.4 * source.roll(1, dims=2)  # a synthetic image in [0, 1]
    target = fake + 0.05 * noise  # G is nearly right everywhere ...
    target[:, :, 8:19, 8:19] += 0.3  # ... but in the region: the error is large there (12 % of the voxels)
    losses = [trainer.error_step(source, target, fake)[DualAttentionKeys.ERROR_HEAD] for _ in range(150)]
    assert losses[-1] < 0.5 * losses[0]
    head.eval()
    with torch.no_grad():
        predicted = head(torch.cat([source, fake], dim=1))
    qa = confidence_qa(1.0 - predicted[0].clamp(0, 1), fake[0], target[0])
    assert qa["qa_auroc_worst"] > 0.9
    error = (target - fake).abs()
    inside = torch.zeros_like(error, dtype=torch.bool)
    inside[:, :, 8:19, 8:19] = True
    # it predicts the error's size, not just where it is: about 0.3 in the region, about 0.04 elsewhere
    assert abs(float(predicted[inside].mean()) - float(error[inside].mean())) < 0.1
    assert float(predicted[~inside].mean()) < 0.1
    assert set(trainer.checkpoint_dict()) >= {"error_predictor", "error_optimizer"}


def test_error_head_trains_in_every_iteration_and_feeds_the_predicted_attention():
    trainer, g, head = _with_head("dual_attention", attention_source="predicted", beta=2.0)
    before = copy.deepcopy(head.state_dict())
    trainer.run()
    assert _changed(head, before) and "loss_error_head" in trainer.state.output
    assert trainer.state.output[DualAttentionKeys.ATTENTION_MEAN] != 1.0
    with pytest.raises(ValueError, match="predicted"):
        _make("dual_attention", attention_source="predicted")  # no head


# --- issue 20, trainer correctness: batch-norm critic, the penalty counter at resume, extra batches under DDP ------


def _bn_critic(spatial_dims=2):
    torch.manual_seed(1)
    return GlobalCritic(spatial_dims, channels=(4, 8, 8, 8), fc_features=(8, 4, 1), norm="batch")


def test_generator_step_leaves_the_batch_norm_statistics_of_a_frozen_critic_unchanged():
    """paper.json trains D1 with batch norm: G's step must not move D1's running statistics with fake-only batches."""
    trainer, g, _, d2 = _make("dual")
    trainer.global_critic = _bn_critic()
    source, target = _fixed_batch()
    before = copy.deepcopy(trainer.global_critic.state_dict())
    trainer.state.iteration = 1
    trainer.generator_step(source, target)
    assert not _changed(trainer.global_critic, before)
    assert trainer.global_critic.training  # still in training mode: batch statistics in the forward pass


@pytest.mark.parametrize("batch_norm", [False, True])
def test_a_batch_norm_critic_scores_real_fake_and_interpolated_images_as_separate_batches(batch_norm):
    trainer, g, d1, _ = _make("global", n_critic=1, gp_interval=1)
    if batch_norm:
        trainer.global_critic = d1 = _bn_critic()
        trainer.global_optimizer = torch.optim.Adam(d1.parameters(), lr=1e-3)
    sizes = []
    d1.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    source, target = _fixed_batch()
    out = trainer.critic_step(source, target, g(source).detach())
    n = target.shape[0]
    assert DualAttentionKeys.GP in out
    assert sizes == ([n, n, n] if batch_norm else [3 * n])


def test_the_lazy_penalty_counter_is_resumed_with_the_engine_state():
    """A resumed run continued its penalty phase from 0: with gp_interval 2 the penalty moved by one critic step."""
    first, *_ = _make("global", n_critic=1, gp_interval=2, epoch_length=3)
    first.run()
    assert first.critic_steps == 3
    state = first.state_dict()
    resumed, g, *_ = _make("global", n_critic=1, gp_interval=2, epoch_length=3, max_epochs=2)
    resumed.load_state_dict(state)
    assert resumed.critic_steps == 3
    source, target = _fixed_batch()
    assert DualAttentionKeys.GP in resumed.critic_step(source, target, g(source).detach())  # step 4: penalty due
    old_format = {k: v for k, v in state.items() if k != "critic_steps"}  # checkpoints written before the fix
    again, *_ = _make("global", n_critic=1, gp_interval=2, epoch_length=3, max_epochs=2)
    again.load_state_dict(old_format)
    assert again.critic_steps == 3  # n_critic per adversarial iteration, derived from the iteration count


def test_extra_batches_under_a_distributed_sampler_are_not_the_iterations_own():
    """A second iterator over the same DistributedSampler repeats its permutation: G's 'other' mini-batch was the
    very batch D had just seen."""
    from torch.utils.data import DataLoader, DistributedSampler

    items = [{"source": torch.full((1, 8, 8), float(i)), "target": torch.full((1, 8, 8), float(i))} for i in range(16)]
    sampler = DistributedSampler(items, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(items, batch_size=2, sampler=sampler)
    trainer, *_ = _make("dual", fresh_batches="generator")
    trainer.data_loader = loader
    own = [batch["source"][:, 0, 0, 0].tolist() for batch in loader]
    extra = [trainer.next_batch()[0][:, 0, 0, 0].tolist() for _ in own]
    assert sorted(sum(extra, [])) == list(range(16))  # still every subject once per pass
    assert sum(a == b for a, b in zip(own, extra)) < len(own) // 2


# --- issue 20, item 4: sub-step events, the penalty as a handler of the critic's events ---------------------------


def test_each_update_fires_its_event_with_its_values_on_the_state():
    trainer, g, head = _with_head("dual_attention", n_critic=3, n_local=2, adversarial_warmup=1, max_epochs=2)
    counts, per_iteration, critic_steps, values = {}, [], [], {}
    for event in DualAttentionEvents:
        trainer.add_event_handler(event, lambda e, ev=event: counts.__setitem__(ev, counts.get(ev, 0) + 1))
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: (per_iteration.append(dict(counts)), counts.clear()))
    trainer.add_event_handler(DualAttentionEvents.CRITIC_COMPLETED, lambda e: critic_steps.append(e.state.critic_steps))
    trainer.add_event_handler(DualAttentionEvents.CRITIC_COMPLETED(every=2),
                              lambda e: values.setdefault("every_2nd", []).append(e.state.critic_steps))
    for event, key in ((DualAttentionEvents.CRITIC_COMPLETED, DualAttentionKeys.GLOBAL_CRITIC),
                       (DualAttentionEvents.LOCAL_DISCRIMINATOR_COMPLETED, DualAttentionKeys.LOCAL_DISCRIMINATOR),
                       (DualAttentionEvents.ERROR_HEAD_COMPLETED, DualAttentionKeys.ERROR_HEAD),
                       (DualAttentionEvents.GENERATOR_COMPLETED, DualAttentionKeys.LOSS)):
        trainer.add_event_handler(event, lambda e, k=key: values.__setitem__(k, e.state.step_output[k]))
    trainer.run()  # 4 iterations, the first a warm-up (G and the error head only)
    warmup = {DualAttentionEvents.ERROR_HEAD_COMPLETED: 1, DualAttentionEvents.GENERATOR_COMPLETED: 1}
    adversarial = {**warmup, DualAttentionEvents.CRITIC_STARTED: 3, DualAttentionEvents.CRITIC_LOSS_COMPLETED: 3,
                   DualAttentionEvents.CRITIC_COMPLETED: 3, DualAttentionEvents.LOCAL_DISCRIMINATOR_COMPLETED: 2}
    assert per_iteration == [warmup, adversarial, adversarial, adversarial]
    assert critic_steps == list(range(1, 10)) and values["every_2nd"] == [2, 4, 6, 8]  # filters count critic updates
    out = trainer.state.output
    keys = DualAttentionKeys
    for key in (keys.GLOBAL_CRITIC, keys.LOCAL_DISCRIMINATOR, keys.ERROR_HEAD, keys.LOSS):
        assert isinstance(values[key], float) and values[key] == out[key]  # the last update's values are reported


@pytest.mark.parametrize("gp_interval", [1, 2])
def test_the_penalty_handler_is_attached_and_adds_eq2s_penalty_in_the_critics_own_update(gp_interval):
    """With gp_interval 1 each update is Eq. 2 exactly: one step on E[D1(G(X))] - E[D1(Y)] + GP; with k, every k-th
    update adds k * GP in the same step. Checked against a hand-written update of a copy of the critic (plain SGD)."""
    from custom_components import GradientPenalty
    from custom_components.engines.penalty import GradientPenaltyHandler

    trainer, g, d1, _ = _make("global", n_critic=1, lambda_gp=10.0, gp_interval=gp_interval)
    handler = trainer.gradient_penalty
    assert isinstance(handler, GradientPenaltyHandler) and (handler.lambda_gp, handler.interval) == (10.0, gp_interval)
    assert trainer.has_event_handler(handler.add_interpolates, DualAttentionEvents.CRITIC_STARTED)
    assert trainer.has_event_handler(handler.add_penalty, DualAttentionEvents.CRITIC_LOSS_COMPLETED)
    assert _make("local")[0].gradient_penalty is None  # no critic, no penalty
    trainer.global_optimizer = torch.optim.SGD(d1.parameters(), lr=0.05)
    reference = copy.deepcopy(d1)
    source, target = _fixed_batch()
    fake = g(source).detach()
    n = target.shape[0]
    for step in (1, 2):
        torch.manual_seed(step)
        out = trainer.critic_step(source, target, fake)
        torch.manual_seed(step)  # the same interpolation coefficients
        due = step % gp_interval == 0
        inputs = [target, fake] + ([GradientPenalty.interpolate(target, fake)] if due else [])
        scores = reference(torch.cat(inputs)).split(n)
        loss = scores[1].mean() - scores[0].mean()
        if due:
            loss = loss + gp_interval * GradientPenalty(10.0).penalty(scores[2], inputs[2])
        reference.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.05 * p.grad
        assert out[DualAttentionKeys.GLOBAL_CRITIC] == pytest.approx(loss.item(), rel=1e-5)
        assert (DualAttentionKeys.GP in out) == due
        for a, b in zip(d1.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_without_its_handler_the_critic_trains_on_the_wasserstein_term_alone():
    trainer, g, d1, _ = _make("global", n_critic=1, gp_interval=1)
    handler = trainer.gradient_penalty
    trainer.remove_event_handler(handler.add_interpolates, DualAttentionEvents.CRITIC_STARTED)
    trainer.remove_event_handler(handler.add_penalty, DualAttentionEvents.CRITIC_LOSS_COMPLETED)
    source, target = _fixed_batch()
    out = trainer.critic_step(source, target, g(source).detach())
    assert DualAttentionKeys.GP not in out
    assert out[DualAttentionKeys.GLOBAL_CRITIC] == pytest.approx(-out[DualAttentionKeys.WASSERSTEIN], rel=1e-6)
