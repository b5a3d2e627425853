"""The sub-steps of one training iteration (paper Fig. 2, Eq. 2-7), each a method a test can drive on a fixed batch.

:class:`DualAttentionSteps` is mixed into :class:`custom_components.engines.trainer.DualAttentionTrainer`, whose constructor
sets the networks, optimizers, options, grad scalers and non-finite guard these methods read; the trainer's
``_iteration`` calls them in order. Each update fires its :class:`~custom_components.engines.events.DualAttentionEvents`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim import Optimizer
from torch.utils.data import DataLoader, DistributedSampler

from .events import CriticUpdate, DualAttentionEvents, DualAttentionKeys
from ..config.hyperparameters import FreshBatches, LocalTarget
from ..losses.synthesis import (
    AttentionSource,
    attention_weight,
    confidence_map,
    difficulty_confidence,
    error_confidence,
    gap_confidence,
)

__all__ = ["DualAttentionSteps"]

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


class DualAttentionSteps:
    """The updates of G, the global critic D1, the local discriminator D2 and the error head, and the extra
    mini-batches they may draw (see :class:`custom_components.engines.trainer.DualAttentionTrainer` for the options)."""

    def local_input(self, image: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """What D2 judges: the image, or the (source, image) pair with ``local_conditional``."""
        return torch.cat([source.to(image.dtype), image], dim=1) if self.local_conditional else image

    def _synthesise(self, source: torch.Tensor, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad), self._autocast():
            return self.g_network(source)

    def critic_step(self, source: torch.Tensor, target: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """``n_critic`` WGAN-GP updates of D1 (Eq. 2) on detached G(X); returns the loss terms of the last one.

        Each update counts in ``state.critic_steps`` and fires ``CRITIC_STARTED``, ``CRITIC_LOSS_COMPLETED`` and
        ``CRITIC_COMPLETED`` around ``state.critic_update`` (:class:`~custom_components.engines.events.CriticUpdate`): the
        gradient penalty of Eq. 2 is added there by the trainer's
        :class:`~custom_components.engines.penalty.GradientPenaltyHandler`.
        """
        keys, critic, out = DualAttentionKeys, self.global_critic, {}
        critic.train()
        for k in range(self.n_critic):
            if k > 0 and self.fresh_batches == FreshBatches.ALL:
                source, target = self.next_batch()
                fake = self._synthesise(source, grad=False)
            fake = fake.detach().to(target.dtype)
            self.state.critic_steps += 1
            self.global_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
            update = self.state.critic_update = CriticUpdate(target, fake, self.scalers["global_critic"])
            self.fire_event(DualAttentionEvents.CRITIC_STARTED)
            with self._autocast():  # real, fake (and interpolated) images: one forward pass unless batch norm
                if _has_batch_norm(critic):
                    update.scores = [critic(x).float() for x in update.inputs]
                else:
                    update.scores = list(critic(torch.cat(update.inputs)).float().split(target.shape[0]))
            real_score, fake_score = update.scores[0], update.scores[1]
            update.loss = fake_score.mean() - real_score.mean()
            self.fire_event(DualAttentionEvents.CRITIC_LOSS_COMPLETED)
            self.nonfinite_guard.check_loss(self, keys.GLOBAL_CRITIC, update.loss)
            self._update("global_critic", critic, self.global_optimizer, update.loss)
            values = {**{term: value.item() for term, value in update.terms.items()},
                      keys.GLOBAL_CRITIC: update.loss.item(), keys.WASSERSTEIN: (real_score.mean() - fake_score.mean()).item()}
            out.update(values)
            self._completed(DualAttentionEvents.CRITIC_COMPLETED, values)
            self.state.critic_update = None  # its tensors are not kept until the next update
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
        """``n_local`` updates of D2 with the dense BCE of Eq. 4: real voxels -> 1, synthetic voxels -> 0; returns the
        loss of the last one.

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
            self.nonfinite_guard.check_loss(self, DualAttentionKeys.LOCAL_DISCRIMINATOR, loss_local)
            self._update("local_discriminator", local_d, self.local_optimizer, loss_local)
            out = {DualAttentionKeys.LOCAL_DISCRIMINATOR: loss_local.item()}
            self._completed(DualAttentionEvents.LOCAL_DISCRIMINATOR_COMPLETED, out)
        if self.local_discriminator_ema is not None:
            self.local_discriminator_ema.update_parameters(_unwrap(local_d))
        return out

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
        self.nonfinite_guard.check_loss(self, DualAttentionKeys.ERROR_HEAD, loss)
        self._update("error_predictor", head, self.error_optimizer, loss)
        out = {DualAttentionKeys.ERROR_HEAD: loss.item()}
        self._completed(DualAttentionEvents.ERROR_HEAD_COMPLETED, out)
        return out

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
            self.nonfinite_guard.check_loss(self, term, value)
        self._update("generator", self.g_network, self.g_optimizer, loss_g)
        out[keys.RECON] = loss_recon.item()
        out[keys.LOSS] = loss_g.item()
        out[keys.ATTENTION_MEAN] = 1.0 if weight is None else weight.mean().item()
        out[keys.SOURCE], out[keys.TARGET], out[keys.PRED] = source, target, fake.detach().float()
        self._completed(DualAttentionEvents.GENERATOR_COMPLETED, out)
        return out

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=torch.device(self.state.device).type, dtype=dtype)

    def _update(self, name: str, network: torch.nn.Module, optimizer: Optimizer, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` and step ``optimizer`` through the network's grad scaler (a no-op unless fp16),
        then let the non-finite guard record the update and check the network's weights."""
        scaler = self.scalers[name]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        self.nonfinite_guard.check_update(self, name, _unwrap(network))

    def _completed(self, event: DualAttentionEvents, values: dict[str, Any]) -> None:
        """Put an update's values on ``state.step_output`` and fire its event."""
        self.state.step_output = values
        self.fire_event(event)

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
