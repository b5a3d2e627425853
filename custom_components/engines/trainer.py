"""Ignite/MONAI trainer for the dual-discriminator, difficulty-aware synthesis model (paper section 2, Eq. 1-7).

The engine: construction and checks, the order of the sub-steps in an iteration, and what is saved to resume. The
sub-steps are in :mod:`custom_components.engines.gan_steps`, the events they fire in :mod:`custom_components.engines.events`, the
gradient penalty in :class:`custom_components.engines.penalty.GradientPenaltyHandler`, the non-finite guard in
:mod:`custom_components.engines.guards` and what each variant trains in :mod:`custom_components.engines.variants`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from .events import EVENT_TO_ATTR, DualAttentionEvents, DualAttentionKeys
from .gan_steps import DualAttentionSteps, _unwrap
from .guards import NonFiniteGuard
from .penalty import GradientPenaltyHandler
from ..data.datalist import PrepareSourceTarget
from ..config.hyperparameters import FreshBatches, LocalTarget, TrainingOptions, Variant
from ..losses.synthesis import AttentionNorm, AttentionSource, DifficultyAwareLoss
from .variants import all_variants, uses_attention, uses_global_critic, uses_local_discriminator, variant_spec

__all__ = [
    "DualAttentionEvents",
    "DualAttentionKeys",
    "DualAttentionTrainer",
    "FreshBatches",
    "LocalTarget",
    "Variant",
    "all_variants",
    "uses_attention",
    "uses_global_critic",
    "uses_local_discriminator",
    "validate_hyperparameters",
]


def validate_hyperparameters(**options: Any) -> TrainingOptions:
    """The :class:`~custom_components.config.hyperparameters.TrainingOptions` of ``options``, checked (train.json's
    ``check_options``, called from the bundle's ``initialize`` with every option of ``run_options``).

    A thin wrapper of :meth:`TrainingOptions.from_mapping`: a bad value raises a ``ValueError`` naming the option,
    the value and what was expected; a key that is not an option is refused, naming the closest one (it is not
    dropped); a missing option holds ``CONFIG_VALUE`` (its default is train.json's).
    """
    return TrainingOptions.from_mapping(options)


class DualAttentionTrainer(DualAttentionSteps, Trainer):
    """Alternating training of G, the global critic D1 and the local discriminator D2 (paper Fig. 2).

    One iteration on a batch (X, Y), each sub-step a method that tests can drive on a fixed batch:

    1. G(X) is computed once; its detached copy is used by the discriminator updates.
    2. :meth:`critic_step` (D1, if used): ``n_critic`` WGAN-GP updates,
       L_D1 = E[D1(G(X))] - E[D1(Y)] + GP (Eq. 2), the penalty GP added by a
       :class:`~custom_components.engines.penalty.GradientPenaltyHandler` the trainer attaches to the critic's events
       (``trainer.gradient_penalty``). Real, fake and interpolated images pass through the critic as one batch when
       it has no batch norm (the default), else as three batches, so that batch statistics are never shared between
       real and fake images.
    3. :meth:`local_step` (D2, if used): ``n_local`` updates of the dense BCE loss
       L_D2 = BCE(D2(Y), 1) + BCE(D2(G(X)), 0) (Eq. 4).
    4. :meth:`generator_step`: L_G = L_AttG + lambda_1 L_ADV1 + lambda_2 L_ADV2 (Eq. 7) with the discriminators
       frozen, where L_AttG = F * |Y - G(X)|^p, F = (1 - M)^beta and M = sigmoid(D2(G(X))) (Eq. 6); for variants
       without attention, or before ``attention_warmup`` iterations have passed, F = 1 (plain Eq. 1).

    With ``fresh_batches="generator"`` (the paper's wording: G is updated "using another mini-batch") step 4 draws
    another batch from the loader and computes a fresh G(X); with ``"all"`` every critic update after the first
    does too. Such draws come from a second iterator over the same loader (under DDP, over a second
    ``DistributedSampler`` with another seed, so that they are not the same subjects as the iteration's own batch)
    and do not count as iterations.

    Each update fires one of :class:`~custom_components.engines.events.DualAttentionEvents` (the critic's also two inside
    it), with its values on ``trainer.state``, so that handlers can hook any sub-step.

    The training options (``variant`` and every keyword-only argument from ``beta`` on, except the networks, the
    loader plumbing and the guard) have no default here: their one default is the top-level id of the bundle's
    ``train.json``, which a bundle run passes, and which a Python caller takes with
    ``**custom_components.bundle_options(...).trainer_kwargs()``. Every value given is checked by
    :class:`custom_components.config.hyperparameters.TrainingOptions` (one set of checks). Options beyond the paper
    (the paper's method is ``bundle_options(overlays=["paper.json"])``):
    ``local_conditional`` lets D2 see the source beside the image (a pix2pix-style pair, so a plausible but wrong
    region can be told from a right one), ``attention_norm``/``attention_floor`` reshape F (see
    :func:`custom_components.losses.synthesis.attention_weight`), ``attention_warmup`` delays F until D2 has learned.

    Args:
        device: device to train on.
        max_epochs: number of epochs.
        train_data_loader: loader of dict batches holding the source and target images.
        g_network: generator G (e.g. MONAI ``UNet``).
        g_optimizer: optimizer of G.
        variant: one of :class:`Variant`; networks a variant does not use must be ``None``.
        global_critic: D1, required for ``global``, ``dual``, ``dual_attention``.
        global_optimizer: optimizer of D1, or a factory ``params -> Optimizer`` (e.g. a config ``_mode_: callable``
            partial), so configs need not build optimizers for networks a variant does not use.
        local_discriminator: D2, required for ``local``, ``dual``, ``dual_attention``.
        local_optimizer: optimizer of D2, or a factory ``params -> Optimizer``.
        beta: attention exponent (Eq. 6), >= 0.
        p: 1 (L1) or 2 (L2) voxel loss.
        lambda_gp: gradient-penalty weight lambda (Eq. 2).
        lambda_adv_global: lambda_1 of Eq. 7.
        lambda_adv_local: lambda_2 of Eq. 7.
        n_critic: critic updates per generator update.
        attention_warmup: iterations of plain L1/L2 before the attention is switched on (M is meaningless before
            D2 has learned anything); counted from the first adversarial iteration.
        adversarial_warmup: iterations at the start in which only G is trained, with the plain voxel loss (no
            discriminator update, no adversarial term): the attention has hard regions to find only once G renders
            the easy ones well. Same as starting from a pretrained UNet, in one run.
        attention_norm: ``"none"`` (the paper) or ``"mean"`` (F divided by its per-sample mean).
        attention_floor: alpha in [0, 1]; F becomes alpha + (1 - alpha) F (0 = the paper).
        attention_source: ``"confidence"`` (the paper: F from D2's M), ``"gap"`` (F from D2's paired gap
            D2(Y) - D2(G(X)), :func:`custom_components.losses.synthesis.gap_confidence`) or ``"error"`` (F from the error
            |Y - G(X)| known at training time, :func:`custom_components.losses.synthesis.error_confidence`); D2 still trains
            and still gives L_ADV2, only F's map changes. Variant ``error_weighted`` always uses ``"error"``.
        local_conditional: D2 judges the pair (X, image) instead of the image alone; D2 then needs
            ``2 * in_channels`` input channels (source first).
        fresh_batches: ``"none"``, ``"generator"`` (the paper) or ``"all"``, see :class:`FreshBatches`.
        local_target: ``"binary"`` (the paper, Eq. 4) or ``"mixed"`` (also a per-voxel real/fake composite),
            see :class:`LocalTarget`.
        n_local: D2 updates per G update.
        local_mix_cell: cell size in voxels of the ``"mixed"`` composite's random mask.
        attention_smoothing: Gaussian blur (voxels) of the ``"error"``/``"gap"``/``"predicted"`` map before F.
        local_ema: decay in [0, 1) of an exponential moving average of D2's weights (0 = off): with
            ``attention_source="confidence"`` F's map M comes from the averaged D2, which changes slowly where the
            live D2 swings with every update; L_ADV2 still uses the live D2.
        error_predictor: optional error-prediction head (:class:`custom_components.networks.nets.ErrorPredictor`), any
            variant: trained at every iteration (:meth:`error_step`) to predict |Y - G(X)| from (X, G(X)); its map is
            the QA map users get at inference, and the attention's map with ``attention_source="predicted"``.
        error_optimizer: its optimizer, or a factory ``params -> Optimizer``.
        epoch_length: iterations per epoch, default ``len(train_data_loader)``.
        non_blocking: non-blocking host-to-device copies.
        prepare_batch: callable ``(batch, device, non_blocking, **kwargs) -> (source, target)``; default
            :class:`custom_components.data.datalist.PrepareSourceTarget` (the batch's ``source`` and ``target``).
        train_handlers: ignite/MONAI handlers to attach.
        precision: ``"fp32"``, ``"bf16"`` (autocast to bfloat16, CPU or CUDA) or ``"fp16"`` (autocast to float16 with
            one ``GradScaler`` per network; CUDA only).
        gp_interval: add the gradient penalty to every ``gp_interval``-th critic update, weighted by ``gp_interval``
            (lazy regularisation; 1 = every update, the paper's Eq. 2); counted over the run, resumes included.
        stop_on_nonfinite: check every loss term before its optimizer step and stop with an error naming the
            iteration and the term if one is NaN/inf, so no weight is updated from it, and every network's weights
            after its step (:class:`custom_components.engines.guards.NonFiniteGuard`, ``trainer.nonfinite_guard``).
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
        to_kwargs: extra arguments of ``prepare_batch``'s tensor conversion.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        g_network: torch.nn.Module,
        g_optimizer: Optimizer,
        variant: Variant | str,
        global_critic: torch.nn.Module | None = None,
        global_optimizer: Optimizer | Callable | None = None,
        local_discriminator: torch.nn.Module | None = None,
        local_optimizer: Optimizer | Callable | None = None,
        *,
        beta: float,
        p: int,
        lambda_gp: float,
        lambda_adv_global: float,
        lambda_adv_local: float,
        n_critic: int,
        attention_warmup: int,
        attention_norm: AttentionNorm | str,
        attention_floor: float,
        adversarial_warmup: int,
        local_conditional: bool,
        fresh_batches: FreshBatches | str,
        attention_source: AttentionSource | str,
        local_target: LocalTarget | str,
        n_local: int,
        local_mix_cell: int,
        attention_smoothing: float,
        local_ema: float,
        error_predictor: torch.nn.Module | None = None,
        error_optimizer: Optimizer | Callable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        train_handlers: Sequence | None = None,
        precision: str,
        gp_interval: int,
        stop_on_nonfinite: bool = True,
        optim_set_to_none: bool = True,
        to_kwargs: dict | None = None,
    ) -> None:
        # one set of checks, the options object's (a ValueError naming the option, the value and what was expected)
        options = TrainingOptions.from_mapping(dict(
            variant=variant, beta=beta, p=p, lambda_gp=lambda_gp, lambda_adv_global=lambda_adv_global,
            lambda_adv_local=lambda_adv_local, n_critic=n_critic, attention_warmup=attention_warmup,
            attention_norm=attention_norm, attention_floor=attention_floor, adversarial_warmup=adversarial_warmup,
            local_conditional=local_conditional, fresh_batches=fresh_batches, attention_source=attention_source,
            local_target=local_target, n_local=n_local, local_mix_cell=local_mix_cell,
            attention_smoothing=attention_smoothing, local_ema=local_ema, precision=precision, gp_interval=gp_interval,
        ))
        # what only the trainer can check: the device, and warm-ups a config resolves from its start fractions
        if options.precision == "fp16" and torch.device(device).type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device (got {device!r}); use 'bf16' on CPU.")
        for name, start in (("attention_warmup", "attention_start"), ("adversarial_warmup", "adversarial_start")):
            if getattr(options, name) is None:
                raise ValueError(f"{name} must be an integer >= 0 here, got None; a bundle config resolves it from "
                                 f"{start} (custom_components.engines.schedules.PhaseSchedule).")
        self.variant, self.variant_spec = options.variant, variant_spec(options.variant)
        for role, net, opt, needed in (
            ("global_critic", global_critic, global_optimizer, self.variant_spec.global_critic),
            ("local_discriminator", local_discriminator, local_optimizer, self.variant_spec.local_discriminator),
        ):
            if needed and (net is None or opt is None):
                raise ValueError(f"variant {self.variant.value!r} needs {role} and its optimizer, got None.")
            if not needed and net is not None:
                raise ValueError(f"variant {self.variant.value!r} does not use {role}; pass None instead of a network.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=PrepareSourceTarget() if prepare_batch is None else prepare_batch,
            handlers=train_handlers,
            amp=False,
            decollate=False,
            to_kwargs=to_kwargs,
            event_names=[DualAttentionEvents],
            event_to_attr=EVENT_TO_ATTR,
        )
        self.state.critic_steps = 0  # critic updates so far (the critic events' count), saved with the state
        self.state.critic_update = None  # the critic update in progress, for its events
        self.state.step_output = None  # the values of the last update, for its event
        self.g_network, self.g_optimizer = g_network.to(self.state.device), g_optimizer
        self.global_critic, self.global_optimizer = self._with_optimizer(global_critic, global_optimizer)
        self.local_discriminator, self.local_optimizer = self._with_optimizer(local_discriminator, local_optimizer)
        if error_predictor is not None and error_optimizer is None:
            raise ValueError("error_predictor needs error_optimizer (an optimizer or a factory params -> optimizer).")
        self.error_predictor, self.error_optimizer = self._with_optimizer(error_predictor, error_optimizer)
        if options.attention_source == AttentionSource.PREDICTED and error_predictor is None:
            raise ValueError("attention_source 'predicted' needs the error-prediction head (error_predictor), got None.")
        self.beta, self.attention_norm = options.beta, options.attention_norm
        self.attention_warmup, self.attention_floor = options.attention_warmup, options.attention_floor
        self.local_conditional = options.local_conditional
        self.attention_source = self.variant_spec.attention_source or options.attention_source
        self.local_target, self.n_local = options.local_target, options.n_local
        self.local_mix_cell = options.local_mix_cell
        self.attention_smoothing = options.attention_smoothing
        self.local_ema = options.local_ema
        self.local_discriminator_ema = None
        if self.local_ema > 0 and self.local_discriminator is not None:
            self.local_discriminator_ema = AveragedModel(
                _unwrap(self.local_discriminator), multi_avg_fn=get_ema_multi_avg_fn(self.local_ema), use_buffers=True)
            self.local_discriminator_ema.requires_grad_(False)
        self.adversarial_warmup = options.adversarial_warmup
        self.fresh_batches = options.fresh_batches
        self._extra_batches: Any = None
        self.lambda_adv_global, self.lambda_adv_local = options.lambda_adv_global, options.lambda_adv_local
        self.n_critic = options.n_critic
        self.recon_loss = DifficultyAwareLoss(p=options.p)
        self.optim_set_to_none = optim_set_to_none
        self.precision, self.gp_interval = options.precision, options.gp_interval
        use_scaler = self.precision == "fp16"
        self.scalers = {name: torch.amp.GradScaler("cuda", enabled=use_scaler)
                        for name in ("generator", "global_critic", "local_discriminator", "error_predictor")}
        self.add_event_handler(Events.STARTED, self._check_phases)
        self.nonfinite_guard = NonFiniteGuard(enabled=stop_on_nonfinite)
        self.nonfinite_guard.attach(self)
        self.gradient_penalty = None  # Eq. 2's penalty, a handler of the critic's events whenever there is a critic
        if self.global_critic is not None:
            self.gradient_penalty = GradientPenaltyHandler(options.lambda_gp, interval=options.gp_interval)
            self.gradient_penalty.attach(self)

    @property
    def critic_steps(self) -> int:
        """Critic updates done in the run (``state.critic_steps``): every ``gp_interval``-th one adds the penalty."""
        return self.state.critic_steps

    def _check_phases(self, engine: Engine) -> None:
        """Refuse a run in which the discriminators or the attention would never start (nothing would say so)."""
        total = (self.state.max_epochs or 0) * (self.state.epoch_length or 0)
        numbers = (f"the run has {self.state.max_epochs} epochs x {self.state.epoch_length} iterations = {total} "
                   "iterations")
        if (self.global_critic is not None or self.local_discriminator is not None) and self.adversarial_warmup >= total:
            raise ValueError(f"variant {self.variant.value!r}: the discriminators would never train: adversarial_warmup "
                             f"is {self.adversarial_warmup} iterations and {numbers}.")
        if self.variant_spec.attention and self.adversarial_warmup + self.attention_warmup >= total:
            raise ValueError(f"variant {self.variant.value!r}: the attention would never start: it begins after "
                             f"iteration {self.adversarial_warmup + self.attention_warmup} and {numbers}.")

    def _with_optimizer(self, net: torch.nn.Module | None, optimizer: Optimizer | Callable | None):
        if net is None:
            return None, None
        net = net.to(self.state.device)
        if not isinstance(optimizer, Optimizer):
            optimizer = optimizer(net.parameters())
        return net, optimizer

    def state_dict(self) -> dict[str, Any]:
        """ignite's engine state plus the critic-step counter that decides when the lazy penalty is computed."""
        return {**super().state_dict(), "critic_steps": self.critic_steps}

    def load_state_dict(self, state_dict: Any) -> None:
        state = dict(state_dict)
        critic_steps = state.pop("critic_steps", None)
        super().load_state_dict(state)
        if critic_steps is None:  # a checkpoint from before the counter was saved: n_critic per adversarial iteration
            done = max(0, int(state.get("iteration") or 0) - self.adversarial_warmup)
            critic_steps = done * self.n_critic if self.global_critic is not None else 0
        self.state.critic_steps = int(critic_steps)

    def checkpoint_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the networks and optimizers this variant uses, and the engine state."""
        objects = {
            "generator": self.g_network, "g_optimizer": self.g_optimizer,
            "global_critic": self.global_critic, "global_optimizer": self.global_optimizer,
            "local_discriminator": self.local_discriminator, "local_optimizer": self.local_optimizer,
            "error_predictor": self.error_predictor, "error_optimizer": self.error_optimizer,
            "local_discriminator_ema": self.local_discriminator_ema, "trainer": self,
        }
        if self.precision == "fp16":
            objects.update({f"{k}_scaler": v for k, v in self.scalers.items()})
        return {k: v for k, v in objects.items() if v is not None}

    def adversarial_active(self, iteration: int) -> bool:
        """Whether the discriminators are trained and used at ``iteration`` (1-based)."""
        return iteration > self.adversarial_warmup

    def attention_active(self, iteration: int) -> bool:
        """Whether F = (1 - M)^beta weights the voxel loss at ``iteration`` (1-based)."""
        return self.variant_spec.attention and iteration > self.adversarial_warmup + self.attention_warmup

    def _iteration(self, engine: DualAttentionTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        source, target = batch[0], batch[1]
        fresh_g = engine.fresh_batches != FreshBatches.NONE
        adversarial = engine.adversarial_active(engine.state.iteration)
        uses_d = adversarial and (engine.global_critic is not None or engine.local_discriminator is not None)
        engine.g_network.train()
        # G(X) computed once and reused by every update, unless G's update draws its own batch
        fake = engine._synthesise(source, grad=not fresh_g) if uses_d or not fresh_g else None
        out: dict[str, Any] = {}
        if adversarial and engine.global_critic is not None:
            out.update(engine.critic_step(source, target, fake))
        if adversarial and engine.local_discriminator is not None:
            out.update(engine.local_step(source, target, fake))
        if engine.error_predictor is not None:  # trained from the first iteration: it only needs G's current error
            judged = fake if fake is not None else engine._synthesise(source, grad=False)
            out.update(engine.error_step(source, target, judged))
        if fresh_g and uses_d:
            source, target = engine.next_batch()
            fake = None
        out.update(engine.generator_step(source, target, fake))
        return out

