"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

_repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("ALIGNAX_DATA_DIR", os.path.join(_repo, ".pytest_cache", "tfds"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_repo, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The end-to-end files first. Under `-n 2 --dist loadfile` a file runs on one worker and files are
# handed out in collection order, so a long file collected last (they sort late) ran alone at the
# end while the other worker sat idle; started first, the other worker gets through the rest.
HEAVY_FIRST = ("test_rlhf_vs_dpo.py", "test_pipeline.py", "test_rlaif_pipeline.py", "test_members.py",
               "test_multihost.py", "test_online_rl.py", "test_kill_anywhere.py", "test_lora.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable


@pytest.fixture
def tiny_llama():
  from alignax.models import llama_style
  return llama_style(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                     max_seq_len=64)


@pytest.fixture
def tiny_gpt2():
  from alignax.models import gpt2_style
  return gpt2_style(vocab_size=300, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)


@pytest.fixture(scope="module")
def transformers():
  """The `transformers` module (torch, safetensors and tokenizers with it), or a skip."""
  from hf_helpers import require_module
  for name in ("torch", "safetensors", "tokenizers"):
    require_module(name)
  return require_module("transformers")
