"""The SVI training loop: minibatches, checkpoints, metrics. No argparse, no plotting.

Each step asks the estimator's Pyro ELBO for a surrogate loss and its gradients
(``elbo.loss_and_grads(model, guide, x)``, exactly what ``pyro.infer.SVI.step`` does) and
applies them with a torch Adam over the VAE's parameters. Using a torch optimizer rather than
``pyro.optim`` keeps one optimizer whose state checkpoints as plain tensors.

Reproducibility: the data order of epoch ``e`` comes from a generator seeded with
``(seed, e)``; every other random draw (initialisation, dynamic binarization, z) comes from the
global torch generator, whose state is saved in each checkpoint. A resumed run therefore
repeats the uninterrupted one exactly on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from ..config import Config
from ..data import (
    Dataset,
    binarize_batch,
    check_image_shape,
    check_observations,
    load_dataset,
    prepare_observations,
)
from ..errors import CheckpointError, ConfigError, OutputError, PyroVAEError, TrainingError
from ..files import append_text, atomic_write_text, make_folder
from ..inference.accelerators import PathChoice, choose_training_loss
from ..inference.precision import keep_float32_outputs, precision_context
from ..inference.program import inspect_program
from ..metrics.elbo import elbo_per_image
from ..metrics.loglik import log_weight_memory
from ..models.vae import VAE
from ..progress import LOG as PROGRESS
from ..registry import ESTIMATORS
from ..runtime import apply_threads, check_memory
from . import distributed
from .checkpoint import load_checkpoint, require_keys, save_checkpoint
from .runs import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    EVENTS_FILE,
    METRICS_FILE,
    RunFolder,
    _config_differences,
    _short,
    check_parts,
    check_run_dir,
    owned,
    pick_device,
    record_parts,
)

_MODULE_PREFIXES = ("encoder$$$", "decoder$$$", "prior$$$", "estimator$$$")
#: Skipped steps are reported here (stderr through logging's last-resort handler by default).
_LOG = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced."""

    config: Config
    vae: VAE
    dataset: Dataset
    metrics: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    interrupted: bool = False
    #: the signal that interrupted the run (SIGINT, SIGTERM), if one did
    stop_signal: int | None = None


def epoch_order(num_data: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of the training images in ``epoch``: a function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_data, generator=generator)


def _total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (0 without any), as clipping computes
    it; ``torch.nn.utils.get_total_norm`` where torch has it (2.6+)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is None:
        return torch.nn.utils.clip_grad_norm_(params, math.inf)
    return get_total_norm([p.grad for p in params if p.grad is not None])


