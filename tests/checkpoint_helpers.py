"""Typed arguments of the checkpoint layer from a test's ConfigDict (as the runner builds them)."""

from alignax import checkpoint as ckpt_lib
from alignax.checkpoint.config import CheckpointConfig
from alignax.train.config import TrainConfig


def ckpt_args(cfg) -> tuple:
  """(CheckpointConfig, the config as a plain dict): `Checkpointer`'s two config arguments."""
  return CheckpointConfig.from_mapping(cfg.checkpoint), cfg.to_dict()


def check_resume(workdir: str, cfg) -> None:
  ckpt_lib.check_resume(workdir, cfg.to_dict(), TrainConfig.from_mapping(cfg.train))
