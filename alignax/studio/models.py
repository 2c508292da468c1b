"""The studio's models: named run directories, loaded once, answering prompts with the compiled
sampler, every answer scored by the world's gold labeler (with its rubric components)."""

from __future__ import annotations

import dataclasses
import os
import threading

import jax
import numpy as np

from alignax import checkpoint as ckpt_lib
from alignax.tasks import evaluation
from alignax.generation import Sampler, SamplingConfig
from alignax.run_models import RAW_STAGES, chat_template_of, load_policy
from alignax.tasks import world_facts, world_gold


class StudioError(ValueError):
  """Bad input the page (or the command line) shows as one message."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to sample: greedy (temperature 0) by default; `num_samples` answers per model."""

  temperature: float = 0.0
  top_p: float = 1.0
  max_new_tokens: int = 64
  seed: int = 0
  num_samples: int = 1

  @classmethod
  def from_mapping(cls, values) -> "Settings":
    """Validated settings from request values (strings or numbers); StudioError names the field."""
    out = {}
    for f in dataclasses.fields(cls):
      value = values.get(f.name)
      if value in ("", None):
        continue
      try:
        out[f.name] = int(value) if f.type == "int" else float(value)
      except (TypeError, ValueError):
        raise StudioError(f"{f.name}: {value!r} is not a number") from None
    s = cls(**out)
    if not 0 <= s.temperature <= 5:
      raise StudioError(f"temperature: must be in [0, 5], got {s.temperature}")
    if not 0 < s.top_p <= 1:
      raise StudioError(f"top_p: must be in (0, 1], got {s.top_p}")
    if not 1 <= s.max_new_tokens <= 512:
      raise StudioError(f"max_new_tokens: must be in [1, 512], got {s.max_new_tokens}")
    if not 1 <= s.num_samples <= 8:
      raise StudioError(f"num_samples: must be in [1, 8], got {s.num_samples}")
    return s

  def sampling(self) -> SamplingConfig:
    return SamplingConfig(temperature=self.temperature, top_p=self.top_p if self.temperature > 0 else 1.0,
                          max_new_tokens=self.max_new_tokens)


@dataclasses.dataclass
class LoadedModel:
  name: str
  workdir: str
  stage: str
  lm: object
  params: object
  tokenizer: object
  fmt: str  # "chat" or "raw"
  template: str


def discover_models(workdir: str) -> dict[str, str]:
  """{name: run dir} of the policies a pipeline directory holds (the registry's policy stages
  with an export, named as in the report: base, sft, ppo, ...)."""
  from alignax.algorithms.registry import policies
  found = {}
  for record in policies():
    path = os.path.join(workdir, record.name)
    if ckpt_lib.has_export(path):
      found[record.display_name] = path
  return found


def _tokenizer(spec: str, workdir: str):
  """The tokenizer an export names; a world BPE is the one trained on the run's own world."""
  from alignax.config import read_config, world_config, world_section
  from alignax.data.sources import resolve_tokenizer
  try:
    world = read_config(workdir).world
  except Exception:  # no config.json (an imported run): the default world
    world = world_section()
  return resolve_tokenizer(spec, world=world_config(world))


def gold(prompt: str, text: str, ended: bool) -> dict:
  """The gold labeler's score and rubric components of one answer."""
  breakdown = world_gold.gold_breakdown(prompt, text, ended)
  return {"score": float(breakdown["score"]),
          "components": {k: float(breakdown[k]) for k in world_gold.COMPONENTS if breakdown[k] != 0.0}}


class ModelHub:
  """Named models, loaded on first use; `answer` samples them (one compile per shape)."""

  def __init__(self, workdirs: dict[str, str]):
    if not workdirs:
      raise StudioError("no models: the workdir has no finished exports (run `alignax pipeline` "
                        "first) and no --model=NAME=WORKDIR was given")
    for name, path in workdirs.items():
      if not os.path.isdir(path):
        raise StudioError(f"--model {name}: {path} is not a directory")
    self.workdirs = dict(workdirs)
    self._models: dict[str, LoadedModel] = {}
    self._errors: dict[str, str] = {}
    self._samplers: dict = {}
    self._tokenizers: dict = {}
    self._lock = threading.Lock()  # one request samples at a time (the cores are shared anyway)

  @property
  def names(self) -> list[str]:
    return list(self.workdirs)

  def load(self, name: str) -> LoadedModel:
    if name not in self.workdirs:
      raise StudioError(f"unknown model {name!r}; models: {', '.join(self.workdirs)}")
    if name in self._errors:
      raise StudioError(self._errors[name])
    if name not in self._models:
      path = self.workdirs[name]
      try:
        lm, params, stage, spec = load_policy(path)
        if spec not in self._tokenizers:
          self._tokenizers[spec] = _tokenizer(spec, path)
        self._models[name] = LoadedModel(name=name, workdir=path, stage=stage, lm=lm, params=params,
                                         tokenizer=self._tokenizers[spec],
                                         fmt="raw" if stage in RAW_STAGES else "chat",
                                         template=chat_template_of(path))
      except Exception as e:  # a run that cannot be loaded is reported, not a stack trace
        self._errors[name] = f"model {name} ({path}) cannot be loaded: {type(e).__name__}: {e}"
        raise StudioError(self._errors[name]) from None
    return self._models[name]

  def describe(self) -> list[dict]:
    out = []
    for name, path in self.workdirs.items():
      try:
        m = self.load(name)
        out.append({"name": name, "workdir": path, "stage": m.stage, "format": m.fmt, "error": None})
      except StudioError as e:
        out.append({"name": name, "workdir": path, "stage": None, "format": None, "error": str(e)})
    return out

  def _sampler(self, m: LoadedModel, settings: Settings) -> Sampler:
    key = (m.lm, id(m.tokenizer), settings.sampling())
    if key not in self._samplers:
      self._samplers[key] = Sampler(m.lm, m.tokenizer, settings.sampling())
    return self._samplers[key]

  def answer(self, name: str, prompt: str, settings: Settings, seed_offset: int = 0) -> list[dict]:
    """`settings.num_samples` answers of model `name` to `prompt`: text, ended (emitted <eos>),
    tokens, gold score and components."""
    prompt = (prompt or "").strip()
    if not prompt:
      raise StudioError("the prompt is empty")
    m = self.load(name)
    sampler = self._sampler(m, settings)
    key = jax.random.fold_in(jax.random.key(settings.seed), seed_offset)
    n = settings.num_samples
    with self._lock:
      try:
        samples = evaluation.sample_prompts(sampler, m.params, [prompt] * n, key, fmt=m.fmt,
                                            batch_size=n, template=m.template)
      except ValueError as e:  # e.g. a prompt longer than the model's context
        raise StudioError(f"{name}: {e}") from None
    out = []
    for i in range(n):
      text, ended = samples.texts[i], bool(samples.ended[i])
      out.append({"text": text, "ended": ended, "tokens": int(np.asarray(samples.lengths)[i]),
                  **gold(prompt, text, ended)})
    return out


def world_prompts(workdir: str | None) -> list[dict]:
  """The world's eval prompts ({"prompt", "kind"}), from the pipeline's world config when there is
  one (else the default world)."""
  from alignax.config import read_config, world_config, world_section
  from alignax.tasks.world import build_world
  section = world_section()
  if workdir:
    try:
      section = read_config(workdir).world
    except Exception:  # not a pipeline directory: the default world
      pass
  records = build_world(world_config(section)).prompt_records("eval")
  return [{"prompt": r["prompt"], "kind": world_facts.answer_key(r["prompt"]).kind} for r in records
          if isinstance(r["prompt"], str)]
