"""Training-step timing and peak memory of the benchmark (:mod:`benchmark`): the shipped trainer of a
variant on fixed batches, each speed lever alone, and a row's memory per patch from a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = Path(__file__).with_name("benchmark.py")  # the CLI the memory probe runs


#: generator widths of the rows: the shipped CPU-sized UNet and the usual UNet width
WIDTHS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "usual": {"generator_channels": [32, 64, 128, 256, 512], "network_def#strides": [2, 2, 2, 2]},
}

#: the GAN-step layout shipped before the speed defaults (penalty every critic step, conv + pool critic,
#: full-resolution D2 with 16-128 filters): the baseline of the design levers
EARLIER_LAYOUT: dict[str, Any] = {"gp_interval": 1, "critic_downsample": "pool", "local_stem_stride": 1,
                                  "local_channels": [16, 32, 64, 128]}

#: speed levers of ``--levers``: overrides of train.json, or a name handled in :func:`_apply_lever`. The design
#: levers (those of :data:`DESIGN_LEVERS`) are timed each alone on :data:`EARLIER_LAYOUT`, the others on the shipped
#: configuration
LEVERS: dict[str, dict[str, Any]] = {
    "gp_interval=4": {"gp_interval": 4},
    "strided critic": {"critic_downsample": "stride"},
    "half-res D2 8-64": {"local_stem_stride": 2, "local_channels": [8, 16, 32, 64]},
    "bf16 autocast": {"precision": "bf16"},
    "channels_last": {},
    "torch.compile (G, D2)": {},
    "1 thread": {},
}

DESIGN_LEVERS = ("gp_interval=4", "strided critic", "half-res D2 8-64")

#: levers that change no result (applied to the unet reference too)
SPEED_ONLY = ("channels_last", "torch.compile (G, D2)", "1 thread", "bf16 autocast")


def _parser(overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT / "bundle")})
    parser.update(overrides)
    return parser


def _config_trainer(overrides: dict[str, Any], variant: str, batches: list, **trainer_overrides: Any):
    """``train#trainer`` of the shipped config with ``variant``, no handlers, iterating over ``batches``."""
    # adversarial_warmup 0: every timed step is a step of the variant (the shipped warm-up trains G alone first)
    p = _parser({**overrides, "variant": variant, "epochs": 1, "train#trainer#adversarial_warmup": 0,
                 "train#trainer#attention_warmup": 0, "train#trainer#train_data_loader": "$[]",
                 "train#trainer#train_handlers": [], "train#trainer#epoch_length": len(batches),
                 **{f"train#trainer#{k}": v for k, v in trainer_overrides.items()}})
    trainer = p.get_parsed_content("train#trainer")
    trainer.data_loader = batches
    return trainer


def _time_steps(trainer, warmup: int) -> float:
    """Mean seconds per iteration of one ``trainer.run()``, leaving out the first ``warmup`` iterations."""
    import torch
    from ignite.engine import Events

    stamps: list[float] = []
    handle = trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    trainer.run()
    handle.remove()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = [start] + stamps
    per_step = [b - a for a, b in zip(times[:-1], times[1:])][warmup:]
    return sum(per_step) / len(per_step)


def _synthetic_batch(overrides: dict[str, Any], batch: int) -> dict:
    """A batch shaped like the config's training batch (``batch`` patches), random values."""
    import torch

    p = _parser(overrides)
    shape = (batch, 1, *[int(s) for s in p["patch_size"]])
    return {"source": torch.rand(shape), "target": torch.rand(shape)}


def _channels_last(batches: list) -> list:
    import torch

    fmt = torch.channels_last if batches[0]["source"].ndim == 4 else torch.channels_last_3d
    return [{k: torch.as_tensor(v).contiguous(memory_format=fmt) for k, v in b.items()} for b in batches]


