"""`alignax sample --workdir=DIR --prompt="..."`: completions from any stage's run directory.

Prompts use the chat template, except for pretraining and imported runs, which read plain text
(`--format` overrides).
"""

from __future__ import annotations

import jax

from alignax.config import read_config, world_config
from alignax.data.config import DataConfig
from alignax.run_models import RAW_STAGES, chat_template_of, load_policy


def main(flags) -> None:
  """Prints completions of `--prompt`s by the run in `--workdir` (see `alignax.run_models`)."""
  from alignax.data.sources import resolve_tokenizer
  from alignax.tasks.evaluation import sample_prompts
  from alignax.generation import Sampler, SamplingConfig
  lm, params, stage, tokenizer_spec = load_policy(flags.workdir)
  try:
    cfg = read_config(flags.workdir)
  except Exception:  # an imported run has no config.json: the export's tokenizer is enough
    from alignax.config import base_config
    cfg = base_config(stage)
  world = world_config(cfg.world) if "world" in cfg else None
  tok = resolve_tokenizer(tokenizer_spec, DataConfig.from_mapping(cfg.data), world)
  fmt = flags.format if flags.format != "auto" else ("raw" if stage in RAW_STAGES else "chat")
  prompts = list(flags.prompt) or ["What is the capital of France?"]
  sampler = Sampler(lm, tok, SamplingConfig(temperature=flags.temperature, top_k=flags.top_k,
                                            top_p=flags.top_p, max_new_tokens=flags.max_new_tokens))
  key = jax.random.key(flags.seed)
  repeated = [p for p in prompts for _ in range(flags.num_samples)]
  out = sample_prompts(sampler, params, repeated, key, fmt=fmt, batch_size=len(repeated),
                       template=chat_template_of(flags.workdir))
  print(f"# {flags.workdir} ({stage}, {fmt} prompts, temperature {flags.temperature})")
  for prompt, text, ended in zip(repeated, out.texts, out.ended):
    print(f"> {prompt}\n{text}{'' if ended else ' [no <eos>]'}\n")
