"""Bring your own model: import and export Hugging Face checkpoints (safetensors only).

  cfg, params, info = import_hf("path/to/hf_dir")     # config.json + *.safetensors
  lm, _ = abstract_lm(cfg)
  logits, _ = lm.apply(params, tokens, positions, segment_ids)
  export_hf(params, cfg, "path/to/out")                # AutoModelForCausalLM.from_pretrained loads it

  alignax import-hf --src=HF_DIR --dst=WORKDIR [--dtype=bfloat16]   # an export any stage starts from

Modules: `config_map` (config.json <-> ModelConfig, the supported architectures), `tensors`
(the tensor name mapping), `safetensors_io` (reading weights), `importer`, `exporter`. The
`import-hf` command itself is `alignax.commands.import_hf`.
"""

from alignax.models.hf.config_map import (
  ARCHITECTURES,
  HFError,
  architecture_of,
  config_from_hf,
  config_to_hf,
)
from alignax.models.hf.exporter import export_hf
from alignax.models.hf.importer import import_hf
from alignax.models.hf.safetensors_io import SafetensorsReader, weight_files
from alignax.models.hf.tensors import Rule, params_from_flat, rules_for

__all__ = [
    "ARCHITECTURES", "HFError", "Rule", "SafetensorsReader", "architecture_of", "config_from_hf",
    "config_to_hf", "export_hf", "import_hf", "params_from_flat", "rules_for", "weight_files",
]
