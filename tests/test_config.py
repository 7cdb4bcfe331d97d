import pytest

from pyro_vae import Config, ConfigError
from pyro_vae.app.cli import build_parser, config_from_args


def test_toml_round_trip(tmp_path):
    cfg = Config()
    cfg.model.hidden_dims = [256, 128]
    cfg.data.binarize = "static"
    cfg.train.lr = 3e-4
    cfg.save(tmp_path / "c.toml")
    assert Config.load(tmp_path / "c.toml") == cfg


@pytest.mark.parametrize("text, needle", [
    ("[train]\nepoch = 3\n", "unknown config key train.epoch"),
    ("[trian]\nepochs = 3\n", "unknown config section [trian]"),
    ("[train]\nepochs = 'ten'\n", "train.epochs must be of type int"),
    ("[train]\nepochs = true\n", "train.epochs must be of type int"),
    ("[model]\nhidden_dims = [400, 'a']\n", "model.hidden_dims must be of type list"),
    ("[train\nepochs = 3\n", "not valid TOML"),
])
def test_bad_config_files_are_rejected(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        Config.load(path)
    assert needle in str(info.value)


@pytest.mark.parametrize("section, key, value, needle", [
    ("train", "lr", 0.0, "train.lr = 0.0 is invalid: must be > 0"),
    ("train", "batch_size", -1, "train.batch_size = -1 is invalid"),
    ("model", "latent_dim", 0, "model.latent_dim = 0 is invalid"),
    ("model", "hidden_dims", [400, 0], "model.hidden_dims"),
    ("data", "dataset", "cifar", "unknown dataset 'cifar'"),
    ("model", "likelihood", "poisson", "choose one of: bernoulli"),
    ("data", "val_fraction", 1.0, "data.val_fraction = 1.0 is invalid"),
])
def test_invalid_values_name_the_problem(section, key, value, needle):
    cfg = Config()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert needle in str(info.value)


def test_incompatible_combination_is_rejected():
    cfg = Config()
    cfg.model.likelihood = "continuous-bernoulli"  # needs grey levels, default binarizes
    with pytest.raises(ConfigError, match=r"data.binarize=\"none\""):
        cfg.validate()


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepochs = 7\nlr = 0.01\n[model]\nlatent_dim = 5\n")
    args = build_parser().parse_args(
        ["train", "--out", str(tmp_path / "run"), "--config", str(path), "--lr", "0.002",
         "--hidden-dims", "32", "16", "--no-progress"])
    cfg = config_from_args(args)
    assert cfg.train.epochs == 7           # from the file
    assert cfg.train.lr == 0.002           # flag beats file
    assert cfg.model.latent_dim == 5
    assert cfg.model.hidden_dims == [32, 16]
    assert cfg.train.progress is False
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default
