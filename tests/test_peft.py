"""PEFT LoRA adapters out of and into alignax: logits match `peft.PeftModel` both ways, the CLI
paths (`export-hf --lora=peft`, `import-hf --adapter`), and the refusals.

Tiny random `transformers` models, no network; skipped without torch / transformers / peft.
"""

import json
import os
import shutil
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hf_helpers import alignax_logits, hf_logits, make_hf_model, rel_error  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft(transformers):
  return pytest.importorskip("peft")


def _random_adapters(params, lora_cfg, seed=0):
  """alignax adapters for `params` (a pure dict of jnp arrays): PEFT's A init, and a random B
  (a fresh B is zero, which would make every parity check trivially pass)."""
  from alignax.models import lora
  adapters = lora.init_adapters(params, lora_cfg, jax.random.key(seed))
  rng = np.random.RandomState(seed + 1)
  out = {"blocks": {}}
  for group, names in adapters["blocks"].items():
    for name, ab in names.items():
      a = np.asarray(lora._value(ab["a"]))
      b = 0.2 * rng.standard_normal(np.shape(lora._value(ab["b"]))).astype(np.float32)
      out["blocks"].setdefault(group, {})[name] = {"a": a, "b": b}
  return out


def _lora_logits(cfg, params, adapters, lora_cfg):
  """alignax's logits with the adapters beside the frozen weights (`LoraParams`)."""
  from alignax.models.lora import LoraParams
  as_jnp = jax.tree.map(jnp.asarray, adapters)
  return alignax_logits(cfg, LoraParams(params, as_jnp, None, lora_cfg.scale, 0.0))


def _randomize_lora_b(peft_model, seed=0):
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name,targets", [("llama", "all-linear"), ("qwen2", "wq,wv,wo,w_out"),
                                          ("gemma2", "all-linear")])
def test_alignax_adapters_load_in_peft(transformers, peft, name, targets, tmp_path):
  """write_peft_adapter -> PeftModel.from_pretrained gives alignax's LoRA logits; the merged
  params give them too, and read_peft_adapter reads back exactly what was written."""
  from flax import nnx

  from alignax.models.hf import import_hf
  from alignax.models import lora
  from alignax.models.hf.peft import merge_peft_into, read_peft_adapter, write_peft_adapter
  from alignax.models.lora import LoraConfig
  model = make_hf_model(transformers, name, tmp_path / "hf")
  cfg, params, _ = import_hf(str(tmp_path / "hf"))
  lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=targets)
  adapters = _random_adapters(params, lora_cfg)
  ours = _lora_logits(cfg, params, adapters, lora_cfg)
  assert rel_error(ours, hf_logits(model)) > 1e-2  # the adapters matter

  write_peft_adapter(str(tmp_path / "adapter"), adapters, lora_cfg, cfg, str(tmp_path / "hf"))
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    written = json.load(f)
  assert written["peft_type"] == "LORA" and written["r"] == 4 and written["lora_alpha"] == 8
  assert written["target_modules"] == lora.names(lora_cfg.target_names())
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
  assert rel_error(ours, hf_logits(peft_model)) <= 1e-4

  merged = merge_peft_into(nnx.to_pure_dict(params), adapters, lora_cfg)
  state = jax.tree.map(lambda x: x, params)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, merged))
  assert rel_error(alignax_logits(cfg, state), ours) <= 1e-4

  back, back_cfg = read_peft_adapter(str(tmp_path / "adapter"), cfg)
  assert (back_cfg.rank, back_cfg.alpha, back_cfg.target_names()) == (4, 8.0, lora_cfg.target_names())
  for group, names in adapters["blocks"].items():
    for n, ab in names.items():
      for k in ("a", "b"):
        np.testing.assert_array_equal(back["blocks"][group][n][k], ab[k])


@pytest.mark.parametrize("name,targets", [("llama", ALL_LINEAR), ("qwen2", "all-linear"),
                                          ("gemma3", ALL_LINEAR)])