# -- the loop -----------------------------------------------------------------------------------
class _StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM (what cluster schedulers send before a kill) into a
    flag the loop checks at step boundaries (main thread only): the position is saved and the
    run can be resumed. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _param_store_extras() -> dict[str, torch.Tensor]:
    """Param-store entries that are not module parameters (e.g. Pyro's average baselines)."""
    store = pyro.get_param_store()
    # Pyro keeps the moving-average baseline as a ProvenanceTensor; keep plain tensors
    return {name: plain_tensor(store[name]) for name in store.keys()
            if not name.startswith(_MODULE_PREFIXES)}


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` as a plain ``torch.Tensor`` (not a Pyro tensor subclass)."""
    return t.detach().as_subclass(torch.Tensor).clone()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def training_memory(cfg: Config, image_shape: tuple[int, int, int]) -> int | None:
    """Bytes training the configured model needs, estimated before anything is allocated: the
    model is built on torch's ``meta`` device (shapes, no storage) and counted. Each parameter
    has its value, gradient and Adam's two moments (float32); a step holds the activations of
    ``batch x particles`` rows (:func:`pyro_vae.metrics.loglik.log_weight_memory`). None when a
    part cannot be built on the meta device (then nothing is checked)."""
    try:
        with torch.device("meta"):
            model = VAE.from_config(cfg, image_shape)
    except Exception:  # noqa: BLE001 - a plugin part that needs real storage: no estimate
        return None
    params = sum(p.numel() for p in model.parameters())
    rows = cfg.train.batch_size * max(1, cfg.train.num_particles)
    return 16 * params + 2 * log_weight_memory(model, rows, 1, math.prod(image_shape))


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs SVI on a dataset and keeps the run folder (if any) up to date.

    The trainer only talks to the VAE through ``vae.model`` / ``vae.guide`` and the
    estimator's ELBO, so any model built from the same pieces trains the same way.
    """

    def __init__(self, cfg: Config, dataset: Dataset, run_dir: Path | None = None,
                 vae: VAE | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.workers = distributed.current()
        self.device = distributed.local_device(pick_device(cfg.train.device), self.workers)
        check_observations(dataset, cfg.model.likelihood)
        data = prepare_observations(dataset, cfg.data, seed=cfg.train.seed)
        self.dataset = Dataset(data.name, data.image_shape, data.train.to(self.device),
                               data.test.to(self.device),
                               data.val.to(self.device) if data.val is not None else None)
        if cfg.train.batch_size * self.workers.world_size > len(self.dataset.train):
            raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is larger than the "
                              f"{len(self.dataset.train)} training images")
        if cfg.train.early_stop_patience and self.dataset.val is None:
            raise ConfigError("train.early_stop_patience needs a validation split, and this "
                              "dataset has none (a Dataset passed in keeps its own splits)")
        pyro.clear_param_store()
        pyro.set_rng_seed(cfg.train.seed)
        estimator = ESTIMATORS[cfg.train.estimator]
        if vae is None:
            estimate = training_memory(cfg, dataset.image_shape)
            if estimate is not None:
                check_memory(estimate, f"training with model.latent_dim = "
                             f"{cfg.model.latent_dim}, model.hidden_dims = "
                             f"{list(cfg.model.hidden_dims)}, train.batch_size = "
                             f"{cfg.train.batch_size} and train.num_particles = "
                             f"{cfg.train.num_particles}", "choose smaller sizes")
            vae = VAE.from_config(cfg, dataset.image_shape)
        else:  # the user's own VAE: it trains with the configured estimator
            vae.estimator = estimator
            num_pixels = self.dataset.num_pixels
            for name, module in estimator.make_modules(cfg, num_pixels).items():
                if name not in vae.estimator_modules:
                    vae.estimator_modules[name] = module
        self.vae = vae.to(self.device)
        self.estimator = estimator
        self.steps_per_epoch = len(self.dataset.train) // (cfg.train.batch_size
                                                           * self.workers.world_size)
        self.vae.kl_weight = self.kl_weight(1)  # the structure the first step will have
        self.elbo = estimator.make_elbo(cfg)
        self.optimizer = adam(self._param_groups(cfg), cfg.train.lr, self.device)
        if cfg.train.precision != "float32":
            keep_float32_outputs(self.vae)
        # FastELBO where the traced program has its structure and a probe agrees, else the
        # estimator's Pyro ELBO; under torchrun the loss module is wrapped in
        # DistributedDataParallel (distributed.py).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            probe = binarize_batch(self.dataset.train.images[:cfg.train.batch_size],
                                   cfg.data.binarize)
        self.fast, choice = choose_training_loss(cfg, self.vae, estimator, probe,
                                                 len(self.dataset.train), self.workers.rank,
                                                 self.workers.world_size, elbo=self.elbo)
        self.paths: list[PathChoice] = [choice]
        # a poutine.scale of the user's own (not the KL weight) makes the objective another one
        self.vae.kl_weight = 1.0
        structure = inspect_program(self.vae, probe[:2], len(self.dataset.train))
        estimator.check_program(structure)
        self._program_scale = next((f"site {s.name!r} scaled by {s.extra_scale:g}"
                                    for s in (*structure.guide_sites, *structure.model_sites)
                                    if s.extra_scale != 1.0), None)
        self.vae.kl_weight = self.kl_weight(1)
        self.loss_module = None
        if self.fast is not None or self.workers.active:
            if self.fast is None and not hasattr(self.elbo, "differentiable_loss"):
                raise ConfigError(f"estimator {cfg.train.estimator} cannot train data-parallel "
                                  f"(its ELBO has no differentiable_loss); run one process")
            self.loss_module = distributed.wrap(
                self.fast or distributed.PyroLoss(self.elbo, self.vae, len(self.dataset.train)),
                self.workers, self.device)
        self.scheduler = _scheduler(self.optimizer, cfg)
        #: objects with on_step(trainer, step, loss, grad_norm) and on_epoch_end(trainer,
        #: record) (e.g. training.tensorboard.TensorBoardCallback); they must not draw from
        #: the global RNG.
        self.callbacks: list[Any] = []
        # early stopping on the validation ELBO: best value, its epoch, epochs without a gain
        self.early_stop = {"best": -math.inf, "best_epoch": 0, "bad_epochs": 0,
                           "stopped": False}
        self._params = list(self.vae.parameters())  # fixed for the run: built once, not per step
        self.metrics: list[dict[str, Any]] = []
        # Position in the schedule: epochs finished, batches done in the current epoch.
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self._epoch_loss, self._epoch_seconds, self._epoch_bad = 0.0, 0.0, 0
        self.bad_steps = 0
        #: whether this trainer has written a checkpoint, and what to do after its first one
        self.saved_once = False
        self.after_first_save: Any = None

    # -- checkpoints --------------------------------------------------------------------------
    def _param_groups(self, cfg: Config) -> list[dict[str, Any]]:
        """Adam parameter groups: the encoder at ``train.encoder_lr_scale`` times the rate (0:
        the estimator's default, see :attr:`Estimator.encoder_lr_scale`)."""
        scale = cfg.train.encoder_lr_scale or ESTIMATORS[cfg.train.estimator].encoder_lr_scale
        if scale == 1.0:
            return [{"params": list(self.vae.parameters())}]
        encoder = list(self.vae.encoder.parameters())
        ids = {id(p) for p in encoder}
        rest = [p for p in self.vae.parameters() if id(p) not in ids]
        return [{"params": encoder, "lr": cfg.train.lr * scale}, {"params": rest}]

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "image_shape": list(self.dataset.image_shape),
            "vae": self.vae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "param_store_extras": _param_store_extras(),
            "rng": _rng_state(),
            "position": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                         "global_step": self.global_step, "epoch_loss": self._epoch_loss,
                         "epoch_seconds": self._epoch_seconds, "epoch_bad": self._epoch_bad,
                         "bad_steps": self.bad_steps},
            "metrics": [json.dumps(m) for m in self.metrics],
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "early_stop": dict(self.early_stop),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        saved, ours = len(state["optimizer"]["param_groups"]), len(self.optimizer.param_groups)
        if saved != ours:
            raise CheckpointError(
                f"the checkpoint's optimizer has {saved} parameter group(s), this run {ours}: it "
                f"was saved with another encoder learning-rate scale (older pyro_vae versions "
                f"trained the score estimator's encoder at the full rate); resume with "
                f"train.encoder_lr_scale={1 if saved == 1 else 0.1}")
        self.optimizer.load_state_dict(state["optimizer"])
        store = pyro.get_param_store()
        for name, value in state["param_store_extras"].items():
            store[name] = value.to(self.device)
        _set_rng_state(state["rng"])
        pos = state["position"]
        self.epoch, self.batch_in_epoch, self.global_step = (
            pos["epoch"], pos["batch_in_epoch"], pos["global_step"])
        self._epoch_loss, self._epoch_seconds, self._epoch_bad = (
            pos["epoch_loss"], pos["epoch_seconds"], pos["epoch_bad"])
        self.bad_steps = pos["bad_steps"]
        self.metrics = [json.loads(m) for m in state["metrics"]]
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.early_stop.update(state.get("early_stop", {}))

    def save(self) -> None:
        if self.run_dir is not None and self.workers.is_main:
            save_checkpoint(self.run_dir / CHECKPOINT_FILE, self.state_dict())
            self.saved_once = True
            if self.after_first_save is not None:
                self.after_first_save()
                self.after_first_save = None

    def resume(self) -> None:
        """Load the run folder's checkpoint; rewrite metrics.jsonl to match it."""
        assert self.run_dir is not None
        state = load_checkpoint(self.run_dir / CHECKPOINT_FILE, self.device)
        require_keys(state, self.run_dir / CHECKPOINT_FILE,
                     ("config", "image_shape", "vae", "optimizer", "position", "rng"))
        check_image_shape(state["image_shape"], self.dataset.image_shape,
                          f"cannot resume {self.run_dir}")
        # config.toml was compared in check_run_dir; the checkpoint carries its own copy, which
        # differs only if one of the two files was edited or replaced by hand.
        saved = Config.from_dict(state["config"])
        check_parts(saved, self.vae, f"run {self.run_dir}")
        differences = _config_differences(saved, self.cfg)
        if differences:
            raise CheckpointError(f"cannot resume {self.run_dir}: its {CHECKPOINT_FILE} was made "
                                  f"with a different config: {'; '.join(differences)}")
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume {self.run_dir}: {CHECKPOINT_FILE} does not fit "
                                  f"the model ({_short(e)})") from None
        # A crash between appending a metrics line and saving the checkpoint would otherwise
        # leave a line for an epoch that is about to be run again.
        if self.workers.is_main:
            atomic_write_text(self.run_dir / METRICS_FILE,
                          "".join(json.dumps(m) + "\n" for m in self.metrics))

    # -- training -----------------------------------------------------------------------------
    def _log_event(self, event: dict[str, Any]) -> None:
        if self.run_dir is not None and self.workers.is_main:
            append_text(self.run_dir / EVENTS_FILE, json.dumps(event) + "\n")

    def _loss_and_grads(self, x: torch.Tensor, num_data: int) -> float:
        """The minibatch loss, with its gradients left in ``.grad``: fast path, DDP or Pyro."""
        precision = precision_context(self.cfg.train.precision, self.device)
        if self.loss_module is None:
            with precision:
                return self.elbo.loss_and_grads(self.vae.model, self.vae.guide, x,
                                                num_data=num_data)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                   enabled=self.fast is None):
            if self.fast is None:  # Pyro draws z per replica: give each rank its own draws
                torch.manual_seed(distributed.rank_seed(self.cfg.train.seed, self.global_step,
                                                        self.workers.rank))
            with precision:
                loss = self.loss_module(x)
            loss.backward()
        return loss.item()

    def kl_weight(self, step: int) -> float:
        """The weight of the latent sites at ``step`` (counted from 1): ``--beta``, ramped up
        linearly over ``--kl-warmup-epochs`` (a function of the step, so resuming repeats it)."""
        beta, warmup = self.cfg.train.beta, self.cfg.train.kl_warmup_epochs * self.steps_per_epoch
        return beta * min(1.0, step / warmup) if warmup else beta

    def objective(self, first_step: int, last_step: int) -> str:
        """The name of the objective trained between two steps: ``elbo`` when it is the ELBO."""
        if self.estimator.optimizes_bound:
            return f"iwae bound (K={self.cfg.train.num_particles})"
        if self.estimator.surrogate == "relaxed":
            return f"relaxed elbo (temperature {self.cfg.train.temperature:g}" + (
                f" to {self.cfg.train.temperature_final:g})" if self.cfg.train.temperature_final
                else ")")
        if self._program_scale is not None:
            return f"scaled objective ({self._program_scale} in the program)"
        low, high = self.kl_weight(first_step), self.kl_weight(last_step)
        if low == high == 1.0:
            return "elbo"
        return f"beta-elbo (KL weight {low:.3g})" if low == high else \
            f"beta-elbo (KL weight {low:.3g} to {high:.3g})"

    def step(self, x: torch.Tensor) -> float | None:
        """One SVI step on minibatch ``x``; returns the loss, or None if it was skipped."""
        num_data = len(self.dataset.train)
        self.vae.kl_weight = self.kl_weight(self.global_step + 1)
        if hasattr(self.elbo, "set_progress"):  # e.g. an annealed relaxation temperature
            total = max(self.cfg.train.epochs * self.steps_per_epoch - 1, 1)
            self.elbo.set_progress(self.global_step / total)
        try:
            loss = self._loss_and_grads(x, num_data)
        except ValueError as e:
            # Pyro's validation refuses a NaN produced inside the forward pass (e.g. inf - inf
            # after a huge step): the same fault as a NaN loss, so skip the step the same way.
            if isinstance(e, PyroVAEError) or "found invalid values" not in str(e):
                raise
            loss = math.nan
        # Parameters without a gradient this step are ignored; with none, the norm is 0.
        if self.cfg.train.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.cfg.train.grad_clip)
        else:  # only the norm (for the finiteness check), without a pass that scales by 1
            grad_norm = _total_grad_norm(self._params)
        if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self._epoch_bad += 1
            # Steps are counted from 1, as in metrics.jsonl ("step": steps done so far).
            self._log_event({"event": "non-finite", "step": self.global_step + 1,
                             "epoch": self.epoch + 1, "loss": repr(loss),
                             "grad_norm": repr(float(grad_norm))})
            _LOG.warning("step %d (epoch %d) skipped: non-finite loss or gradient (loss %r, "
                         "gradient norm %r); %d of at most %d", self.global_step + 1,
                         self.epoch + 1, loss, float(grad_norm), self.bad_steps,
                         self.cfg.train.max_bad_steps)
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                saved = self.run_dir is not None and (self.run_dir / CHECKPOINT_FILE).is_file()
                raise TrainingError(
                    f"stopped after {self.bad_steps} steps with a non-finite loss or gradient "
                    f"(last at step {self.global_step + 1}); "
                    f"{'the last good checkpoint is kept' if saved else 'no checkpoint yet'}. "
                    f"Try a lower train.lr, train.grad_clip, or a reparametrized estimator")
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for callback in self.callbacks:
            callback.on_step(self, self.global_step + 1, loss / num_data, float(grad_norm))
        return loss / num_data

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per-image ELBO (nats) on the test split and, if present, the validation split."""
        out = {"test_elbo": elbo_per_image(self.vae, self.dataset.test.images,
                                           self.cfg.train.eval_batch_size)}
        if self.dataset.val is not None:
            out["val_elbo"] = elbo_per_image(self.vae, self.dataset.val.images,
                                             self.cfg.train.eval_batch_size)
        return out

    def run(self, stop: _StopRequest | None = None) -> bool:
        """Train until ``cfg.train.epochs``; returns False if interrupted by a stop request."""
        try:
            return self._run(stop)
        finally:
            self.vae.kl_weight = 1.0  # the trained model is handed back unscaled

    def _run(self, stop: _StopRequest | None) -> bool:
        from tqdm.auto import tqdm

        train = self.dataset.train.images
        batch, n = self.cfg.train.batch_size * self.workers.world_size, len(train)
        num_batches = n // batch  # the last partial batch is dropped: every step sees B images
        mode = self.cfg.data.binarize
        while self.epoch < self.cfg.train.epochs and not self.early_stop["stopped"]:
            order = epoch_order(n, self.cfg.train.seed, self.epoch).to(self.device)
            start = time.perf_counter()
            bar = tqdm(total=num_batches, initial=self.batch_in_epoch, leave=False,
                       desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}",
                       disable=None if self.cfg.train.progress else True)
            while self.batch_in_epoch < num_batches:
                if stop is not None and stop.requested:
                    self._epoch_seconds += time.perf_counter() - start
                    bar.close()
                    return False
                idx = order[self.batch_in_epoch * batch:(self.batch_in_epoch + 1) * batch]
                loss = self.step(self.workers.shard(binarize_batch(train[idx], mode)))
                self.global_step += 1
                self.batch_in_epoch += 1
                if loss is not None:
                    self._epoch_loss += loss
                    bar.set_postfix(elbo=f"{-loss:.2f}", refresh=False)
                bar.update()
            bar.close()
            good = num_batches - self._epoch_bad
            objective = self.objective(self.global_step - num_batches + 1, self.global_step)
            train_value = -self._epoch_loss / good if good else math.nan
            evaluation = self._guarded_evaluation(train_value)
            # train_elbo only when the objective is the ELBO; test and validation ELBOs are
            # always the true ELBO (unscaled densities, pyro_vae.metrics)
            record = {"epoch": self.epoch + 1, "step": self.global_step,
                      **({"train_elbo": train_value} if objective == "elbo" else {}),
                      "train_objective": train_value, "objective": objective,
                      "kl_weight": self.kl_weight(self.global_step),
                      "lr": self.optimizer.param_groups[-1]["lr"],
                      **evaluation,
                      "seconds": self._epoch_seconds + time.perf_counter() - start,
                      "bad_steps": self._epoch_bad}
            self.metrics.append(record)
            self.epoch += 1
            if self.scheduler is not None:
                self.scheduler.step()
            self._update_early_stop(record)
            self.batch_in_epoch, self._epoch_loss = 0, 0.0
            self._epoch_seconds, self._epoch_bad = 0.0, 0
            # The checkpoint first: metrics.jsonl never holds an epoch that has none (a failed
            # write, such as a full disk, leaves the two files agreeing).
            self.save()
            if self.run_dir is not None and self.workers.is_main:
                append_text(self.run_dir / METRICS_FILE, json.dumps(record) + "\n")
            if self.cfg.train.progress and self.workers.is_main:
                PROGRESS.info("%s", _epoch_line(record, self.cfg.train.epochs))
            for callback in self.callbacks:
                callback.on_epoch_end(self, record)
            if self.early_stop["stopped"]:
                _LOG.warning("early stop after epoch %d: the validation ELBO has not improved "
                             "for %d epochs (best %.2f at epoch %d)", self.epoch,
                             self.early_stop["bad_epochs"], self.early_stop["best"],
                             self.early_stop["best_epoch"])
                break
        return True

    def _guarded_evaluation(self, train_value: float) -> dict[str, float]:
        """The epoch-end evaluation, guarded like a step: a model that diverged (every step of
        the epoch skipped, or a non-finite test or validation ELBO) stops the run with one
        line, before the epoch reaches metrics.jsonl or a checkpoint, so the checkpoint kept
        is the last finite one."""
        try:
            evaluation = self.evaluate()
        except ValueError as e:  # Pyro's validation meeting NaN parameters
            if isinstance(e, PyroVAEError) or "invalid values" not in str(e):
                raise
            evaluation = {"test_elbo": math.nan}
        bad = {k: v for k, v in evaluation.items() if not math.isfinite(v)}
        if math.isfinite(train_value) and not bad:
            return evaluation
        what = (f"a non-finite {', '.join(k.replace('_', ' ') for k in bad)}" if bad
                else "every step skipped")
        self._log_event({"event": "diverged", "epoch": self.epoch + 1,
                         "step": self.global_step, "why": what})
        saved = self.run_dir is not None and (self.run_dir / CHECKPOINT_FILE).is_file()
        kept = "the last finite checkpoint is kept" if saved else "no checkpoint was written"
        raise TrainingError(f"the model diverged in epoch {self.epoch + 1} ({what}); {kept}. "
                            f"Try a lower train.lr, train.grad_clip, or a reparametrized "
                            f"estimator")

    def _update_early_stop(self, record: dict[str, Any]) -> None:
        patience = self.cfg.train.early_stop_patience
        value = record.get("val_elbo")
        if not patience or value is None:
            return
        state = self.early_stop
        if value > state["best"]:
            state.update(best=value, best_epoch=record["epoch"], bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        record["best_val_elbo"], record["best_epoch"] = state["best"], state["best_epoch"]
        if state["bad_epochs"] >= patience:
            state["stopped"] = True
            record["early_stop"] = True
            self._log_event({"event": "early-stop", "epoch": record["epoch"], **state})


def fit(config: Config, run_dir: str | Path | None = None, *, resume: bool = False,
        overwrite: bool = False, dataset: Dataset | None = None,
        vae: VAE | None = None) -> TrainResult:
    """Train a VAE with SVI; keep ``run_dir`` (if given) updated with metrics and checkpoints.

    Everything the user can get wrong (config values, the run folder, the data) is checked
    before anything is written.

    Args:
        config: the run's configuration (validated here).
        run_dir: output folder for config.toml, metrics.jsonl and checkpoint.pt, or None.
        resume: continue the run saved in ``run_dir``.
        overwrite: replace a run already in ``run_dir``.
        dataset: use these images instead of loading ``config.data`` (tests, notebooks).
        vae: train this VAE (built from your own encoder, decoder, prior modules) instead of
            the one ``config.model`` describes; it trains with ``config.train``'s estimator,
            and the run records its classes so that it is never loaded into others.
    """
    config.validate()
    if config.data.data_dir:  # stored resolved: the run works from any working directory
        config.data.data_dir = str(Path(config.data.data_dir).expanduser().resolve())
    if config.train.tensorboard:  # before anything is written
        from .tensorboard import require_tensorboard

        require_tensorboard()
    workers = distributed.setup(config.train.device)  # joins torchrun's processes, if any
    apply_threads(config.train.threads)
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume and overwrite:
        raise ConfigError("resume=True and overwrite=True exclude each other")
    if run_dir is not None:  # the folder's own checks, before it is locked (and created)
        check_run_dir(run_dir, config, resume, overwrite, contents=False)
    with owned(run_dir, enabled=workers.is_main) as folder:
        return _fit_owned(config, run_dir, folder, workers, resume, overwrite, dataset, vae)


def _fit_owned(config: Config, run_dir: Path | None, folder: RunFolder | None, workers: Any,
               resume: bool, overwrite: bool, dataset: Dataset | None,
               vae: VAE | None) -> TrainResult:
    if run_dir is not None:
        check_run_dir(run_dir, config, resume, overwrite)
    if dataset is None:
        dataset = load_dataset(config.data)
    trainer = Trainer(config, dataset, run_dir, vae=vae)
    record_parts(config, trainer.vae)
    distributed.barrier(workers)  # every process has checked the folder before rank 0 writes
    if run_dir is not None:
        if resume:
            trainer.resume()
    try:
        return _train_in_folder(config, run_dir, folder, workers, resume, trainer)
    except BaseException as error:
        if folder is not None and not trainer.saved_once:
            restored = folder.restore()  # an overwrite that failed before its first checkpoint
            if isinstance(error, OutputError) and not resume and not restored:
                folder.clear()  # a disk fault before the first checkpoint leaves no run files
        raise


def _train_in_folder(config: Config, run_dir: Path | None, folder: RunFolder | None,
                     workers: Any, resume: bool, trainer: Trainer) -> TrainResult:
    if folder is not None:
        folder.claim()  # the first write: every check has passed
    if run_dir is not None and workers.is_main:
        make_folder(run_dir)
        if not resume and folder is not None:
            folder.set_aside()  # the old run goes only once the new one has a checkpoint
            trainer.after_first_save = folder.discard_previous
        elif not resume:
            for name in (METRICS_FILE, EVENTS_FILE, CHECKPOINT_FILE):
                (run_dir / name).unlink(missing_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, config.to_toml())
    for choice in trainer.paths:
        trainer._log_event({"event": "path", "step": trainer.global_step, **choice.as_dict()})
    if config.train.tensorboard and run_dir is not None and workers.is_main:
        from .tensorboard import TensorBoardCallback

        trainer.callbacks.append(TensorBoardCallback(
            run_dir, config.train.tensorboard_images_every, first_step=trainer.global_step))
    try:
        with _StopRequest() as stop:
            finished = trainer.run(stop)
    finally:
        for callback in trainer.callbacks:
            callback.close()
    if not finished:
        trainer.save()
    return TrainResult(config, trainer.vae, trainer.dataset, trainer.metrics, run_dir,
                       interrupted=not finished, stop_signal=stop.signal)




def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One line per epoch for logs: ``epoch 3/20: train ELBO -120.45, test ELBO -118.20 ..."""
    train = (f"train ELBO {record['train_elbo']:.2f}" if "train_elbo" in record
             else f"train {record['objective']} {record['train_objective']:.2f}")
    val = f", val ELBO {record['val_elbo']:.2f}" if "val_elbo" in record else ""
    bad = f", {record['bad_steps']} steps skipped" if record.get("bad_steps") else ""
    return (f"epoch {record['epoch']}/{epochs}: {train}, test ELBO {record['test_elbo']:.2f}"
            f"{val}, {record['seconds']:.1f} s{bad}")


def _scheduler(optimizer: torch.optim.Optimizer, cfg: Config
               ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """torch's scheduler for ``train.lr_schedule``, stepped once per epoch (None: constant)."""
    schedule = cfg.train.lr_schedule
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.train.lr_step_epochs,
                                               gamma=cfg.train.lr_gamma)
    return None


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """torch Adam with the fused kernel where the device has one (one kernel for all tensors)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))
    except (RuntimeError, TypeError):  # an older torch or a device without a fused kernel
        return torch.optim.Adam(params, lr=lr)

