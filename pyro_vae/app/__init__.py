"""The app layer: the ``pyro-vae`` command, the run-level commands and the figures. The only
layer that prints or writes files other than the trainer's own run folder."""