def test_peft_adapters_read_and_import(transformers, peft, name, targets, tmp_path, capsys):
  """A PEFT adapter (random lora_B) read by read_peft_adapter, and merged by
  `alignax import-hf --adapter`, gives the PeftModel's logits."""
  from alignax.checkpoint import export_model_config, load_export, read_export_meta
  from alignax.commands.import_hf import main as import_hf_main
  from alignax.models import abstract_lm
  from alignax.models.hf import import_hf
  from alignax.models.hf.peft import read_peft_adapter
  model = make_hf_model(transformers, name, tmp_path / "hf")
  base_ref = hf_logits(model)
  peft_model = peft.get_peft_model(model, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
  _randomize_lora_b(peft_model)
  peft_model.eval()
  ref = hf_logits(peft_model)
  assert rel_error(ref, base_ref) > 1e-2
  peft_model.save_pretrained(str(tmp_path / "adapter"))

  cfg, params, _ = import_hf(str(tmp_path / "hf"))
  adapters, lora_cfg = read_peft_adapter(str(tmp_path / "adapter"), cfg)
  assert (lora_cfg.rank, lora_cfg.alpha, lora_cfg.scale) == (4, 8.0, 2.0)
  assert lora_cfg.target_names() == ("wq", "wk", "wv", "wo", "w_gate", "w_in", "w_out")
  assert rel_error(_lora_logits(cfg, params, adapters, lora_cfg), ref) <= 1e-4

  dst = tmp_path / "run"
  import_hf_main(types.SimpleNamespace(src=str(tmp_path / "hf"), dst=str(dst), dtype="float32",
                                       adapter=str(tmp_path / "adapter")))
  assert "merged (LoRA r=4, alpha=8" in capsys.readouterr().out
  cfg2 = export_model_config(str(dst))
  merged, meta = load_export(str(dst), abstract_lm(cfg2)[1])
  assert meta["extra"]["adapter"]["path"] == str(tmp_path / "adapter")
  assert meta["extra"]["adapter"]["rank"] == 4
  assert rel_error(alignax_logits(cfg2, merged), ref) <= 1e-4

  # bf16 storage: merged in float32 from the checkpoint's values, rounded once.
  cfg16, merged16, info = import_hf(str(tmp_path / "hf"), "bfloat16", adapter=str(tmp_path / "adapter"))
  w32 = np.asarray(merged["blocks"]["attn"]["wq"].get_value())
  w16 = np.asarray(merged16["blocks"]["attn"]["wq"].get_value())
  assert w16.dtype == jnp.bfloat16 and info["adapter"]["targets"] == lora_cfg.targets
  np.testing.assert_array_equal(w16, w32.astype(jnp.bfloat16))
  assert read_export_meta(str(dst))["stage"] == "import"


def _export_lora_run(tmp_path, lora_cfg, adapters, *, chat_template="model"):
  """A LoRA SFT run on the import in tmp_path/imported, as training writes it: its export (merged
  params + export/lora/) and config.json naming init.workdir."""
  import ml_collections

  from alignax.checkpoint import export_model_config, load_export, read_export_meta, save_export
  from alignax.config import save_config
  from alignax.models import abstract_lm
  from alignax.models.lora import LoraParams
  imported = str(tmp_path / "imported")
  cfg = export_model_config(imported)
  params, _ = load_export(imported, abstract_lm(cfg)[1])
  run = str(tmp_path / "sft")
  lp = LoraParams(params, jax.tree.map(jnp.asarray, adapters), None, lora_cfg.scale, lora_cfg.dropout)
  save_export(run, lp, model=cfg, stage="sft", tokenizer=read_export_meta(imported)["tokenizer"],
              chat_template=chat_template)
  save_config(ml_collections.ConfigDict(dict(stage="sft", init=dict(workdir=imported))), run)
  return run, cfg, params


def _export_flags(workdir, out, lora):
  return types.SimpleNamespace(workdir=str(workdir), out=str(out), dtype="", architecture="",
                               max_shard_size="0", lora=lora)


def test_export_hf_lora_peft_command(transformers, peft, tmp_path, capsys):
  """`export-hf --lora=peft` writes the run's adapters for the HF base it was imported from;
  `--lora=merge` writes the merged model; a run without adapters is refused."""
  from alignax.checkpoint import export_model_config, load_export
  from alignax.commands.export_hf import main as export_hf_main
  from alignax.commands.import_hf import main as import_hf_main
  from alignax.models import abstract_lm
  from alignax.models.hf import HFError
  from alignax.models.lora import LoraConfig
  from alignax.run_models import load_policy
  make_hf_model(transformers, "llama", tmp_path / "hf")
  import_hf_main(types.SimpleNamespace(src=str(tmp_path / "hf"), dst=str(tmp_path / "imported"),
                                       dtype="float32"))
  lora_cfg = LoraConfig(rank=4, alpha=16.0, targets="attention,w_in")
  cfg = export_model_config(str(tmp_path / "imported"))
  params, _ = load_export(str(tmp_path / "imported"), abstract_lm(cfg)[1])
  adapters = _random_adapters(params, lora_cfg, seed=3)
  run, cfg, params = _export_lora_run(tmp_path, lora_cfg, adapters)
  lm, merged, _, _ = load_policy(run)
  ours = alignax_logits(lm.config, merged)
  assert rel_error(ours, _lora_logits(cfg, params, adapters, lora_cfg)) <= 1e-4

  export_hf_main(_export_flags(run, tmp_path / "adapter", "peft"))
  out = capsys.readouterr().out
  assert "as a PEFT adapter" in out and "tokenizer: none written" in out
  assert not (tmp_path / "adapter" / "config.json").exists()
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["base_model_name_or_path"] == str(tmp_path / "hf")
  base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  assert rel_error(hf_logits(peft_model), ours) <= 1e-4

  export_hf_main(_export_flags(run, tmp_path / "merged", "merge"))
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert rel_error(hf_logits(again), ours) <= 1e-4

  with pytest.raises(HFError, match=r"the export has no LoRA adapters .*model.lora.rank > 0"):
    export_hf_main(_export_flags(tmp_path / "imported", tmp_path / "x", "peft"))
  with pytest.raises(HFError, match=r"--lora='both': expected one of merge, peft"):
    export_hf_main(_export_flags(run, tmp_path / "y", "both"))
  with pytest.raises(HFError, match="already holds an adapter"):
    export_hf_main(_export_flags(run, tmp_path / "adapter", "peft"))


def test_export_hf_lora_peft_refuses_markers_the_base_lacks(transformers, peft, tmp_path):
  """A run trained on chat markers alignax's import added: the adapter cannot carry their
  embedding rows, so --lora=peft says so (the merged export still works)."""
  from test_hf import make_tokenizer_dir

  from alignax.commands.export_hf import main as export_hf_main
  from alignax.commands.import_hf import main as import_hf_main
  from alignax.checkpoint import export_model_config, load_export
  from alignax.models import abstract_lm
  from alignax.models.hf import HFError
  from alignax.models.lora import LoraConfig
  make_hf_model(transformers, "llama", tmp_path / "hf")
  make_tokenizer_dir(tmp_path / "hf", ("<s>", "</s>"))
  import_hf_main(types.SimpleNamespace(src=str(tmp_path / "hf"), dst=str(tmp_path / "imported"),
                                       dtype="float32"))
  lora_cfg = LoraConfig(rank=2, alpha=4.0)
  cfg = export_model_config(str(tmp_path / "imported"))
  params, _ = load_export(str(tmp_path / "imported"), abstract_lm(cfg)[1])
  run, _, _ = _export_lora_run(tmp_path, lora_cfg, _random_adapters(params, lora_cfg),
                               chat_template="markers")
  with pytest.raises(HFError, match=r"trained on alignax's chat markers.*--lora=merge"):
    export_hf_main(_export_flags(run, tmp_path / "adapter", "peft"))
  assert not (tmp_path / "adapter").exists()
  export_hf_main(_export_flags(run, tmp_path / "merged", "merge"))


def _edit_json(path, **changes):
  with open(path) as f:
    data = json.load(f)
  data.update(changes)
  with open(path, "w") as f:
    json.dump(data, f)


def test_read_peft_adapter_refusals(transformers, peft, tmp_path):
  """Each variant alignax cannot reproduce exactly is refused, naming the file and field."""
  from safetensors.numpy import load_file, save_file

  from alignax.commands.import_hf import main as import_hf_main
  from alignax.models import gpt2_style
  from alignax.models.hf import HFError, import_hf
  from alignax.models.hf.peft import read_peft_adapter, write_peft_adapter
  from alignax.models.lora import LoraConfig
  make_hf_model(transformers, "llama", tmp_path / "hf")
  cfg, params, _ = import_hf(str(tmp_path / "hf"))
  lora_cfg = LoraConfig(rank=4, alpha=8.0, targets="wq,wv")
  good = str(tmp_path / "good")
  write_peft_adapter(good, _random_adapters(params, lora_cfg), lora_cfg, cfg)

  def case(**changes):
    bad = tmp_path / "bad"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(good, bad)
    _edit_json(bad / "adapter_config.json", **changes)
    return str(bad)

  with pytest.raises(HFError, match=r"bad/adapter_config\.json: peft_type 'LOHA' is unsupported"):
    read_peft_adapter(case(peft_type="LOHA"), cfg)
  for changes, message in [
      (dict(task_type="SEQ_CLS"), "task_type 'SEQ_CLS' is unsupported"),
      (dict(use_rslora=True), "use_rslora=True is unsupported"),
      (dict(use_dora=True), "use_dora=True is unsupported"),
      (dict(fan_in_fan_out=True), "fan_in_fan_out=True is unsupported"),
      (dict(bias="all"), "bias='all' is unsupported"),
      (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] is unsupported"),
      (dict(rank_pattern={"q_proj": 8}), "rank_pattern=.* is unsupported"),
      (dict(alpha_pattern={"q_proj": 2}), "alpha_pattern=.* is unsupported"),
      (dict(layers_to_transform=[0]), "layers_to_transform=.* is unsupported"),
      (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' rewrote the base weights"),
      (dict(target_modules=["q_proj", "c_attn"]), r"target_modules \['c_attn'\] have no alignax adapter"),
      (dict(target_modules=["q_proj"]), r"adapters for \['v_proj'\], which target_modules"),
      (dict(target_modules=["q_proj", "v_proj", "k_proj"]),
       r"k_proj\.lora_A\.weight is missing"),
  ]:
    with pytest.raises(HFError, match=message):
      read_peft_adapter(case(**changes), cfg)

  # Shapes that do not fit the model, missing and unexpected tensors.
  with pytest.raises(HFError, match=r"has shape \(4, 64\), but r=8 on this model needs \(8, 64\)"):
    read_peft_adapter(case(r=8), cfg)
  weights = tmp_path / "bad" / "adapter_model.safetensors"
  for edit, message in [
      (lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
       r"layers\.1\.self_attn\.v_proj\.lora_B\.weight is missing"),
      (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)}),
       r"'base_model\.model\.lm_head\.lora_A\.weight' has no place"),
      (lambda t: t.update({"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight":
                           np.zeros((4, 64), np.float32)}), "is for layer 7, but the model has 2"),
  ]:
    case()
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights))
    with pytest.raises(HFError, match=message):
      read_peft_adapter(str(tmp_path / "bad"), cfg)
  os.rename(weights, tmp_path / "bad" / "adapter_model.bin")
  with pytest.raises(HFError, match="only the pickle adapter_model.bin"):
    read_peft_adapter(str(tmp_path / "bad"), cfg)
  with pytest.raises(HFError, match="not a PEFT adapter directory"):
    read_peft_adapter(str(tmp_path / "hf"), cfg)
  gpt2 = gpt2_style(vocab_size=300, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)
  with pytest.raises(HFError, match="Llama-family and Gemma models only"):
    read_peft_adapter(good, gpt2)

  # import-hf refuses a bad adapter before writing anything.
  with pytest.raises(HFError, match="use_dora=True is unsupported"):
    import_hf_main(types.SimpleNamespace(src=str(tmp_path / "hf"), dst=str(tmp_path / "run"),
                                         dtype="float32", adapter=case(use_dora=True)))
  assert not (tmp_path / "run").exists()
  with pytest.raises(HFError, match="--adapter=.*: not a directory"):
    import_hf_main(types.SimpleNamespace(src=str(tmp_path / "hf"), dst=str(tmp_path / "run"),
                                         dtype="float32", adapter=str(tmp_path / "nowhere")))