def _apply_lever(trainer, lever: str) -> None:
    """Apply a lever that is not a config override to a built trainer (networks in place)."""
    import torch

    if lever == "channels_last":
        nets = [trainer.g_network, trainer.global_critic, trainer.local_discriminator]
        fmt = torch.channels_last if trainer.data_loader[0]["source"].ndim == 4 else torch.channels_last_3d
        for net in nets:
            if net is not None:
                net.to(memory_format=fmt)
        trainer.data_loader = _channels_last(trainer.data_loader)
    elif lever == "torch.compile (G, D2)":  # the critic needs a double backward, which compiled graphs do not support
        # dynamo does not trace MONAI's MetaTensor: the compiled networks get plain tensors
        trainer.data_loader = [{k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in b.items()}
                               for b in trainer.data_loader]
        trainer.g_network = torch.compile(trainer.g_network)
        if trainer.local_discriminator is not None:
            trainer.local_discriminator = torch.compile(trainer.local_discriminator)


def _timed_row(overrides: dict[str, Any], variant: str, batches: list, warmup: int, lever: str | None = None) -> float:
    import torch

    torch.manual_seed(0)
    trainer = _config_trainer({**overrides, **(LEVERS.get(lever, {}) if lever else {})}, variant, batches)
    if lever:
        _apply_lever(trainer, lever)
    threads = torch.get_num_threads()
    if lever == "1 thread":
        torch.set_num_threads(1)
    try:
        return _time_steps(trainer, warmup)
    finally:
        torch.set_num_threads(threads)


def _step_rows(name: str, overrides: dict[str, Any], variants: list[str], batch: dict, steps: int, warmup: int,
               memory_budget_mb: float | None = None) -> list[dict[str, Any]]:
    """One row per variant: mean step time on ``batch`` (``steps`` timed after ``warmup``) and its ratio to ``unet``.

    ``variants`` must include ``unet`` (the reference); ``memory_budget_mb`` adds each row's peak memory (subprocess).
    """
    import torch

    batches = [batch] * (steps + warmup)
    n = int(batch["source"].shape[0])
    generator = list(_parser(overrides).get_parsed_content("generator_channels"))
    rows = []
    for variant in variants:
        step = _timed_row(overrides, variant, batches, warmup)
        rows.append({"rows": name, "variant": variant, "generator": generator, "patch": list(batch["source"].shape[2:]),
                     "batch": n, "threads": torch.get_num_threads(), "step_s": step, "patches_per_s": n / step,
                     "overrides": overrides})
        if memory_budget_mb is not None:
            rows[-1]["memory"] = _memory_row(overrides, variant, n, memory_budget_mb)
    unet_s = next(r["step_s"] for r in rows if r["variant"] == "unet")
    for r in rows:
        r["ratio_to_unet"] = r["step_s"] / unet_s
    return rows


def _peak_mb() -> float:
    """Peak memory of this process so far: CUDA's peak allocation, else the resident set's high-water mark.

    ``VmHWM`` (Linux) belongs to this program's address space; ``getrusage``'s ``ru_maxrss`` is not used first
    because Linux carries it across ``exec``, so a probe started by a parent holding the cached BraTS-size volumes
    would report the parent's peak.
    """
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory_probe(spec: str | dict) -> None:
    """Subprocess entry: peak memory after a few steps at batch B, then 2B; prints one JSON line."""
    args = spec if isinstance(spec, dict) else json.loads(spec)  # fire parses the JSON text itself
    out = {}
    for batch in (args["batch"], 2 * args["batch"]):
        batches = [_synthetic_batch(args["overrides"], batch)] * 3
        _time_steps(_config_trainer(args["overrides"], args["variant"], batches), 0)
        out[str(batch)] = _peak_mb()
    print("MEMORY " + json.dumps(out))


def _memory_row(overrides: dict[str, Any], variant: str, batch: int, budget_mb: float) -> dict[str, float]:
    spec = json.dumps({"overrides": overrides, "variant": variant, "batch": batch})
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--probe", spec], capture_output=True, text=True, cwd=ROOT,
                          timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe of {variant} {overrides} failed:\n{proc.stderr[-3000:]}")
    peaks = json.loads(lines[-1][len("MEMORY "):])
    m1, m2 = peaks[str(batch)], peaks[str(2 * batch)]
    per_patch = max(m2 - m1, 0.0) / batch
    fixed = m1 - per_patch * batch
    largest = int((budget_mb - fixed) // per_patch) if per_patch > 0 else None
    return {"peak_mb": m1, "peak_mb_2x": m2, "mb_per_patch": per_patch, "fixed_mb": fixed, "largest_batch": largest}
