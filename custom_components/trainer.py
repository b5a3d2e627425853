"""Ignite/MONAI trainer for the dual-discriminator, difficulty-aware synthesis model (paper section 2, Eq. 1-7)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import math
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.utils import StrEnum
from monai.utils.enums import CommonKeys
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler

from .losses import (
    AttentionNorm,
    AttentionSource,
    DifficultyAwareLoss,
    GradientPenalty,
    attention_weight,
    confidence_map,
    difficulty_confidence,
    error_confidence,
    gap_confidence,
)
from .hyperparameters import FreshBatches, LocalTarget, TrainingOptions, Variant

__all__ = [
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


def all_variants() -> list[str]:
    """The names of every :class:`Variant`, in the enum's order (``unet``, the reference, first)."""
    return [v.value for v in Variant]


def _variant(variant: Variant | str) -> Variant:
    return TrainingOptions.check("variant", variant)


def uses_global_critic(variant: Variant | str) -> bool:
    """Whether ``variant`` trains the global critic D1 (used by configs to skip building it)."""
    return _variant(variant) in (Variant.GLOBAL, Variant.DUAL, Variant.DUAL_ATTENTION)


def uses_local_discriminator(variant: Variant | str) -> bool:
    """Whether ``variant`` trains the local discriminator D2 (used by configs to skip building it)."""
    return _variant(variant) in (Variant.LOCAL, Variant.DUAL, Variant.DUAL_ATTENTION)


def uses_attention(variant: Variant | str) -> bool:
    """Whether ``variant`` weights the voxel loss by a difficulty map F (after the schedule's attention start)."""
    return _variant(variant) in (Variant.DUAL_ATTENTION, Variant.ERROR_WEIGHTED)


def validate_hyperparameters(**options: Any) -> TrainingOptions:
    """The :class:`~custom_components.hyperparameters.TrainingOptions` of ``options``, checked (train.json's
    ``check_options``, called from the bundle's ``initialize`` with every option of ``run_options``).

    A thin wrapper of :meth:`TrainingOptions.from_mapping`: a bad value raises a ``ValueError`` naming the option,
    the value and what was expected; a key that is not an option is refused, naming the closest one (it is not
    dropped); a missing option takes its default, the trainer's.
    """
    return TrainingOptions.from_mapping(options)


class DualAttentionKeys(StrEnum):
    """Keys of the trainer's per-iteration output dict. Loss terms are plain floats; images are tensors."""

    LOSS = "loss"  # L_G, Eq. 7
    RECON = "loss_recon"  # L_AttG (Eq. 6), or plain L1/L2 (Eq. 1) without attention
    ADV_GLOBAL = "loss_adv_global"  # L_ADV1, Eq. 3
    ADV_LOCAL = "loss_adv_local"  # L_ADV2, Eq. 5
    CRITIC = "loss_critic"  # L_D1, Eq. 2 (incl. the penalty)
    GP = "gradient_penalty"  # the penalty term of Eq. 2 (incl. lambda)
    WASSERSTEIN = "wasserstein"  # E[D1(Y)] - E[D1(G(X))]
    LOCAL_D = "loss_local_d"  # L_D2, Eq. 4
    ERROR_HEAD = "loss_error_head"  # L1 of the error-prediction head against the detached |Y - G(X)|
    CONFIDENCE_MEAN = "confidence_mean"  # mean of M over G(X)
    ATTENTION_MEAN = "attention_mean"  # mean of F actually applied (1 without attention)
    IMAGE = CommonKeys.IMAGE  # source X
    LABEL = CommonKeys.LABEL  # target Y
    PRED = CommonKeys.PRED  # G(X)
    CONFIDENCE = "confidence"  # M


#: seed offset of the sampler of :meth:`DualAttentionTrainer.next_batch` under DDP (any fixed number != 0)
_EXTRA_SEED_OFFSET = 7919


