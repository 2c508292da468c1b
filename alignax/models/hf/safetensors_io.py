"""Reading Hugging Face weights: safetensors only.

Weights are read with `safetensors` (numpy), never with pickle: a directory holding only
`pytorch_model.bin` is refused. Sharded checkpoints (`model.safetensors.index.json`) and bf16
tensors (as `ml_dtypes.bfloat16`) are read directly.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Sequence

import numpy as np

from alignax.models.hf.config_map import HFError, _read_json


def weight_files(src_dir: str) -> list[str]:
  """The safetensors files of a checkpoint directory; HFError for pickle-only or empty ones."""
  index = os.path.join(src_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map") or {}
    root = os.path.realpath(src_dir)
    for name in sorted(set(weight_map.values())):
      path = os.path.realpath(os.path.join(src_dir, str(name)))
      if os.path.commonpath([root, path]) != root or not str(name).endswith(".safetensors"):
        raise HFError(f"{index}: weight_map names {name!r}, which is not a .safetensors file inside "
                      f"{src_dir}; refusing to read it")
    files = sorted({os.path.join(src_dir, name) for name in weight_map.values()})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise HFError(f"{index} names {os.path.basename(missing[0])}, which is missing")
    return files
  single = os.path.join(src_dir, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  files = sorted(glob.glob(os.path.join(src_dir, "*.safetensors")))
  if files:
    return files
  pickled = sorted(os.path.basename(p) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                   for p in glob.glob(os.path.join(src_dir, pattern)))
  if pickled:
    raise HFError(f"{src_dir} has only pickle weights ({', '.join(pickled)}): safetensors are "
                  f"required (alignax never unpickles files, which can run arbitrary code). Convert "
                  f"with transformers: AutoModelForCausalLM.from_pretrained(dir)"
                  f".save_pretrained(out, safe_serialization=True)")
  raise HFError(f"{src_dir} has no *.safetensors weights")


def _safetensors():
  try:
    import safetensors
    import safetensors.numpy  # noqa: F401  (export's save_file)
  except ImportError:
    raise HFError("Hugging Face checkpoints need the `safetensors` package "
                  "(pip install safetensors)") from None
  return safetensors


class SafetensorsReader:
  """Name -> array over one or more safetensors files, read lazily with `safetensors` (numpy)."""

  def __init__(self, files: Sequence[str]):
    self._open = _safetensors().safe_open
    self.files = list(files)
    self._stack = contextlib.ExitStack()
    self._handles = []
    self._where: dict[str, int] = {}
    for n, file in enumerate(self.files):
      try:
        handle = self._stack.enter_context(self._open(file, framework="numpy"))
      except Exception as e:  # safetensors raises its own error types for damaged headers
        self.close()
        raise HFError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
      self._handles.append(handle)
      for name in handle.keys():
        self._where[name] = n

  def close(self) -> None:
    self._stack.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False

  def names(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def nbytes(self) -> int:
    """Bytes of tensor data the files declare (from their headers)."""
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2}
    return sum(int(np.prod(self.shape(n), dtype=np.int64)) * sizes.get(self.dtype(n), 1)
               for n in self._where)

  def dtype(self, name: str) -> str:
    return self._handles[self._where[name]].get_slice(name).get_dtype()  # "F32", "BF16", ...

  def get(self, name: str) -> np.ndarray:
    n = self._where[name]
    try:
      return self._handles[n].get_tensor(name)
    except (TypeError, ValueError):
      # Older safetensors cannot build bf16 numpy arrays; read through jax instead.
      with self._open(self.files[n], framework="flax") as f:
        return np.asarray(f.get_tensor(name))
