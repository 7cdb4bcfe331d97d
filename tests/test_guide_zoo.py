"""A zoo of guide families x priors: every number is Pyro's, or an independent estimate's.

Guides: diagonal-normal (the accelerated structure), laplace, and the full-covariance plugin of
docs/examples; priors: standard-normal, student-t and a 3-component mixture. Every guide is
paired with the standard-normal prior and with one non-Gaussian prior. For each pair:

* the trainer's loss and gradients equal the estimator's own Pyro ELBO on the same noise, and
  the path it took (FastELBO or generic) is the one the program's structure calls for;
* ``elbo_terms`` and ``importance_log_likelihood`` agree, within Monte Carlo error, with
  estimates computed here from the guide's own distribution (``vae.encoder(x)``);
* the fused log-likelihood kernel and the traces give the same numbers for the same seed;
* the variance lab's gradient draws equal Pyro's ``loss_and_grads`` draw for draw;
* programs just outside an accelerator's structure fall back to Pyro and say why;
* on a linear-Gaussian VAE the ELBO, its gradient, the KL and log p(x) are known exactly.

Statistical checks use different seeds for the library and the test, and tolerances of a few
standard errors computed from the draws themselves.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from conftest import small_dataset, tiny_config
from pyro.infer import Trace_ELBO
from torch import nn
from torch.distributions import kl_divergence

import pyro_vae
from pyro_vae import (
    ENCODERS,
    ESTIMATORS,
    VAE,
    Config,
    Dataset,
    Split,
    StandardNormalPrior,
    elbo_per_image,
    elbo_terms,
    fit,
    importance_log_likelihood,
)
from pyro_vae.inference.accelerators import choose_log_weights, choose_training_loss
from pyro_vae.inference.estimators import AVG_BASELINE_PARAM
from pyro_vae.lab.variance import gradient_draws
from pyro_vae.metrics.loglik import _generic_block
from pyro_vae.training.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
IMAGE_SHAPE = (1, 28, 28)
GUIDES = ["diagonal-normal", "laplace", "full-covariance"]
#: Every guide with N(0, I), and each with one non-Gaussian prior.
ZOO = [(g, "standard-normal") for g in GUIDES] + [
    ("diagonal-normal", "mixture"), ("laplace", "student-t"), ("full-covariance", "mixture")]
#: The distribution class each non-accelerated guide samples from (the fallback names it).
GUIDE_CLASS = {"laplace": "Laplace", "full-covariance": "MultivariateNormal"}
#: Pairs for which torch has KL(q || p) in closed form (the others are Monte Carlo).
CLOSED_FORM_KL = {("diagonal-normal", "standard-normal"), ("laplace", "standard-normal")}
#: Standard errors a statistical check allows (deterministic seeds: no flakiness, but a true
#: mismatch of this size would be a bias, not noise).
Z = 5.0


#: The estimators that apply to a continuous code (the discrete-only ones: tests/test_discrete.py)
CONTINUOUS = [n for n in sorted(ESTIMATORS) if ESTIMATORS[n].applies_to(discrete=False)]

def _ids(cases) -> list[str]:
    return ["-".join(str(c) for c in case) for case in cases]


@pytest.fixture(scope="module", autouse=True)
def _full_covariance_plugin():
    """Register the docs/examples plugin's ``full-covariance`` guide family."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        pyro_vae.load_plugin("full_covariance")  # a no-op when another test loaded it
    finally:
        sys.path.remove(str(EXAMPLES))
    assert "full-covariance" in ENCODERS


def zoo_config(guide: str, prior: str = "standard-normal", estimator: str = "reparam",
               num_particles: int | None = None, **train) -> Config:
    cfg = tiny_config(estimator=estimator, batch_size=16, epochs=1, **train)
    cfg.train.num_particles = num_particles or ESTIMATORS[estimator].min_particles
    cfg.model.hidden_dims = [32]
    cfg.model.latent_dim = 3
    cfg.model.encoder = guide
    cfg.model.prior = prior
    cfg.model.prior_components = 3
    return cfg.validate()


