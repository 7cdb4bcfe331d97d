"""The variance experiment: checkpoints along a reference run, sweeps, training curves.

Numbers only (the app layer writes them); each checkpoint is measured by
:func:`pyro_vae.lab.variance.measure_gradient_variance`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch

from ..data import binarize_batch, prepare_observations
from ..errors import ConfigError
from ..inference.discrete import code_table, is_discrete
from ..inference.estimators import example_posterior
from ..models.vae import VAE
from ..registry import ESTIMATORS
from ..training.trainer import Trainer, _param_store_extras, epoch_order
from .variance import check_applicable, measure_gradient_variance, resolve_precision


def fixed_minibatch(dataset: Any, cfg: Any, batch_size: int, seed: int = 0) -> torch.Tensor:
    """One minibatch of training images, binarized once, shared by every estimator."""
    data = prepare_observations(dataset, cfg.data, seed=seed)
    if batch_size > len(data.train):
        raise ConfigError(f"measurement batch size {batch_size} is larger than the "
                          f"{len(data.train)} training images")
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    return binarize_batch(data.train.images[idx[:batch_size]], cfg.data.binarize)


def train_with_snapshots(cfg: Any, dataset: Any, snapshot_steps: Sequence[int],
                         record_every: int = 10) -> tuple[Any, dict[int, dict], dict[str, list]]:
    """Train ``cfg``'s estimator for max(snapshot_steps) steps; keep the states at those steps.

    Returns:
        (trainer, {step: {"vae": state_dict, "store": param-store extras}}, curve) where curve
        holds ``step``, ``seconds`` (training wall-clock) and ``elbo`` (mean training ELBO per
        image over the last ``record_every`` steps).
    """
    trainer = Trainer(cfg, dataset)
    train = trainer.dataset.train.images
    batch = cfg.train.batch_size
    per_epoch = len(train) // batch
    last = max(snapshot_steps)
    snapshots: dict[int, dict] = {}
    curve: dict[str, list] = {"step": [], "seconds": [], "elbo": []}
    seconds, window = 0.0, []
    for step in range(last + 1):
        if step in snapshot_steps:
            snapshots[step] = {"vae": {k: v.detach().clone()
                                       for k, v in trainer.vae.state_dict().items()},
                               "store": _param_store_extras()}
        if step == last:
            break
        epoch, pos = divmod(step, per_epoch)
        if pos == 0:
            order = epoch_order(len(train), cfg.train.seed, epoch)
        x = binarize_batch(train[order[pos * batch:(pos + 1) * batch]], cfg.data.binarize)
        start = time.perf_counter()
        loss = trainer.step(x)
        seconds += time.perf_counter() - start
        if loss is not None:
            window.append(-loss)
        if (step + 1) % record_every == 0 and window:
            curve["step"].append(step + 1)
            curve["seconds"].append(seconds)
            curve["elbo"].append(sum(window) / len(window))
            window = []
    return trainer, snapshots, curve


def _check_measurable(cfg: Any, estimators: Sequence[str], latent_dim: int) -> None:
    """ConfigError, before anything is trained, for an estimator that does not apply to the
    code of ``cfg`` at ``latent_dim``, or a discrete code too large for the exact oracle."""
    check = copy.deepcopy(cfg)
    check.model.latent_dim = latent_dim
    q = example_posterior(check)
    if q is None:  # a plugin family that cannot be built from the config: the lab will tell
        return
    discrete = is_discrete(q)
    check_applicable(estimators, discrete)
    if discrete:  # the oracle is the exact gradient, a sum over every code
        try:
            code_table(q)
        except ConfigError as e:
            raise ConfigError(f"the variance lab measures discrete codes against their exact "
                              f"gradient: {e}") from None


def variance_experiment(cfg: Any, dataset: Any, estimators: Sequence[str] = (
        "reparam", "score", "score-avg-baseline"), *, checkpoints: Sequence[int] = (
        0, 100, 500, 1000), num_draws: int = 1000, oracle_draws: int = 1000,
        measure_batch: int = 256, latent_dims: Sequence[int] = (),
        batch_sizes: Sequence[int] = (), curve_steps: int = 0, seed: int = 0,
        precision: str = "float32", runs: Sequence[Any] = (),
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The variance experiment; returns plain numbers (the CLI writes them).

    With ``runs`` (a list of ``(name, step, config, vae, param-store extras)``), those
    checkpoints are measured. Otherwise a reference run of ``cfg`` (its estimator, usually
    ``reparam``) is trained and snapshotted at ``checkpoints``, once per latent dimension in
    ``latent_dims`` (default: ``cfg.model.latent_dim``); each snapshot is measured on one fixed
    minibatch per size in ``batch_sizes`` (default: ``measure_batch``). With ``curve_steps``,
    each estimator is also trained that many steps from the same initialisation and its
    training ELBO recorded against steps and wall-clock.
    """
    log = log or (lambda message: None)
    for name in estimators:
        if name not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}")
    if any(c < 0 for c in checkpoints) or not checkpoints:
        raise ConfigError(f"checkpoints must be non-negative steps, got {list(checkpoints)}")
    if not runs:  # before the reference run is trained: what the measurement will refuse
        for latent_dim in list(latent_dims) or [cfg.model.latent_dim]:
            _check_measurable(cfg, estimators, latent_dim)
    # auto -> bf16 or float32, once for every measurement (recorded with its reason), for the
    # device the measurements run on: the minibatches' (fixed_minibatch), the CPU
    precision, precision_choice = resolve_precision(precision, torch.device("cpu"))
    sizes = list(batch_sizes) or [measure_batch]
    rows: list[dict[str, Any]] = []
    timing = {"reference_training_s": 0.0, "measurement_s": 0.0, "curves_s": 0.0}
    measured: list[tuple[str, int, int, Any, dict, float]] = []  # name, ld, step, vae, store
    if runs:
        for name, step, run_cfg, vae, store in runs:
            train_scale = len(dataset.train) / run_cfg.train.batch_size
            measured.append((name, run_cfg.model.latent_dim, step, vae, store, train_scale))
    for latent_dim in ([] if runs else (list(latent_dims) or [cfg.model.latent_dim])):
        ref_cfg = copy.deepcopy(cfg)
        ref_cfg.model.latent_dim = latent_dim
        ref_cfg.train.progress = False
        start = time.perf_counter()
        log(f"training the reference run (latent dim {latent_dim}, {max(checkpoints)} steps)")
        trainer, snaps, _ = train_with_snapshots(ref_cfg, dataset, sorted(set(checkpoints)))
        timing["reference_training_s"] += time.perf_counter() - start
        train_scale = len(trainer.dataset.train) / ref_cfg.train.batch_size
        for step, snap in sorted(snaps.items()):
            vae = VAE.from_config(ref_cfg, dataset.image_shape)
            vae.load_state_dict(snap["vae"])
            measured.append(("reference", latent_dim, step, vae, snap["store"], train_scale))
    # one fixed minibatch per size, the same at every checkpoint (each call re-binarizes the set)
    minibatches = {size: fixed_minibatch(dataset, cfg, size, seed) for size in sizes}
    start_all = time.perf_counter()
    for run_name, latent_dim, step, vae, store, train_scale in measured:
        for size in sizes:
            x = minibatches[size]
            pyro.clear_param_store()
            for key, value in store.items():
                pyro.get_param_store()[key] = value
            log(f"measuring {run_name} step {step} (latent dim {latent_dim}, batch {size})")
            result = measure_gradient_variance(
                vae, x, estimators, num_draws=num_draws, oracle_draws=oracle_draws,
                num_particles=cfg.train.num_particles or 1, train_scale=train_scale, seed=seed,
                precision=precision, temperature=cfg.train.temperature,
                relaxed_density=cfg.train.relaxed_density)
            rows.append({"run": run_name, "latent_dim": latent_dim, "batch_size": size,
                         "step": step, **result})
    timing["measurement_s"] = time.perf_counter() - start_all
    curves: dict[str, dict[str, list]] = {}
    if curve_steps > 0:
        start = time.perf_counter()
        for name in estimators:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.train.estimator = name
            run_cfg.train.progress = False
            run_cfg.validate()
            log(f"training curve: {name} ({curve_steps} steps)")
            _, _, curves[name] = train_with_snapshots(run_cfg, dataset, [curve_steps])
        timing["curves_s"] = time.perf_counter() - start
    pyro.clear_param_store()
    return {"estimators": list(estimators), "num_draws": num_draws,
            "oracle_draws": oracle_draws, "precision": precision,
            "precision_choice": precision_choice, "measurements": rows,
            "curves": curves, "timing": timing}


