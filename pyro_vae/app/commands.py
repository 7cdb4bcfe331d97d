"""The run-level commands behind ``pyro-vae evaluate``, ``sample`` and ``score``: load a run,
measure it (:mod:`pyro_vae.metrics`), write the results. The only layer besides the trainer's
run folder that writes files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, DataError
from ..files import make_folder, new_outputs, write_output
from ..metrics import (
    SCORE_METHODS,
    anomaly_scores,
    bits_per_dim,
    elbo_terms,
    importance_log_likelihood,
    interpolate,
    latent_activity,
    manifold,
    pca,
    tsne,
)
from ..metrics.checks import check_positive
from ..metrics.elbo import DEFAULT_ROWS_PER_STEP
from ..metrics.latent import TSNE_POINTS
from ..metrics.loglik import log_weight_memory
from ..models.vae import VAE
from ..runtime import check_memory
from ..training.runs import check_writable

SPLITS = ("test", "val", "train")
EVALUATION_FILE = "evaluation.json"


def _load(run_dir: str | Path, device: str) -> tuple[Any, VAE, tuple[int, int, int]]:
    from ..training.runs import load_run, pick_device

    cfg, vae, state = load_run(run_dir, str(pick_device(device)))
    return cfg, vae, tuple(state["image_shape"])


def run_split(cfg: Any, split: str, limit: int = 0, image_shape: tuple[int, ...] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The observations and labels of a run's dataset split, binarized as in training.

    The test and validation splits get the same fixed binarization as the run's own
    evaluation; the training split of a ``dynamic`` run gets one fixed draw. With
    ``image_shape`` (the network's), images of another shape raise DataError.
    """
    from ..data import binarize_fixed, check_image_shape, load_dataset, prepare_observations

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    data = prepare_observations(load_dataset(cfg.data), cfg.data, seed=cfg.train.seed)
    if image_shape is not None:
        check_image_shape(image_shape, data.image_shape, f"dataset {cfg.data.dataset}")
    part = getattr(data, split)
    if part is None:
        raise DataError(f"the run has no {split} split (it was trained with val_fraction = 0)")
    images = part.images
    if split == "train" and cfg.data.binarize == "dynamic":
        images = binarize_fixed(images, "dynamic", seed=cfg.train.seed)
    if limit:
        return images[:limit], part.labels[:limit]
    return images, part.labels


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image_folder(folder: str | Path, image_shape: tuple[int, int, int]
                      ) -> tuple[torch.Tensor, list[str]]:
    """Grey images (PNG or JPEG) of a folder as ``(N, H*W)`` values in [0, 1], sorted by name.

    Raises:
        DataError: no such folder, no image in it, an unreadable file, or a size that does not
            match the model's ``image_shape``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no {', '.join(IMAGE_SUFFIXES)} files in {folder}")
    c, h, w = image_shape
    images = []
    for path in files:
        try:
            img = _read_grey(path)
        except RuntimeError as e:
            raise DataError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None
        if tuple(img.shape) != (c, h, w):
            raise DataError(f"image {path} is {img.shape[-2]}x{img.shape[-1]} pixels; the model "
                            f"needs {h}x{w} grey images")
        images.append(img.reshape(-1).float() / 255.0)
    return torch.stack(images), [p.name for p in files]


def _read_grey(path: Path) -> torch.Tensor:
    import warnings

    from torchvision.io import ImageReadMode, read_image

    # torchvision announces that its decoders will move to another package; they still work.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return read_image(str(path), mode=ImageReadMode.GRAY)


def _check_new(paths: list[Path], overwrite: bool) -> None:
    """Before anything is computed: the outputs do not exist (unless ``overwrite``) and can be
    written (their folder exists or can be created, and is writable)."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]} already exists; pass overwrite=True to replace it or "
                              "choose another output path")
    for path in paths:
        check_writable(path.parent)




