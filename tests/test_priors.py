"""Priors: every test that takes ``name`` runs for every entry of PRIORS, so a new prior is
covered with no test edits. The docs' worked example goes through the same checks."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import tiny_config
from pyro.infer import Trace_ELBO

from pyro_vae import PRIORS, VAE, Config, ConfigError, Dataset, Split, load_run, train
from pyro_vae.app.cli import main as cli_main
from pyro_vae.data import binarize_fixed
from pyro_vae.metrics import elbo_per_image
from pyro_vae.models.priors import FlowPrior, VampPrior, build_prior

DOCS = Path(__file__).resolve().parents[1] / "docs" / "priors.md"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
IMAGE_SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def _one_thread():
    # Networks this small gain nothing from a second thread, and on a shared CPU the OpenMP
    # spin-wait of two threads costs an order of magnitude in CPU time.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def prior_config(name: str, latent_dim: int = 6) -> Config:
    cfg = tiny_config(epochs=3, batch_size=64, lr=3e-3)
    cfg.model.latent_dim = latent_dim
    cfg.model.prior = name
    cfg.model.prior_components = 4
    return cfg.validate()


def make_vae(name: str, latent_dim: int = 6) -> VAE:
    return VAE.from_config(prior_config(name, latent_dim), IMAGE_SHAPE)


def perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter away from its (often symmetric) initial value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def real_subset(mnist: Dataset, num_train: int = 512, num_test: int = 100) -> Dataset:
    return Dataset("mnist-5k", mnist.image_shape,
                   Split(mnist.train.images[:num_train], mnist.train.labels[:num_train]),
                   Split(mnist.test.images[:num_test], mnist.test.labels[:num_test]))


# -- checks shared by the registry tests and the docs example -------------------------------------
def check_shapes_and_log_prob(name: str) -> None:
    vae = make_vae(name, latent_dim=6)
    p = vae.prior()
    assert p.batch_shape == () and p.event_shape == (6,)
    z = p.sample((5,))
    assert z.shape == (5, 6) and torch.isfinite(z).all()
    assert p.log_prob(z).shape == (5,) and torch.isfinite(p.log_prob(z)).all()
    # Training evaluates it on (particles, batch, latent_dim), including far-out codes.
    z3 = 4.0 * torch.randn(3, 7, 6)
    assert p.log_prob(z3).shape == (3, 7) and torch.isfinite(p.log_prob(z3)).all()
    assert vae.sample(4).shape == (4, 784)


def check_density_integrates_to_one(name: str) -> None:
    """On a 2-d grid, sum p(z) dz ~ 1: catches wrong normalizers and log-det-Jacobian signs."""
    vae = make_vae(name, latent_dim=2)
    perturb(vae)
    side = torch.linspace(-12.0, 12.0, 401)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        mass = vae.prior().log_prob(grid).exp().sum() * (side[1] - side[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=0.02)


def check_gradients_reach_parameters(name: str) -> None:
    vae = make_vae(name)
    params = dict(vae.prior.named_parameters())
    if not params:
        pytest.skip(f"prior {name} has no learnable parameters")
    x = torch.rand(16, 784).bernoulli()
    Trace_ELBO(max_plate_nesting=1).loss_and_grads(vae.model, vae.guide, x)
    for pname, p in params.items():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def check_training_and_checkpoint(name: str, mnist: Dataset, run_dir: Path) -> None:
    """Training from the Python API improves the test ELBO, moves the prior's parameters,
    writes samples.png, and the checkpoint restores log p(z) exactly."""
    cfg = prior_config(name)
    data = real_subset(mnist)
    test = binarize_fixed(data.test.images, "dynamic", 0.5, cfg.train.seed + 1)
    pyro.set_rng_seed(cfg.train.seed)  # the initialisation fit() will start from
    untrained = VAE.from_config(cfg, IMAGE_SHAPE)
    before = elbo_per_image(untrained, test, num_particles=4)
    result = train(cfg, run_dir, dataset=data)
    assert torch.equal(result.dataset.test.images, test)
    after = elbo_per_image(result.vae, test, num_particles=4)
    assert after > before + 50, (name, before, after)
    for (pname, p0), p1 in zip(untrained.prior.named_parameters(), result.vae.prior.parameters()):
        assert not torch.equal(p0, p1), f"{name}: {pname} was not trained"
    assert (run_dir / "samples.png").stat().st_size > 0

    _, loaded, _ = load_run(run_dir)
    z = 2.0 * torch.randn(50, cfg.model.latent_dim)
    with torch.no_grad():
        assert torch.equal(loaded.prior().log_prob(z), result.vae.prior().log_prob(z))
    fresh = make_vae(name)  # a different initialisation ...
    fresh.load_state_dict(copy.deepcopy(result.vae.state_dict()))  # ... overwritten
    with torch.no_grad():
        assert torch.equal(fresh.prior().log_prob(z), result.vae.prior().log_prob(z))


def check_cli_trains(name: str, out: Path) -> None:
    rc = cli_main(["train", "--out", str(out), "--prior", name, "--train-limit", "256",
                   "--epochs", "1", "--batch-size", "64", "--hidden-dims", "32",
                   "--latent-dim", "4", "--prior-components", "3", "--no-progress"])
    assert rc == 0
    assert (out / "samples.png").stat().st_size > 0
    assert Config.load(out / "config.toml").model.prior == name


# -- registry-wide tests ------------------------------------------------------------------------
#: Priors over a continuous code (the discrete ones: tests/test_discrete.py)
NAMES = [n for n in sorted(PRIORS)
         if "gaussian" in getattr(PRIORS[n], "latent_kinds", ("gaussian",))]


@pytest.mark.parametrize("name", NAMES)
def test_sample_shape_and_finite_log_prob(name):
    check_shapes_and_log_prob(name)


@pytest.mark.parametrize("name", NAMES)
def test_density_integrates_to_one(name):
    check_density_integrates_to_one(name)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_prior_parameters(name):
    check_gradients_reach_parameters(name)


@pytest.mark.parametrize("name", NAMES)
def test_training_improves_elbo_and_checkpoint_round_trips(name, mnist5k_grey, tmp_path):
    check_training_and_checkpoint(name, mnist5k_grey, tmp_path / "run")


@pytest.mark.parametrize("name", NAMES)
def test_cli_trains_prior_and_writes_samples(name, tmp_path):
    check_cli_trains(name, tmp_path / "run")


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_kl_flag_matches_the_distribution(name):
    p = make_vae(name).prior()
    is_diag_normal = isinstance(p, dist.Independent) and type(p.base_dist) is dist.Normal
    assert PRIORS[name].closed_form_kl == is_diag_normal
    cfg = prior_config(name)
    cfg.train.estimator = "analytic-kl"
    if is_diag_normal:
        cfg.validate()
    else:
        with pytest.raises(ConfigError, match=f"prior {name} does not have"):
            cfg.validate()


# -- specific priors ----------------------------------------------------------------------------
def test_vamp_prior_is_the_mean_of_encoder_posteriors_at_pseudo_inputs():
    vae = make_vae("vamp")
    prior = vae.prior
    assert isinstance(prior, VampPrior)
    z = torch.randn(9, 6)
    q = vae.encoder(prior.pseudo_inputs)  # batch (K,)
    expected = torch.logsumexp(q.log_prob(z.unsqueeze(1)), dim=1) - math.log(4)
    assert torch.allclose(prior().log_prob(z), expected, atol=1e-5)
    # The encoder belongs to the VAE: not duplicated in the prior's state or parameters.
    assert list(prior.state_dict()) == ["raw_pseudo_inputs"]
    encoder_params = {id(p) for p in vae.encoder.parameters()}
    assert not encoder_params & {id(p) for p in prior.parameters()}
    assert len(list(vae.parameters())) == len({id(p) for p in vae.parameters()})


def test_vamp_prior_needs_the_encoder():
    with pytest.raises(ConfigError, match="vamp needs the encoder"):
        build_prior(prior_config("vamp").model)


def test_flow_prior_starts_near_standard_normal_and_survives_deepcopy():
    vae = make_vae("flow")
    assert isinstance(vae.prior, FlowPrior) and len(vae.prior.networks) == 2
    z = torch.randn(20, 6)
    standard = dist.Normal(0.0, 1.0).expand([6]).to_event(1).log_prob(z)
    assert torch.allclose(vae.prior().log_prob(z), standard, atol=0.1)
    x = torch.rand(8, 784).bernoulli()
    Trace_ELBO(max_plate_nesting=1).loss_and_grads(vae.model, vae.guide, x)
    copy.deepcopy(vae)  # no non-leaf tensors cached on the module after a step


def test_student_t_uses_prior_df():
    cfg = prior_config("student-t")
    cfg.model.prior_df = 7.5
    p = VAE.from_config(cfg.validate(), IMAGE_SHAPE).prior()
    assert torch.all(p.base_dist.df == 7.5)


@pytest.mark.parametrize("flags, message", [
    (["--prior", "flow", "--latent-dim", "1"], "prior flow needs latent_dim >= 2, got 1"),
    (["--prior", "flow", "--latent-dim", "8", "--prior-flow-hidden", "4"],
     "--prior-flow-hidden 4 is invalid"),
    (["--prior", "mixture", "--prior-components", "0"], "--prior-components 0 is invalid"),
    (["--prior", "student-t", "--prior-df", "-1"], "--prior-df -1.0 is invalid"),
    (["--prior", "vamp", "--estimator", "analytic-kl"], "prior vamp does not have"),
])
def test_cli_rejects_bad_prior_settings(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--out", str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyro-vae: error:") and message in err and "\n" not in err
    assert not out.exists()  # refused before anything was written


def test_prior_options_round_trip_through_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nprior = "mixture"\nprior_components = 7\nprior_flow_depth = 3\n')
    cfg = Config.load(path).validate()
    assert (cfg.model.prior, cfg.model.prior_components, cfg.model.prior_flow_depth) == (
        "mixture", 7, 3)
    assert VAE.from_config(cfg, IMAGE_SHAPE).prior.locs.shape == (7, cfg.model.latent_dim)


# -- the docs' worked example -------------------------------------------------------------------
def docs_example() -> str:
    text = DOCS.read_text()
    block = re.search(r"<!-- worked-example:start -->\s*```python\n(.*?)```\s*"
                      r"<!-- worked-example:end -->", text, re.S)
    assert block is not None, "docs/priors.md lost its worked example markers"
    return block.group(1)


def test_docs_worked_example(mnist5k_grey, tmp_path):
    code = docs_example()
    assert len(code.strip().splitlines()) <= 25  # "about twenty lines"
    assert "laplace" not in PRIORS
    try:
        exec(compile(code, str(DOCS), "exec"), {"__name__": "docs_priors_example"})
        assert PRIORS["laplace"].__name__ == "LaplacePrior"
        check_shapes_and_log_prob("laplace")
        check_density_integrates_to_one("laplace")
        check_gradients_reach_parameters("laplace")
        check_training_and_checkpoint("laplace", mnist5k_grey, tmp_path / "run")
        check_cli_trains("laplace", tmp_path / "cli")
        cfg = prior_config("laplace")
        cfg.train.estimator = "analytic-kl"
        with pytest.raises(ConfigError, match="prior laplace does not have"):
            cfg.validate()
    finally:
        PRIORS.pop("laplace", None)


# -- the comparison script ----------------------------------------------------------------------
def test_compare_priors_script_runs_and_refuses_to_overwrite(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_priors", SCRIPTS / "compare_priors.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, figures = tmp_path / "results.md", tmp_path / "fig"
    argv = ["--priors", "standard-normal", "vamp", "--train-limit", "200", "--test-limit", "20",
            "--epochs", "1", "--hidden-dims", "16", "--latent-dim", "3", "--components", "2",
            "--num-samples", "8", "--num-particles", "2", "--out", str(out),
            "--figures", str(figures)]
    assert script.main(argv) == 0
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| standard-normal")
            or line.startswith("| vamp")]
    assert len(rows) == 2 and "+0.00" in rows[0]
    assert (figures / "prior_samples_vamp.png").stat().st_size > 0
    assert '"test_log_likelihood"' in out.with_suffix(".json").read_text()
    before = out.read_text()
    assert script.main(argv) == 2  # nothing already written is replaced
    assert out.read_text() == before
    assert script.main(["--priors", "nope", "--out", str(tmp_path / "x.md")]) == 2