def _unwrap(net: torch.nn.Module | None) -> torch.nn.Module | None:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or ``net`` itself)."""
    return getattr(net, "module", net) if net is not None else None


def _has_batch_norm(net: torch.nn.Module | None) -> bool:
    return net is not None and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


@contextmanager
def _frozen(*nets: torch.nn.Module | None):
    """Freeze ``nets`` (the discriminators during G's update): no parameter gradients, and no change to their
    buffers, so a batch-norm layer's running statistics are not updated from G's fake-only batch. Both are restored
    afterwards; the networks stay in training mode (batch statistics in the forward pass, as the paper's D1 uses)."""
    params = [p for n in nets if n is not None for p in n.parameters() if p.requires_grad]
    norms = [m for n in nets if n is not None for m in n.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    # momentum 0 keeps the running statistics (they are updated in place during the forward pass and saved for its
    # backward, so they cannot be restored before G's backward); the step counter is restored
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for prm in params:
        prm.requires_grad_(False)
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for prm in params:
            prm.requires_grad_(True)
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class DualAttentionTrainer(Trainer):
    """Alternating training of G, the global critic D1 and the local discriminator D2 (paper Fig. 2).

    One iteration on a batch (X, Y), each sub-step a method that tests can drive on a fixed batch:

    1. G(X) is computed once; its detached copy is used by the discriminator updates.
    2. :meth:`critic_step` (D1, if used): ``n_critic`` WGAN-GP updates,
       L_D1 = E[D1(G(X))] - E[D1(Y)] + GP (Eq. 2). Real, fake and interpolated images pass through the critic as
       one batch when it has no batch norm (the default), else as three batches, so that batch statistics are never
       shared between real and fake images.
    3. :meth:`local_step` (D2, if used): one update of the dense BCE loss L_D2 = BCE(D2(Y), 1) + BCE(D2(G(X)), 0)
       (Eq. 4).
    4. :meth:`generator_step`: L_G = L_AttG + lambda_1 L_ADV1 + lambda_2 L_ADV2 (Eq. 7) with the discriminators
       frozen, where L_AttG = F * |Y - G(X)|^p, F = (1 - M)^beta and M = sigmoid(D2(G(X))) (Eq. 6); for variants
       without attention, or before ``attention_warmup`` iterations have passed, F = 1 (plain Eq. 1).

    With ``fresh_batches="generator"`` (the paper's wording: G is updated "using another mini-batch") step 4 draws
    another batch from the loader and computes a fresh G(X); with ``"all"`` every critic update after the first
    does too. Such draws come from a second iterator over the same loader (under DDP, over a second
    ``DistributedSampler`` with another seed, so that they are not the same subjects as the iteration's own batch)
    and do not count as iterations.

    The defaults of the training options are those of :class:`custom_components.hyperparameters.TrainingOptions`,
    which checks every value given here (one set of checks, one default per option); the bundle's ``train.json``
    overrides them with its own. Options beyond the paper (all off by default; ``train.json`` chooses its own):
    ``local_conditional`` lets D2 see the source beside the image (a pix2pix-style pair, so a plausible but wrong
    region can be told from a right one), ``attention_norm``/``attention_floor`` reshape F (see
    :func:`custom_components.losses.attention_weight`), ``attention_warmup`` delays F until D2 has learned.

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
            D2(Y) - D2(G(X)), :func:`custom_components.losses.gap_confidence`) or ``"error"`` (F from the error
            |Y - G(X)| known at training time, :func:`custom_components.losses.error_confidence`); D2 still trains
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
        error_predictor: optional error-prediction head (:class:`custom_components.networks.ErrorPredictor`), any
            variant: trained at every iteration (:meth:`error_step`) to predict |Y - G(X)| from (X, G(X)); its map is
            the QA map users get at inference, and the attention's map with ``attention_source="predicted"``.
        error_optimizer: its optimizer, or a factory ``params -> Optimizer``.
        epoch_length: iterations per epoch, default ``len(train_data_loader)``.
        non_blocking: non-blocking host-to-device copies.
        prepare_batch: callable ``(batch, device, non_blocking, **kwargs) -> (source, target)``.
        train_handlers: ignite/MONAI handlers to attach.
        precision: ``"fp32"``, ``"bf16"`` (autocast to bfloat16, CPU or CUDA) or ``"fp16"`` (autocast to float16 with
            one ``GradScaler`` per network; CUDA only).
        gp_interval: compute the gradient penalty every ``gp_interval`` critic steps, weighted by ``gp_interval``
            (lazy regularisation; 1 = every step, the paper).
        stop_on_nonfinite: check every loss term before its optimizer step and stop with an error naming the
            iteration and the term if one is NaN/inf, so no weight is updated from it.
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
        variant: Variant | str = TrainingOptions.variant,
        global_critic: torch.nn.Module | None = None,
        global_optimizer: Optimizer | Callable | None = None,
        local_discriminator: torch.nn.Module | None = None,
        local_optimizer: Optimizer | Callable | None = None,
        beta: float = TrainingOptions.beta,
        p: int = TrainingOptions.p,
        lambda_gp: float = TrainingOptions.lambda_gp,
        lambda_adv_global: float = TrainingOptions.lambda_adv_global,
        lambda_adv_local: float = TrainingOptions.lambda_adv_local,
        n_critic: int = TrainingOptions.n_critic,
        attention_warmup: int = TrainingOptions.attention_warmup,
        attention_norm: AttentionNorm | str = TrainingOptions.attention_norm,
        attention_floor: float = TrainingOptions.attention_floor,
        adversarial_warmup: int = TrainingOptions.adversarial_warmup,
        local_conditional: bool = TrainingOptions.local_conditional,
        fresh_batches: FreshBatches | str = TrainingOptions.fresh_batches,
        attention_source: AttentionSource | str = TrainingOptions.attention_source,
        local_target: LocalTarget | str = TrainingOptions.local_target,
        n_local: int = TrainingOptions.n_local,
        local_mix_cell: int = TrainingOptions.local_mix_cell,
        attention_smoothing: float = TrainingOptions.attention_smoothing,
        local_ema: float = TrainingOptions.local_ema,
        error_predictor: torch.nn.Module | None = None,
        error_optimizer: Optimizer | Callable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        precision: str = TrainingOptions.precision,
        gp_interval: int = TrainingOptions.gp_interval,
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
                                 f"{start} (custom_components.schedules.PhaseSchedule).")
        self.variant = options.variant
        for role, net, opt, needed in (
            ("global_critic", global_critic, global_optimizer, uses_global_critic(self.variant)),
            ("local_discriminator", local_discriminator, local_optimizer, uses_local_discriminator(self.variant)),
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
            prepare_batch=prepare_batch,
            handlers=train_handlers,
            amp=False,
            decollate=False,
            to_kwargs=to_kwargs,
        )
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
        self.attention_source = options.attention_source
        if self.variant == Variant.ERROR_WEIGHTED:
            self.attention_source = AttentionSource.ERROR
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
        self.gradient_penalty = GradientPenalty(options.lambda_gp)
        self.optim_set_to_none = optim_set_to_none
        self.precision, self.gp_interval = options.precision, options.gp_interval
        self.stop_on_nonfinite = stop_on_nonfinite
        self.critic_steps = 0
        use_scaler = self.precision == "fp16"
        self.scalers = {name: torch.amp.GradScaler("cuda", enabled=use_scaler)
                        for name in ("generator", "global_critic", "local_discriminator", "error_predictor")}
        self.add_event_handler(Events.STARTED, self._check_phases)

    def _check_phases(self, engine: Engine) -> None:
        """Refuse a run in which the discriminators or the attention would never start (nothing would say so)."""
        total = (self.state.max_epochs or 0) * (self.state.epoch_length or 0)
        numbers = (f"the run has {self.state.max_epochs} epochs x {self.state.epoch_length} iterations = {total} "
                   "iterations")
        if (self.global_critic is not None or self.local_discriminator is not None) and self.adversarial_warmup >= total:
            raise ValueError(f"variant {self.variant.value!r}: the discriminators would never train: adversarial_warmup "
                             f"is {self.adversarial_warmup} iterations and {numbers}.")
        if uses_attention(self.variant) and self.adversarial_warmup + self.attention_warmup >= total:
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
        self.critic_steps = int(critic_steps)

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
        return uses_attention(self.variant) and iteration > self.adversarial_warmup + self.attention_warmup

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=torch.device(self.state.device).type, dtype=dtype)

    def _check_finite(self, term: str, value: torch.Tensor) -> None:
        if self.stop_on_nonfinite and not math.isfinite(value.item()):
            raise FloatingPointError(
                f"iteration {self.state.iteration} (epoch {self.state.epoch}): loss term '{term}' is {value.item()}; "
                f"training stopped before the update it feeds. {_updated_note(self)}"
            )

    def _step(self, name: str, loss: torch.Tensor, optimizer: Optimizer) -> None:
        scaler = self.scalers[name]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _mark_updated(self, name)
        if self.stop_on_nonfinite:
            bad = _nonfinite_tensors(_network_of(self, name))
            if bad:
                raise FloatingPointError(
                    f"iteration {self.state.iteration} (epoch {self.state.epoch}): after the update of {name}, "
                    f"{len(bad)} of its parameters/buffers hold NaN/inf (first: {', '.join(bad[:3])}); training "
                    f"stopped. {_updated_note(self)}"
                )

    def _extra_loader(self) -> Iterable:
        """The loader of :meth:`next_batch`: the training loader, or, when it draws from a ``DistributedSampler``
        (whose permutation is fixed by seed and epoch, so a second iterator would repeat the iteration's own
        batches), a copy of it over a sampler with another seed."""
        loader = self.data_loader
        sampler = getattr(loader, "sampler", None)
        if not isinstance(loader, DataLoader) or not isinstance(sampler, DistributedSampler):
            return loader
        other = DistributedSampler(sampler.dataset, num_replicas=sampler.num_replicas, rank=sampler.rank,
                                   shuffle=sampler.shuffle, seed=sampler.seed + _EXTRA_SEED_OFFSET,
                                   drop_last=sampler.drop_last)
        other.set_epoch(sampler.epoch)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=other, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) of another mini-batch, from a second iterator over the training data."""
        if self._extra_batches is None:
            self._extra_loader_ = self._extra_loader()
            self._extra_batches = iter(self._extra_loader_)
        try:
            batchdata = next(self._extra_batches)
        except StopIteration:
            sampler = getattr(self._extra_loader_, "sampler", None)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(sampler.epoch + 1)
            self._extra_batches = iter(self._extra_loader_)
            batchdata = next(self._extra_batches)
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        return batch[0], batch[1]

    def local_input(self, image: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """What D2 judges: the image, or the (source, image) pair with ``local_conditional``."""
        return torch.cat([source.to(image.dtype), image], dim=1) if self.local_conditional else image

    def _synthesise(self, source: torch.Tensor, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad), self._autocast():
            return self.g_network(source)

    def critic_step(self, source: torch.Tensor, target: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """``n_critic`` WGAN-GP updates of D1 (Eq. 2) on detached G(X); returns the loss terms of the last one."""
        keys, critic, out = DualAttentionKeys, self.global_critic, {}
        critic.train()
        for k in range(self.n_critic):
            if k > 0 and self.fresh_batches == FreshBatches.ALL:
                source, target = self.next_batch()
                fake = self._synthesise(source, grad=False)
            fake = fake.detach().to(target.dtype)
            n = target.shape[0]
            self.critic_steps += 1
            with_gp = self.critic_steps % self.gp_interval == 0
            self.global_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
            interp = self.gradient_penalty.interpolate(target, fake) if with_gp else None
            inputs = [target, fake] + ([interp] if with_gp else [])
            with self._autocast():  # real, fake (and interpolated) images: one forward pass unless batch norm
                if _has_batch_norm(critic):
                    scores = [critic(x).float() for x in inputs]
                else:
                    scores = critic(torch.cat(inputs)).float().split(n)
            real_score, fake_score = scores[0], scores[1]
            loss_critic = fake_score.mean() - real_score.mean()
            if with_gp:
                gp = self.gradient_penalty.penalty(scores[2], interp, self.scalers["global_critic"])
                loss_critic = loss_critic + self.gp_interval * gp
                out[keys.GP] = gp.item()
            self._check_finite(keys.CRITIC, loss_critic)
            self._step("global_critic", loss_critic, self.global_optimizer)
        out[keys.CRITIC] = loss_critic.item()
        out[keys.WASSERSTEIN] = (real_score.mean() - fake_score.mean()).item()
        return out

    def mix_mask(self, like: torch.Tensor) -> torch.Tensor:
        """A random per-voxel mask (1 = real) of square cells of ``local_mix_cell`` voxels, shaped (B, 1, spatial)."""
        coarse = [max(1, math.ceil(s / self.local_mix_cell)) for s in like.shape[2:]]
        cells = torch.rand((like.shape[0], 1, *coarse), device=like.device) < 0.5
        mask = cells.float()
        for dim, size in enumerate(like.shape[2:]):
            mask = mask.repeat_interleave(self.local_mix_cell, dim=dim + 2).narrow(dim + 2, 0, size)
        return mask.to(like.dtype)

    def local_step(self, source: torch.Tensor, target: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """``n_local`` updates of D2 with the dense BCE of Eq. 4: real voxels -> 1, synthetic voxels -> 0.

        With ``local_target="mixed"`` each update also scores a composite m * Y + (1 - m) * G(X) under a random cell
        mask m (:meth:`mix_mask`) against the per-voxel target m.
        """
        local_d, n = self.local_discriminator, target.shape[0]
        local_d.train()
        fake = fake.detach().to(target.dtype)
        for _ in range(self.n_local):
            self.local_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
            inputs = [self.local_input(target, source), self.local_input(fake, source)]
            mix = None
            if self.local_target == LocalTarget.MIXED:
                mix = self.mix_mask(target)
                inputs.append(self.local_input(mix * target + (1.0 - mix) * fake, source))
            with self._autocast():
                logits = local_d(torch.cat(inputs)).float().split(n)
            loss_local = F.binary_cross_entropy_with_logits(logits[0], torch.ones_like(logits[0])) + \
                F.binary_cross_entropy_with_logits(logits[1], torch.zeros_like(logits[1]))
            if mix is not None:
                loss_local = loss_local + F.binary_cross_entropy_with_logits(logits[2], mix.float())
            self._check_finite(DualAttentionKeys.LOCAL_D, loss_local)
            self._step("local_discriminator", loss_local, self.local_optimizer)
        if self.local_discriminator_ema is not None:
            self.local_discriminator_ema.update_parameters(_unwrap(local_d))
        return {DualAttentionKeys.LOCAL_D: loss_local.item()}

    def error_step(self, source: torch.Tensor, target: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """One update of the error-prediction head: L1 between its output for (X, G(X)) and the detached |Y - G(X)|."""
        head = self.error_predictor
        head.train()
        fake = fake.detach().to(target.dtype)
        error = (target - fake).abs().mean(dim=1, keepdim=True)
        self.error_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self._autocast():
            predicted = head(torch.cat([source.to(fake.dtype), fake], dim=1)).float()
        loss = F.l1_loss(predicted, error.float())
        self._check_finite(DualAttentionKeys.ERROR_HEAD, loss)
        self._step("error_predictor", loss, self.error_optimizer)
        return {DualAttentionKeys.ERROR_HEAD: loss.item()}

    def generator_step(self, source: torch.Tensor, target: torch.Tensor,
                       fake: torch.Tensor | None = None) -> dict[str, Any]:
        """One update of G with Eq. 7; ``fake`` = G(source) with its graph, computed here if ``None``.

        The discriminators are frozen and used unwrapped (no DistributedDataParallel hooks): only G is updated here
        and only G's gradients are synchronised.
        """
        keys, out = DualAttentionKeys, {}
        self.g_network.train()
        if fake is None:
            fake = self._synthesise(source, grad=True)
        self.g_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        critic_m, local_m = _unwrap(self.global_critic), _unwrap(self.local_discriminator)
        if not self.adversarial_active(self.state.iteration):
            critic_m = local_m = None
        with _frozen(critic_m, local_m), self._autocast():
            loss_g = torch.zeros((), device=fake.device)
            weight = None
            if local_m is None and self.attention_active(self.state.iteration):  # error_weighted: no D2 needed
                weight = attention_weight(error_confidence(fake, target, self.attention_smoothing), self.beta,
                                          self.attention_norm, self.attention_floor)
            if local_m is not None:
                logits = local_m(self.local_input(fake, source)).float()
                confidence = confidence_map(logits)
                loss_adv_local = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # Eq. 5
                loss_g = loss_g + self.lambda_adv_local * loss_adv_local
                out[keys.ADV_LOCAL] = loss_adv_local.item()
                out[keys.CONFIDENCE_MEAN] = confidence.mean().item()
                out[keys.CONFIDENCE] = confidence
                if self.attention_active(self.state.iteration):
                    if self.attention_source == AttentionSource.ERROR:
                        confidence = error_confidence(fake, target, self.attention_smoothing)
                    elif self.attention_source == AttentionSource.PREDICTED:
                        head = _unwrap(self.error_predictor)
                        with torch.no_grad():
                            predicted = head(torch.cat([source.to(fake.dtype), fake.detach()], dim=1)).float()
                        confidence = difficulty_confidence(predicted, self.attention_smoothing)
                    elif (self.attention_source == AttentionSource.CONFIDENCE
                          and self.local_discriminator_ema is not None):  # M of the averaged D2
                        ema = self.local_discriminator_ema
                        ema.eval()
                        with torch.no_grad():
                            confidence = confidence_map(ema(self.local_input(fake.detach(), source)).float())
                    elif self.attention_source == AttentionSource.GAP:
                        with torch.no_grad():
                            real_logits = local_m(self.local_input(target.to(fake.dtype), source)).float()
                        confidence = gap_confidence(real_logits, logits, self.attention_smoothing)
                    weight = attention_weight(confidence, self.beta, self.attention_norm, self.attention_floor)
            if critic_m is not None:
                loss_adv_global = -critic_m(fake).float().mean()  # Eq. 3
                loss_g = loss_g + self.lambda_adv_global * loss_adv_global
                out[keys.ADV_GLOBAL] = loss_adv_global.item()
            loss_recon = self.recon_loss(fake.float(), target.float(), weight)  # Eq. 6 (Eq. 1 if weight is None)
            loss_g = loss_g + loss_recon
        for term, value in ((keys.RECON, loss_recon), (keys.LOSS, loss_g)):
            self._check_finite(term, value)
        self._step("generator", loss_g, self.g_optimizer)
        out[keys.RECON] = loss_recon.item()
        out[keys.LOSS] = loss_g.item()
        out[keys.ATTENTION_MEAN] = 1.0 if weight is None else weight.mean().item()
        out[keys.IMAGE], out[keys.LABEL], out[keys.PRED] = source, target, fake.detach().float()
        return out

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


_NETWORK_ATTRS = {"generator": "g_network", "global_critic": "global_critic", "local_discriminator": "local_discriminator",
                  "error_predictor": "error_predictor"}


def _network_of(trainer: DualAttentionTrainer, name: str) -> torch.nn.Module:
    return _unwrap(getattr(trainer, _NETWORK_ATTRS[name]))


def _mark_updated(trainer: DualAttentionTrainer, name: str) -> None:
    """Remember which networks have stepped in the current iteration (for the non-finite guard's message)."""
    record = getattr(trainer, "_updated_in_iteration", None)
    if record is None or record[0] != trainer.state.iteration:
        record = (trainer.state.iteration, [])
        trainer._updated_in_iteration = record
    if name not in record[1]:
        record[1].append(name)


def _updated_note(trainer: DualAttentionTrainer) -> str:
    record = getattr(trainer, "_updated_in_iteration", None)
    done = record[1] if record is not None and record[0] == trainer.state.iteration else []
    if not done:
        return "No network was updated in this iteration; all keep the weights of the previous iteration."
    return (f"Already updated in this iteration: {', '.join(done)}; the weights in memory are not saved. The "
            "last good weights are in the latest epoch checkpoint, if one was written (none in epoch 1): resume "
            "from it with a lower learning rate ('--resume true --apply_changes true --lr_g ...'), or start again "
            "with one.")


def _nonfinite_tensors(net: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``net`` holding NaN/inf (one device sync)."""
    named = [(n, t) for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_floating_point()]
    if not named:
        return []
    norms = torch._foreach_norm([t.detach() for _, t in named], float("inf"))
    flags = torch.isfinite(torch.stack([n.float() for n in norms]))
    if bool(flags.all()):
        return []
    return [named[i][0] for i in (~flags).nonzero().flatten().tolist()]