def evaluate_run(run_dir: str | Path, split: str = "test", num_samples: int = 5000,
                 limit: int = 0, batch_size: int = 8, chunk_size: int | None = None,
                 num_particles: int = 10, seed: int = 0, precision: str = "float32",
                 threshold: float = 0.01, out: str | Path | None = None,
                 overwrite: bool = False, device: str = "cpu", workers: int = 1,
                 progress: bool = False) -> dict[str, Any]:
    """Test ELBO (with its two terms), importance-sampled log p(x) and active units of a run;
    written to ``out`` (default ``RUN_DIR/evaluation.json``) and returned. ``workers``
    processes share the log-likelihood (see :func:`importance_log_likelihood`); ``progress``
    reports it (a bar on a terminal, a line with an ETA every 30 s in a log)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / EVALUATION_FILE
    check_positive("num_samples", num_samples)
    check_positive("num_particles", num_particles)
    cfg, vae, shape = _load(run_dir, device)
    _check_new([out], overwrite)
    x, _ = run_split(cfg, split, limit, shape)
    x = x.to(next(vae.parameters()).device)
    num_pixels = x.shape[1]
    terms = elbo_terms(vae, x, batch_size=max(1, DEFAULT_ROWS_PER_STEP // num_particles),
                       num_particles=num_particles, seed=seed)
    elbo = terms.elbo
    start = time.perf_counter()
    ll = importance_log_likelihood(vae, x, num_samples, batch_size, chunk_size, seed=seed,
                                   precision=precision, workers=workers, progress=progress)
    seconds = time.perf_counter() - start
    activity = latent_activity(vae, x)
    result = {
        "run_dir": str(run_dir), "dataset": cfg.data.dataset, "split": split,
        "num_images": int(x.shape[0]), "num_pixels": num_pixels, "prior": cfg.model.prior,
        "likelihood": cfg.model.likelihood, "latent_dim": cfg.model.latent_dim,
        "elbo": {"nats": float(elbo.mean()),
                 "stderr": float(elbo.std() / math.sqrt(len(elbo))) if len(elbo) > 1 else None,
                 "bits_per_dim": bits_per_dim(float(elbo.mean()), num_pixels,
                                               cfg.model.likelihood),
                 "reconstruction_nats": float(terms.reconstruction.mean()),
                 "kl_nats": float(terms.kl.mean()), "kl_closed_form": terms.kl_closed_form,
                 "num_particles": num_particles},
        "log_likelihood": {"nats": ll.mean(), "mc_stderr": ll.mc_stderr(),
                           "stderr": ll.data_stderr(),
                           "bits_per_dim": bits_per_dim(ll.mean(), num_pixels,
                                                         cfg.model.likelihood),
                           "num_samples": num_samples, "precision": precision,
                           "seconds": seconds, "workers": workers},
        "gap_nats": ll.mean() - float(elbo.mean()),
        "active_units": {"count": int((activity > threshold).sum()), "threshold": threshold,
                         "latent_dim": int(activity.numel()),
                         "variances": [float(v) for v in activity]},
        "seed": seed,
        "paths": [ll.path.as_dict()] if ll.path is not None else [],
    }
    write_output(out, json.dumps(result, indent=2) + "\n")
    return result


def format_evaluation(r: dict[str, Any]) -> str:
    """A short table of an :func:`evaluate_run` result."""
    e, ll, au = r["elbo"], r["log_likelihood"], r["active_units"]
    lines = [f"{r['dataset']} {r['split']} split, {r['num_images']} images; prior {r['prior']}, "
             f"likelihood {r['likelihood']}",
             f"{'':34s}{'nats/image':>12s}{'bits/dim':>10s}",
             f"{'ELBO':34s}{e['nats']:12.2f}{e['bits_per_dim']:10.4f}",
             f"{'  reconstruction E_q log p(x|z)':34s}{e['reconstruction_nats']:12.2f}",
             f"{'  KL(q(z|x) || p(z))':34s}{e['kl_nats']:12.2f}",
             f"{'log p(x), K = ' + str(ll['num_samples']):34s}{ll['nats']:12.2f}"
             f"{ll['bits_per_dim']:10.4f}",
             f"{'  standard error (MC / images)':34s}{ll['mc_stderr']:12.3f} / {ll['stderr']:.3f}",
             f"{'log p(x) - ELBO':34s}{r['gap_nats']:12.2f}",
             f"active units: {au['count']} of {au['latent_dim']} (variance > {au['threshold']})"]
    return "\n".join(lines)


@torch.no_grad()
def sample_run(run_dir: str | Path, out_dir: str | Path | None = None, seed: int = 0,
               num_images: int = 64, num_pairs: int = 8, steps: int = 10,
               overwrite: bool = False, device: str = "cpu", projection: str = "pca"
               ) -> dict[str, Path]:
    """Figures of a trained model in ``out_dir`` (default ``RUN_DIR/samples``): prior samples
    (decoder means and draws), test reconstructions, latent interpolations, and the latent
    space (a scatter and the decoded manifold for a 2-D latent, otherwise a 2-D ``projection``
    of the test encodings: ``pca``, or ``tsne`` on the first TSNE_POINTS of them)."""

    check_positive("num_images", num_images)
    if projection not in ("pca", "tsne"):
        raise ConfigError(f"unknown projection {projection!r}; choose pca or tsne")
    check_positive("num_pairs", num_pairs)
    if steps < 2:
        raise ConfigError(f"steps must be >= 2, got {steps}")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "samples"
    cfg, vae, shape = _load(run_dir, device)
    names = ["prior_means", "prior_draws", "reconstructions", "interpolations", "latent_space"]
    two_d = cfg.model.latent_dim == 2 and cfg.model.latent == "gaussian"
    if two_d:
        names.append("manifold")
    paths = {n: out_dir / f"{n}.png" for n in names}
    _check_new(list(paths.values()), overwrite)
    pixels = math.prod(shape)
    side = math.ceil(math.sqrt(num_images))  # the grid image: RGBA float canvases, twice
    check_memory(log_weight_memory(vae, num_images, 1, pixels) + 2 * 16 * side ** 2 * pixels,
                 f"sample --num-images {num_images}", "ask for fewer images")
    x, labels = run_split(cfg, "test", image_shape=shape)
    x = x.to(next(vae.parameters()).device)
    if 2 * num_pairs > len(x):
        raise ConfigError(f"num_pairs = {num_pairs} is more than the {len(x) // 2} pairs the "
                          f"{len(x)} test images make; ask for at most {len(x) // 2}")
    with new_outputs(paths.values(), out_dir):
        make_folder(out_dir)
        _draw_samples(vae, cfg, x, labels, shape, paths, seed, num_images, num_pairs, steps,
                      projection)
    return paths


def _draw_samples(vae: VAE, cfg: Any, x: torch.Tensor, labels: torch.Tensor,
                  shape: tuple[int, ...], paths: dict[str, Path], seed: int, num_images: int,
                  num_pairs: int, steps: int, projection: str) -> None:
    from . import plots

    two_d = "manifold" in paths
    ncols = max(1, int(math.ceil(math.sqrt(num_images))))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z = vae.prior().sample((num_images,))
        px = vae.decoder(z)
        means, draws = px.mean, px.sample()
        pairs = torch.randperm(len(x))[:2 * num_pairs].reshape(-1, 2)
    plots.save_image_grid(paths["prior_means"], means, shape, ncols,
                          title=f"decoder means of z ~ p(z) (seed {seed})")
    plots.save_image_grid(paths["prior_draws"], draws, shape, ncols,
                          title=f"x ~ p(x|z), z ~ p(z) (seed {seed})")
    test = x[:32]
    recon = vae.reconstruct(test)
    rows = torch.cat([torch.stack([test[i:i + 8], recon[i:i + 8]])
                      for i in range(0, len(test), 8)])
    plots.save_image_grid(paths["reconstructions"], rows.reshape(-1, test.shape[-1]), shape, 8,
                          title="test images (odd rows), reconstructions (even rows)")
    plots.save_interpolations(paths["interpolations"], interpolate(vae, x[pairs[:, 0]],
                                                                   x[pairs[:, 1]], steps),
                              x[pairs[:, 0]], x[pairs[:, 1]], shape)
    # E_q[z|x]; for one-hot groups the probabilities of every group, flattened
    codes = torch.cat([vae.encoder(xb).mean.flatten(1) for xb in x.split(1000)]).cpu()
    if two_d:
        plots.plot_latent_scatter(paths["latent_space"], codes, labels,
                                  "test set: E_q[z|x], coloured by label", "z1", "z2")
        grid, coords = manifold(vae, codes, n=20)
        plots.save_manifold(paths["manifold"], grid, coords, shape)
    elif projection == "tsne":
        n = min(TSNE_POINTS, len(codes))
        plots.plot_latent_scatter(paths["latent_space"], tsne(codes[:n], seed), labels[:n],
                                  f"test set: t-SNE of E_q[z|x] ({cfg.model.latent_dim}-D, "
                                  f"first {n} images)", "t-SNE 1", "t-SNE 2")
    else:
        projected, explained = pca(codes, 2)
        plots.plot_latent_scatter(paths["latent_space"], projected, labels,
                                  f"test set: PCA of E_q[z|x] ({cfg.model.latent_dim}-D), "
                                  f"{100 * explained:.0f}% of variance",
                                  "principal component 1", "principal component 2")




def score_run(run_dir: str | Path, split: str = "test", images: str | Path | None = None,
              method: str = "nll", num_samples: int = 1000, limit: int = 0, seed: int = 0,
              batch_size: int = 8, precision: str = "float32", out: str | Path | None = None,
              overwrite: bool = False, device: str = "cpu") -> Path:
    """Anomaly scores of a dataset split or of a folder of images, to a CSV file.

    Columns: ``index``, ``label`` (the split's label, or the file name for a folder) and
    ``score`` (-log p(x) or -ELBO in nats; higher is more anomalous). Folder images are
    binarized the way the run's test images were.
    """
    from ..data import binarize_fixed

    if method not in SCORE_METHODS:
        raise ConfigError(f"unknown score method {method!r}; choose one of: "
                          f"{', '.join(SCORE_METHODS)}")
    run_dir = Path(run_dir)
    default = f"scores-{Path(images).name if images is not None else split}-{method}.csv"
    out = Path(out) if out is not None else run_dir / default
    cfg, vae, shape = _load(run_dir, device)
    _check_new([out], overwrite)
    if images is not None:
        x, names = load_image_folder(images, shape)
        if limit:
            x, names = x[:limit], names[:limit]
        x = binarize_fixed(x, cfg.data.binarize, cfg.data.threshold, cfg.train.seed + 1)
        labels: list[Any] = names
    else:
        x, y = run_split(cfg, split, limit, shape)
        labels = [int(v) for v in y]
    x = x.to(next(vae.parameters()).device)
    kwargs = {"precision": precision} if method == "nll" else {}
    scores = anomaly_scores(vae, x, method, num_samples, batch_size, seed=seed, **kwargs)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["index", "label" if images is None else "file", "score"])
    for i, (label, score) in enumerate(zip(labels, scores.tolist(), strict=True)):
        writer.writerow([i, label, f"{score:.4f}"])
    write_output(out, table.getvalue())
    return out

