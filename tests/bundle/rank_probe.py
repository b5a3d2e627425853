"""A handler that records what one rank of a DDP training run did, for test_multi_gpu_config.py.

Not a test module: the DDP test merges an overlay naming ``rank_probe.RankProbe`` over train.json and
multi_gpu_train.json, with this folder on ``PYTHONPATH``, so each rank of the real ``monai.bundle run training`` writes
``<probe_dir>/rank<r>.json`` when its training completes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events


def _subjects(batch) -> list[str]:
    """The subject names of a collated batch (a dict of lists) or of a decollated one (a list of dicts)."""
    if isinstance(batch, dict):
        return [str(s) for s in batch["subject"]]
    return [str(item["subject"]) for item in batch]


class RankProbe:
    """Records, on its rank: the subjects of every training batch and of each validation run, the generator's
    learning rate and the loss at every iteration, the files written with ``torch.save`` during training, its process
    id, and which network objects the trainer and the evaluator run (and the generator's weights as training starts)."""

    def __init__(self, probe_dir: str, evaluator: Engine, optimizer: torch.optim.Optimizer) -> None:
        self.probe_dir, self.evaluator, self.optimizer = Path(probe_dir), evaluator, optimizer
        self.record: dict = {"train": [], "validations": [], "lr": [], "loss": [], "saved": []}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._train_iteration)
        engine.add_event_handler(Events.COMPLETED, self._write)
        self.evaluator.add_event_handler(Events.STARTED, lambda _: self.record["validations"].append([]))
        self.evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._validation_iteration)
        engine.add_event_handler(Events.STARTED, self._networks)
        save = torch.save

        def recording_save(obj, f, *args, **kwargs):
            self.record["saved"].append(str(getattr(f, "name", f)))
            return save(obj, f, *args, **kwargs)

        torch.save = recording_save

    def _networks(self, engine: Engine) -> None:
        self.record["trainer_runs_ddp"] = isinstance(engine.g_network, torch.nn.parallel.DistributedDataParallel)
        self.record["evaluator_runs_the_trained_generator"] = self.evaluator.network is getattr(
            engine.g_network, "module", None)
        self.record["start_weights"] = [float(t.double().sum()) for t in engine.g_network.state_dict().values()]

    def _train_iteration(self, engine: Engine) -> None:
        self.record["train"].append([engine.state.epoch, *_subjects(engine.state.batch)])
        self.record["lr"].append(self.optimizer.param_groups[0]["lr"])
        self.record["loss"].append(float(engine.state.output["loss"]))

    def _validation_iteration(self, engine: Engine) -> None:
        self.record["validations"][-1].extend(_subjects(engine.state.batch))

    def _write(self, engine: Engine) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.probe_dir.mkdir(parents=True, exist_ok=True)
        (self.probe_dir / f"rank{rank}.json").write_text(json.dumps({**self.record, "rank": rank, "pid": os.getpid()}))