def variance_rows(experiment: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten an experiment into one row per (checkpoint, batch size, estimator, group)."""
    out = []
    for m in experiment["measurements"]:
        for name, res in m["estimators"].items():
            for group, s in res["groups"].items():
                out.append({
                    "run": m["run"], "latent_dim": m["latent_dim"], "batch_size": m["batch_size"],
                    "step": m["step"], "estimator": name, "group": group,
                    "num_params": s["num_params"], "trace": s["trace"],
                    "trace_lo": s["trace_ci"][0], "trace_hi": s["trace_ci"][1],
                    "mean_variance": s["mean_variance"],
                    "relative_variance": s["relative_variance"], "snr": s["snr"],
                    "cosine": s["cosine"], "cosine_lo": s["cosine_ci"][0],
                    "cosine_hi": s["cosine_ci"][1], "ratio_to_reparam": s["ratio_to_reparam"],
                    "ratio_lo": s["ratio_to_reparam_ci"][0],
                    "ratio_hi": s["ratio_to_reparam_ci"][1],
                    "seconds_per_draw": res["seconds_per_draw"],
                    "cost_adjusted_variance": s.get("cost_adjusted_variance", ""),
                    # against the exact gradient (discrete codes; empty otherwise)
                    "relative_error": s.get("relative_error", ""),
                    "relative_error_lo": s.get("relative_error_ci", ["", ""])[0],
                    "relative_error_hi": s.get("relative_error_ci", ["", ""])[1],
                    "noise_floor": s.get("noise_floor", ""),
                    "relative_bias": s.get("relative_bias", "")})
    return out