def zoo_vae(guide: str, prior: str = "standard-normal", estimator: str = "reparam",
            seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE.from_config(zoo_config(guide, prior, estimator), IMAGE_SHAPE)


def digits(mnist5k_grey: Dataset, n: int) -> torch.Tensor:
    return (mnist5k_grey.train.images[:n] > 0.5).float()


def _grads(vae: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in vae.named_parameters() if p.grad is not None}


def _seeded(vae: nn.Module, fn, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """``fn()``'s loss and the gradients it leaves, from zeroed gradients and a seeded RNG."""
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = fn()
    grads = _grads(vae)
    vae.zero_grad(set_to_none=True)
    return float(loss), grads


def _pyro_loss_and_grads(cfg: Config, vae: VAE, x: torch.Tensor, num_data: int | None):
    elbo = ESTIMATORS[cfg.train.estimator].make_elbo(cfg)

    def run() -> float:
        with pyro.get_param_store().scope():
            return elbo.loss_and_grads(vae.model, vae.guide, x, num_data=num_data)
    return run


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                       rtol: float = 1e-4) -> None:
    assert got.keys() == want.keys() and want
    for name in want:
        atol = rtol * max(1e-3, want[name].abs().max().item())
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


# -- 1. the training step is Pyro's ELBO ---------------------------------------------------------
TRAIN_CASES = ([(g, p, "reparam", 1) for g, p in ZOO]
               + [(g, "standard-normal", "analytic-kl", 1) for g in GUIDES]
               + [("diagonal-normal", "mixture", "reparam", 3), ("laplace", "student-t",
                                                                 "reparam", 3)])


@pytest.mark.parametrize("guide,prior,estimator,particles", TRAIN_CASES, ids=_ids(TRAIN_CASES))
def test_training_step_equals_the_estimators_pyro_elbo(guide, prior, estimator, particles):
    cfg = zoo_config(guide, prior, estimator, particles)
    trainer = Trainer(cfg, small_dataset(num_train=64, num_test=16))
    (choice,) = trainer.paths
    if guide == "diagonal-normal":
        assert choice.path == "FastELBO", choice
    else:
        assert choice.path.startswith("generic"), choice
        assert GUIDE_CLASS[guide] in choice.reason, choice
    vae, num_data = trainer.vae, len(trainer.dataset.train)
    x = (small_dataset(num_train=16, seed=3).train.images > 0.5).float()
    pyro_run = _pyro_loss_and_grads(cfg, vae, x, num_data)
    got, got_grads = _seeded(vae, lambda: trainer._loss_and_grads(x, num_data), seed=11)
    want, want_grads = _seeded(vae, pyro_run, seed=11)
    assert got == pytest.approx(want, rel=1e-5)
    # every trainable parameter (the mixture prior's too) gets its gradient
    assert want_grads.keys() == {n for n, p in vae.named_parameters() if p.requires_grad}
    assert_grads_close(got_grads, want_grads)
    # another seed draws other z: the match above is not an accident of the data
    other, _ = _seeded(vae, pyro_run, seed=12)
    assert other != pytest.approx(want, rel=1e-6)


# -- 2. metrics agree with the guide's own distribution ------------------------------------------
K = 2048


@torch.no_grad()
def own_draws(vae: VAE, x: torch.Tensor, k: int, seed: int):
    """q = vae.encoder(x), z ~ q: log p(x|z), log p(z), log q(z|x), each ``(k, N)``, and q."""
    torch.manual_seed(seed)
    q = vae.encoder(x)
    z = q.rsample((k,))
    return (vae.decoder(z).log_prob(x).double(), vae.prior().log_prob(z).double(),
            q.log_prob(z).double(), q)


def log_mean_exp_and_stderr(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log (1/K) sum_k w_k per image and its delta-method standard error."""
    k = log_w.shape[0]
    w = (log_w - log_w.max(0).values).exp()
    return torch.logsumexp(log_w, 0) - math.log(k), w.std(0) / (math.sqrt(k) * w.mean(0))


def assert_within(got: torch.Tensor, want: torch.Tensor, stderr: torch.Tensor, what: str,
                  z: float = Z) -> None:
    got, want, stderr = (t.detach().double() for t in (got, want, stderr))
    score = (got - want) / stderr
    assert bool((score.abs() < z).all()), f"{what}: {got} vs {want}, z-scores {score}"
    n = got.numel()
    mean_score = (got - want).mean() / (stderr.pow(2).sum().sqrt() / n)
    assert abs(float(mean_score)) < z, f"{what}: mean differs by {float(mean_score):.2f} SE"


@pytest.mark.parametrize("guide,prior", ZOO, ids=_ids(ZOO))
def test_elbo_and_log_likelihood_agree_with_the_guides_own_draws(guide, prior, mnist5k_grey):
    vae = zoo_vae(guide, prior)
    x = digits(mnist5k_grey, 8)
    terms = elbo_terms(vae, x, num_particles=K, seed=1)
    ll = importance_log_likelihood(vae, x, num_samples=K, seed=2)
    lpx, lpz, lq, q = own_draws(vae, x, K, seed=3)
    log_w = lpx + lpz - lq

    # ELBO: the library's per-image mean over K draws vs ours over K others
    lib_var = lpx.var(0) if terms.kl_closed_form else log_w.var(0)
    assert_within(terms.elbo, log_w.mean(0), ((log_w.var(0) + lib_var) / K).sqrt(), "ELBO")
    assert torch.allclose(terms.elbo, terms.reconstruction - terms.kl)

    # log p(x): log-mean-exp of K weights on each side (same K, so the same downward bias)
    mine, mine_se = log_mean_exp_and_stderr(log_w)
    assert torch.isfinite(ll.stderr).all() and (ll.stderr > 0).all()
    assert_within(ll.estimate, mine, (ll.stderr.double() ** 2 + mine_se ** 2).sqrt(), "log p(x)")
    assert bool((ll.estimate > terms.elbo).all())  # the K-sample bound lies above the ELBO
    if guide == "diagonal-normal":
        assert ll.path.path == "BernoulliMLPWeights", ll.path
    else:
        assert ll.path.path == "generic" and GUIDE_CLASS[guide] in ll.path.reason, ll.path

    # KL: closed form exactly where torch knows the pair, else Monte Carlo
    mc_kl = lq - lpz
    mc_se = mc_kl.std(0) / math.sqrt(K)
    assert terms.kl_closed_form == ((guide, prior) in CLOSED_FORM_KL)
    if terms.kl_closed_form:
        torch.testing.assert_close(terms.kl, kl_divergence(q, vae.prior()).float(),
                                   rtol=1e-5, atol=1e-5)
        assert_within(terms.kl, mc_kl.mean(0), mc_se, "closed-form KL vs Monte Carlo")
    else:
        assert_within(terms.kl, mc_kl.mean(0), math.sqrt(2) * mc_se, "Monte Carlo KL")
    if guide == "full-covariance" and prior == "standard-normal":
        # torch knows KL(MVN || MVN): the library's Monte Carlo KL must be unbiased for it
        standard = dist.MultivariateNormal(torch.zeros(3), torch.eye(3))
        assert_within(terms.kl, kl_divergence(q, standard), mc_se, "MC KL vs exact")


def test_laplace_kl_is_monte_carlo_when_asked(mnist5k_grey):
    vae = zoo_vae("laplace")
    x = digits(mnist5k_grey, 8)
    exact = elbo_terms(vae, x, num_particles=4, seed=1)
    mc = elbo_terms(vae, x, num_particles=K, seed=1, closed_form_kl=False)
    assert exact.kl_closed_form and not mc.kl_closed_form
    _, lpz, lq, _ = own_draws(vae, x, K, seed=3)
    assert_within(mc.kl, exact.kl, (lq - lpz).std(0) / math.sqrt(K), "MC KL vs closed form")
    # not the closed form by another name
    assert not torch.allclose(mc.kl, exact.kl, atol=1e-4)


# -- 3. the fused log-likelihood kernel equals the traces ----------------------------------------
@pytest.mark.parametrize("prior", ["standard-normal", "mixture", "student-t"])
def test_fused_log_likelihood_equals_the_generic_path(prior, mnist5k_grey):
    vae = zoo_vae("diagonal-normal", prior)
    x = digits(mnist5k_grey, 6)
    fused = importance_log_likelihood(vae, x, num_samples=1500, seed=5)
    generic = importance_log_likelihood(vae, x, num_samples=1500, seed=5, fast=False)
    assert fused.path.path == "BernoulliMLPWeights", fused.path
    assert generic.path.path == "generic" and "fast=False" in generic.path.reason
    torch.testing.assert_close(fused.estimate, generic.estimate, rtol=0, atol=1e-3)
    torch.testing.assert_close(fused.stderr, generic.stderr, rtol=1e-2, atol=1e-4)
    # the same seed means the same noise: another seed moves the estimates by far more
    other = importance_log_likelihood(vae, x, num_samples=1500, seed=6, fast=False)
    assert (other.estimate - generic.estimate).abs().max() > 1e-2


def test_laplace_log_likelihood_takes_the_generic_path(mnist5k_grey):
    vae = zoo_vae("laplace")
    x = digits(mnist5k_grey, 4)
    auto = importance_log_likelihood(vae, x, num_samples=300, seed=5)
    plain = importance_log_likelihood(vae, x, num_samples=300, seed=5, fast=False)
    assert auto.path.path == "generic", auto.path
    assert "Laplace" in auto.path.reason and "not Normal" in auto.path.reason
    assert torch.equal(auto.estimate, plain.estimate)


# -- 4. the variance lab's draws are Pyro's ------------------------------------------------------
def _collect(draws) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for chunk in draws:
        for k, v in chunk.items():
            out.setdefault(k, []).append(v.detach().clone())
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.mark.parametrize("estimator", CONTINUOUS)
@pytest.mark.parametrize("guide", ["laplace", "full-covariance"])
def test_lab_draws_equal_pyro_for_non_normal_guides(guide, estimator, mnist5k_grey):
    vae = zoo_vae(guide, estimator=estimator)
    x = digits(mnist5k_grey, 8)
    k = ESTIMATORS[estimator].min_particles
    store = pyro.get_param_store()
    store[AVG_BASELINE_PARAM] = torch.full((8,), -300.0)
    paths: list = []
    torch.manual_seed(5)
    auto = _collect(gradient_draws(vae, estimator, x, 3, num_particles=k, chunk_size=2,
                                   method="auto", paths=paths))
    torch.manual_seed(5)
    slow = _collect(gradient_draws(vae, estimator, x, 3, num_particles=k, method="pyro",
                                   paths=paths))
    assert paths[0].path == "generic", paths[0]
    assert GUIDE_CLASS[guide] in paths[0].reason and "func:" in paths[0].reason, paths[0]
    assert auto.keys() == slow.keys()
    for name in slow:
        assert torch.equal(auto[name], slow[name]), name
    # ... and a draw is one loss_and_grads of the estimator's ELBO, divided by the batch size
    cfg = zoo_config(guide, estimator=estimator)
    vae.estimator = ESTIMATORS[estimator]
    elbo = ESTIMATORS[estimator].make_elbo(cfg)
    torch.manual_seed(5)
    with store.scope():
        for r in range(3):
            if estimator == "score-avg-baseline":
                pyro.get_param_store()[AVG_BASELINE_PARAM] = torch.full((8,), -300.0)
            vae.zero_grad(set_to_none=True)
            elbo.loss_and_grads(vae.model, vae.guide, x)
            for name, p in vae.named_parameters():
                if name in slow:
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                    torch.testing.assert_close(slow[name][r], g / x.shape[0], rtol=1e-6,
                                               atol=0, msg=lambda m, n=name: f"{n}: {m}")
    vae.zero_grad(set_to_none=True)
    assert any(bool(v.abs().sum() > 0) for v in slow.values())


@pytest.mark.parametrize("estimator", ["reparam", "stl", "score", "analytic-kl", "iwae"])
def test_lab_draws_of_the_diagonal_normal_guide_match_pyro(estimator, mnist5k_grey):
    vae = zoo_vae("diagonal-normal", estimator=estimator)
    x = digits(mnist5k_grey, 8)
    k = 2 if estimator == "iwae" else 1
    paths: list = []
    # chunk_size=1: torch.randn of a chunk of draws is not the same numbers as one randn per
    # draw (vectorized normal sampling), so only one draw per chunk repeats Pyro's noise
    torch.manual_seed(9)
    fast = _collect(gradient_draws(vae, estimator, x, 3, num_particles=k, chunk_size=1,
                                   method="auto", paths=paths))
    torch.manual_seed(9)
    slow = _collect(gradient_draws(vae, estimator, x, 3, num_particles=k, method="pyro"))
    assert paths[0].path in ("hand", "func"), paths[0]
    for name in slow:
        scale = slow[name].abs().max().item()
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-3, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_lab_mean_gradient_of_the_laplace_guide_is_pyros(mnist5k_grey):
    """R lab draws (seed A) against Trace_ELBO with R vectorized particles (seed B)."""
    vae = zoo_vae("laplace")
    x = digits(mnist5k_grey, 8)
    r = 200
    torch.manual_seed(21)
    draws = _collect(gradient_draws(vae, "reparam", x, r))
    torch.manual_seed(22)
    vae.zero_grad(set_to_none=True)
    with pyro.get_param_store().scope():
        Trace_ELBO(num_particles=r, vectorize_particles=True, max_plate_nesting=1
                   ).loss_and_grads(vae.model, vae.guide, x)
    want = {n: p.grad / x.shape[0] for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    for group in ("encoder", "decoder"):
        names = [n for n in want if n.startswith(group)]
        mean = torch.cat([draws[n].mean(0).flatten() for n in names]).double()
        var = torch.cat([draws[n].var(0).flatten() for n in names]).double()
        ref = torch.cat([want[n].flatten() for n in names]).double()
        live = var > 0
        z2 = (mean - ref)[live] ** 2 / (2 * var[live] / r)
        # mean squared z-score ~ 1 (parameters share noise, so it spreads: 0.5-1.5 seen)
        assert float(z2.mean()) < 4.0, (group, float(z2.mean()))
        assert float((mean - ref).norm() / ref.norm()) < 0.3, group


# -- 5. programs just outside an accelerator's structure fall back -------------------------------
class AnnealedVAE(VAE):
    """KL annealing: log p(z) weighted by ``beta`` in the objective."""

    beta = 0.5

    def model(self, x, num_data=None):
        pyro.module("decoder", self.decoder)
        pyro.module("prior", self.prior)
        with self.data_plate(x, num_data):
            with pyro.poutine.scale(scale=self.beta):
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.decoder(z), obs=x)


class ExtraSiteVAE(VAE):
    """A second latent w per image, sampled by the guide and the model."""

    def model(self, x, num_data=None):
        pyro.module("decoder", self.decoder)
        pyro.module("prior", self.prior)
        with self.data_plate(x, num_data):
            z = pyro.sample("z", self.prior())
            pyro.sample("w", dist.Normal(torch.zeros_like(x[..., :1]), 1.0).to_event(1))
            pyro.sample("x", self.decoder(z), obs=x)

    def guide(self, x, num_data=None):
        pyro.module("encoder", self.encoder)
        with self.data_plate(x, num_data):
            pyro.sample("z", self.estimator.posterior(self.encoder(x)))
            pyro.sample("w", dist.Normal(x.mean(-1, keepdim=True), 0.5).to_event(1))


def test_kl_annealing_falls_back_and_trains_on_its_own_objective(mnist5k_grey):
    cfg = zoo_config("diagonal-normal")
    data = small_dataset(num_train=64, num_test=16)
    x = digits(mnist5k_grey, 16)
    torch.manual_seed(0)
    vae = AnnealedVAE.from_config(cfg, IMAGE_SHAPE)
    fast, choice = choose_training_loss(cfg, vae, ESTIMATORS["reparam"], x, 64)
    assert fast is None and choice.path.startswith("generic"), choice
    assert "scale" in choice.reason and "'z'" in choice.reason, choice

    trainer = Trainer(cfg, data, vae=vae)
    assert trainer.paths[0].path.startswith("generic") and "scale" in trainer.paths[0].reason
    num_data = len(trainer.dataset.train)
    got, got_grads = _seeded(vae, lambda: trainer._loss_and_grads(x, num_data), seed=4)
    want, want_grads = _seeded(vae, _pyro_loss_and_grads(cfg, vae, x, num_data), seed=4)
    assert got == pytest.approx(want, rel=1e-6)
    assert_grads_close(got_grads, want_grads, rtol=1e-6)
    # the objective really is annealed: -(N/B) sum [log p(x|z) + beta log p(z) - log q(z|x)]
    with torch.no_grad():
        torch.manual_seed(4)
        q = vae.encoder(x)
        z = q.rsample()
        annealed = (vae.decoder(z).log_prob(x) + vae.beta * vae.prior().log_prob(z)
                    - q.log_prob(z)).sum() * num_data / x.shape[0]
    assert got == pytest.approx(-float(annealed), rel=1e-5)
    # per-image metrics read the unscaled densities: the same as the plain program's
    # (Monte Carlo KL, so that log p(z) itself is read off the model's trace)
    def measured(program: VAE):
        torch.manual_seed(3)
        return (elbo_terms(program, x[:4], num_particles=8, seed=3, closed_form_kl=False),
                elbo_per_image(program, x[:4], num_particles=8))

    (terms, per_image) = measured(vae)
    (plain_terms, plain_per_image) = measured(VAE(vae.encoder, vae.decoder, vae.prior))
    torch.testing.assert_close(terms.kl, plain_terms.kl)
    torch.testing.assert_close(terms.elbo, plain_terms.elbo)
    assert per_image == pytest.approx(plain_per_image, rel=1e-6)

    torch.manual_seed(0)
    result = fit(cfg, dataset=data, vae=AnnealedVAE.from_config(cfg, IMAGE_SHAPE))
    assert isinstance(result.vae, AnnealedVAE)
    record = result.metrics[0]
    assert len(result.metrics) == 1 and math.isfinite(record["train_objective"])
    # the program's own poutine.scale makes the objective another one than the ELBO: named so
    assert "train_elbo" not in record and record["objective"].startswith("scaled objective")


def test_extra_latent_site_falls_back_and_is_measured(mnist5k_grey):
    cfg = zoo_config("diagonal-normal")
    x = digits(mnist5k_grey, 8)
    torch.manual_seed(0)
    vae = ExtraSiteVAE.from_config(cfg, IMAGE_SHAPE)
    fast, choice = choose_training_loss(cfg, vae, ESTIMATORS["reparam"], x, 64)
    assert fast is None and choice.path.startswith("generic"), choice
    assert "2 sample sites" in choice.reason, choice
    trainer = Trainer(cfg, small_dataset(num_train=64, num_test=16), vae=vae)
    num_data = len(trainer.dataset.train)
    got, got_grads = _seeded(vae, lambda: trainer._loss_and_grads(x, num_data), seed=4)
    want, want_grads = _seeded(vae, _pyro_loss_and_grads(cfg, vae, x, num_data), seed=4)
    assert got == pytest.approx(want, rel=1e-6)
    assert_grads_close(got_grads, want_grads, rtol=1e-6)
    # the ELBO counts w too: E[log p(x|z) + log p(z) - log q(z|x)] - KL(q(w|x) || p(w))
    terms = elbo_terms(vae, x, num_particles=K, seed=1)
    lpx, lpz, lq, _ = own_draws(vae, x, K, seed=3)
    log_w = lpx + lpz - lq
    kl_w = kl_divergence(dist.Normal(x.mean(-1), 0.5), dist.Normal(0.0, 1.0)).double()
    assert kl_w.min() > 0.1  # large enough to notice if w were left out
    assert_within(terms.elbo, log_w.mean(0) - kl_w,
                  ((log_w.var(0) + lpx.var(0)) / K).sqrt(), "ELBO with two latents")


@pytest.mark.parametrize("case", ["extra-site", "laplace", "grey-x"])
def test_fused_log_likelihood_falls_back_and_says_why(case, mnist5k_grey):
    x = digits(mnist5k_grey, 4)
    torch.manual_seed(0)
    cfg = zoo_config("laplace" if case == "laplace" else "diagonal-normal")
    vae = (ExtraSiteVAE if case == "extra-site" else VAE).from_config(cfg, IMAGE_SHAPE)
    if case == "grey-x":
        x = mnist5k_grey.train.images[:4]
    reason = {"extra-site": "2 sample sites", "laplace": "Laplace", "grey-x": "not binary"}[case]
    with torch.no_grad():  # as importance_log_likelihood calls it
        kernel, choice = choose_log_weights(vae, x, "float32", False,
                                            lambda x1, k: _generic_block(vae, x1, k))
    assert kernel is None and choice.path == "generic" and reason in choice.reason, choice
    result = importance_log_likelihood(vae, x, num_samples=64, seed=0)
    assert result.path.path == "generic" and reason in result.path.reason, result.path
    assert torch.isfinite(result.estimate).all()


def test_log_likelihood_of_an_annealed_program_is_the_plain_programs(mnist5k_grey):
    """log p(x) reads unscaled densities, so a ``poutine.scale`` on z changes nothing: the
    fused kernel may take the program (it computes unscaled weights) or refuse it naming the
    scale; either way the estimates equal the plain program's traced ones for the seed."""
    x = digits(mnist5k_grey, 4)
    torch.manual_seed(0)
    vae = AnnealedVAE.from_config(zoo_config("diagonal-normal"), IMAGE_SHAPE)
    plain = VAE(vae.encoder, vae.decoder, vae.prior)
    want = importance_log_likelihood(plain, x, num_samples=256, seed=0, fast=False)
    for fast in (True, False):
        got = importance_log_likelihood(vae, x, num_samples=256, seed=0, fast=fast)
        if got.path.path == "generic" and fast:
            assert "scale" in got.path.reason, got.path
        else:
            assert got.path.path in ("BernoulliMLPWeights", "generic"), got.path
        torch.testing.assert_close(got.estimate, want.estimate, rtol=0, atol=1e-3)


# -- 6. a conjugate model: exact ELBO, gradient, KL and log p(x) ----------------------------------
class LinearEncoder(nn.Module):
    """q(z|x) = N(a x + b, softplus(c)^2) on one-dimensional x and z."""

    def __init__(self, a: float = 0.3, b: float = -0.2, c: float = -1.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        return dist.Normal(self.a * x + self.b, F.softplus(self.c).expand_as(x)).to_event(1)


class UnitNoiseDecoder(nn.Module):
    """p(x|z) = N(z, 1)."""

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        return dist.Normal(z, torch.ones_like(z)).to_event(1)


def linear_gaussian_vae() -> VAE:
    cfg = Config()
    cfg.model.latent_dim = 1
    return VAE(LinearEncoder(), UnitNoiseDecoder(), StandardNormalPrior(cfg.model))


def exact_elbo(enc: LinearEncoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """Per image: ELBO, E_q log p(x|z) and KL(q || p) with p(z) = N(0, 1), p(x|z) = N(z, 1):

    E_q log p(x|z) = -log(2 pi) / 2 - ((x - m)^2 + s^2) / 2,
    KL = (m^2 + s^2 - 1) / 2 - log s."""
    m = (enc.a * x + enc.b).squeeze(-1)
    s = F.softplus(enc.c)
    x = x.squeeze(-1)
    recon = -0.5 * math.log(2 * math.pi) - 0.5 * ((x - m) ** 2 + s ** 2)
    kl = 0.5 * (m ** 2 + s ** 2 - 1) - torch.log(s)
    return recon - kl, recon, kl


def exact_gradient(enc: LinearEncoder, x: torch.Tensor) -> torch.Tensor:
    """d(sum of ELBOs)/d(a, b, c), by hand: dELBO/dm = x - 2m, dELBO/ds = 1/s - 2s."""
    with torch.no_grad():
        m = enc.a * x + enc.b
        s = F.softplus(enc.c)
        dm = x - 2 * m
        ds = (1 / s - 2 * s) * x.shape[0]
        return torch.stack([(dm * x).sum(), dm.sum(), ds * torch.sigmoid(enc.c)])


LINE_X = torch.tensor([[0.1], [0.5], [0.9], [-0.3], [1.4]])


def test_exact_gradient_of_the_linear_gaussian_elbo():
    """The hand-written gradient (used below) is the gradient of the closed-form ELBO."""
    vae = linear_gaussian_vae()
    enc = vae.encoder
    auto = torch.autograd.grad(exact_elbo(enc, LINE_X)[0].sum(), [enc.a, enc.b, enc.c])
    torch.testing.assert_close(torch.stack(auto), exact_gradient(enc, LINE_X))


@pytest.mark.parametrize("estimator", ["reparam", "analytic-kl", "stl", "score"])
def test_pyro_elbo_gradients_are_unbiased_on_a_conjugate_model(estimator):
    vae = linear_gaussian_vae()
    enc = vae.encoder
    vae.estimator = ESTIMATORS[estimator]
    cfg = Config()
    cfg.train.num_particles = 50  # each draw averages 50 vectorized particles
    elbo = ESTIMATORS[estimator].make_elbo(cfg)
    draws = 40
    losses, grads = [], []
    torch.manual_seed(1)
    with pyro.get_param_store().scope():
        for _ in range(draws):
            vae.zero_grad(set_to_none=True)
            losses.append(elbo.loss_and_grads(vae.model, vae.guide, LINE_X))
            grads.append(torch.stack([enc.a.grad, enc.b.grad, enc.c.grad]).detach().clone())
    vae.zero_grad(set_to_none=True)
    losses, grads = torch.tensor(losses, dtype=torch.float64), torch.stack(grads).double()
    want_loss = -exact_elbo(enc, LINE_X)[0].sum().double()
    want_grad = -exact_gradient(enc, LINE_X).double()
    loss_se = losses.std() / math.sqrt(draws)
    grad_se = grads.std(0) / math.sqrt(draws)
    assert_within(losses.mean().reshape(1), want_loss.reshape(1), loss_se.reshape(1), "loss")
    assert_within(grads.mean(0), want_grad, grad_se, f"{estimator} gradient")
    # the check has power: a sign or factor-of-two error in any component would show
    assert bool((Z * grad_se < 0.5 * want_grad.abs()).all()), (grad_se, want_grad)


def test_user_built_vae_trains_with_fit_and_is_measured_exactly():
    cfg = Config()
    cfg.model.latent_dim = 1
    cfg.data.binarize = "none"  # the linear-Gaussian model observes real values
    cfg.train.batch_size = 5
    cfg.train.epochs = 2
    cfg.train.progress = False
    g = torch.Generator().manual_seed(0)
    data = Dataset("line", (1, 1, 1), Split(torch.rand(20, 1, generator=g), torch.zeros(20).long()),
                   Split(torch.rand(10, 1, generator=g), torch.zeros(10).long()))
    vae = linear_gaussian_vae()
    before = [p.detach().clone() for p in vae.encoder.parameters()]
    result = fit(cfg, dataset=data, vae=vae)
    assert result.vae is vae and len(result.metrics) == 2
    assert all(math.isfinite(m["test_elbo"]) for m in result.metrics)
    assert not all(torch.equal(a, b) for a, b in zip(before, vae.encoder.parameters()))
    assert cfg.run.encoder_class.endswith("LinearEncoder")

    # the trainer's fast path covers this program, and equals Trace_ELBO on it
    trainer = Trainer(cfg, data, vae=vae)
    assert trainer.paths[0].path == "FastELBO", trainer.paths[0]
    x = data.test.images[:5]
    got, got_grads = _seeded(vae, lambda: trainer._loss_and_grads(x, 20), seed=2)
    want, want_grads = _seeded(vae, _pyro_loss_and_grads(cfg, vae, x, 20), seed=2)
    assert got == pytest.approx(want, rel=1e-5)
    assert_grads_close(got_grads, want_grads)

    # metrics on the trained model against the closed forms
    x = data.test.images
    elbo, recon, kl = (t.detach() for t in exact_elbo(vae.encoder, x))
    terms = elbo_terms(vae, x, num_particles=4000, seed=3)
    assert terms.kl_closed_form
    torch.testing.assert_close(terms.kl, kl, rtol=1e-5, atol=1e-6)
    lpx, lpz, lq, _ = own_draws(vae, x, 4000, seed=5)
    assert_within(terms.reconstruction, recon, lpx.std(0) / math.sqrt(4000), "E_q log p(x|z)")
    log_w_se = float((lpx + lpz - lq).var(0).mean().sqrt()) / math.sqrt(4000 * len(x))
    assert elbo_per_image(vae, x, num_particles=4000) == pytest.approx(
        float(elbo.mean()), abs=Z * log_w_se)
    # log p(x), x ~ N(0, 2), with a proposal wider than the posterior N(x/2, 1/2) so that the
    # importance weights have finite variance (a narrower one, as trained, makes the
    # delta-method standard error meaningless)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x.squeeze(-1))
    with torch.no_grad():
        vae.encoder.a.fill_(0.45)
        vae.encoder.b.fill_(0.05)
        vae.encoder.c.fill_(math.log(math.expm1(0.9)))  # q's scale 0.9
    ll = importance_log_likelihood(vae, x, num_samples=2000, seed=4)
    assert ll.path.path == "generic" and "Bernoulli" in ll.path.reason, ll.path
    assert_within(ll.estimate, exact, ll.stderr + 1e-4, "log p(x)")
    assert bool((exact > exact_elbo(vae.encoder, x)[0] + 0.01).all())
