"""Bring your own model: Hugging Face import/export (logits match transformers), errors, HFTokenizer.

Tiny random `transformers` models are built from configs, saved with safetensors and imported;
no network. Tests that need torch/transformers skip when those are not installed; the
tokenizer tests need only `tokenizers`.
"""

import json
import os
import shutil
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from alignax.checkpoint import CheckpointError  # noqa: E402
from alignax.data.schemas import DataError  # noqa: E402
from hf_helpers import (TOKENS, V, alignax_logits, hf_logits, make_hf_model,  # noqa: E402
                        rel_error, require_module)

# The architectures as alignax had them first; test_hf_architectures.py has the newer ones.
BASIC = ("gpt2", "gpt2_untied", "llama", "llama_tied", "qwen2", "qwen2_untied", "mistral")


def _rewrite(path, edit):
  """Applies `edit(dict name -> array)` to a safetensors file in place."""
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Import and export match transformers


@pytest.mark.parametrize("name", BASIC)
def test_import_and_export_match_transformers(transformers, name, tmp_path):
  from alignax.models.hf import export_hf, import_hf
  model = make_hf_model(transformers, name, tmp_path / "hf")
  ref = hf_logits(model)
  cfg, params, info = import_hf(str(tmp_path / "hf"))
  assert info["architecture"] == model.config.architectures[0]
  assert info["num_params"] == sum(p.numel() for p in model.parameters()) == cfg.num_params()
  assert cfg.tie_embeddings == model.config.tie_word_embeddings
  assert rel_error(alignax_logits(cfg, params), ref) <= 1e-4

  export_hf(params, cfg, str(tmp_path / "out"))
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  expected_arch = {"gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}.get(
      model.config.model_type, "LlamaForCausalLM")
  assert type(again).__name__ == expected_arch
  assert rel_error(hf_logits(again), ref) <= 1e-4


def test_export_to_a_named_architecture(transformers, tmp_path):
  """Llama params exported as Mistral, and as Qwen2 (zero q/k/v biases), give the same logits."""
  from alignax.models.hf import HFError, export_hf, import_hf
  ref = hf_logits(make_hf_model(transformers, "llama", tmp_path / "hf"))
  cfg, params, _ = import_hf(str(tmp_path / "hf"))
  for arch in ("MistralForCausalLM", "Qwen2ForCausalLM"):
    export_hf(params, cfg, str(tmp_path / arch), architecture=arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / arch))
    assert type(model).__name__ == arch
    assert rel_error(hf_logits(model.eval()), ref) <= 1e-4
  with pytest.raises(HFError, match="cannot export.*GPT2LMHeadModel"):
    export_hf(params, cfg, str(tmp_path / "bad"), architecture="GPT2LMHeadModel")
  with pytest.raises(HFError, match="supported: GPT2LMHeadModel"):
    export_hf(params, cfg, str(tmp_path / "bad"), architecture="GemmaForCausalLM")


def test_sharded_bf16_checkpoint(transformers, tmp_path):
  """A bf16 checkpoint in several shards (model.safetensors.index.json) imports exactly."""
  import torch
  from alignax.models.hf import export_hf, import_hf
  model = make_hf_model(transformers, "qwen2_untied", tmp_path / "fp32")
  model.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
  assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 1
  # transformers' float32 forward of the same bf16 weights is the reference.
  ref = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "hf"), dtype=torch.float32).eval())
  cfg, params, info = import_hf(str(tmp_path / "hf"))
  assert info["source_dtypes"] == ["BF16"] and params["embed"][...].dtype == jnp.float32
  assert rel_error(alignax_logits(cfg, params), ref) <= 1e-4

  cfg16, params16, info16 = import_hf(str(tmp_path / "hf"), "auto")
  assert info16["dtype"] == cfg16.param_dtype == "bfloat16"
  assert params16["embed"][...].dtype == jnp.bfloat16
  export_hf(params16, cfg16, str(tmp_path / "out"))
  with open(tmp_path / "out" / "model.safetensors", "rb") as f:
    assert b'"BF16"' in f.read(4096)
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
  assert rel_error(hf_logits(again.eval()), ref) <= 1e-6  # the bf16 weights made the round trip unchanged


def test_original_gpt2_names_and_buffers(transformers, tmp_path):
  """The original GPT-2 checkpoints have no "transformer." prefix and carry attn.bias buffers."""
  from alignax.models.hf import import_hf
  ref = hf_logits(make_hf_model(transformers, "gpt2", tmp_path))

  def legacy(tensors):
    for key in list(tensors):
      tensors[key[len("transformer."):]] = tensors.pop(key)
    for i in range(2):
      tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  _rewrite(tmp_path / "model.safetensors", legacy)
  cfg, params, info = import_hf(str(tmp_path))
  assert info["ignored_tensors"] == ["h.0.attn.bias", "h.1.attn.bias"]
  assert rel_error(alignax_logits(cfg, params), ref) <= 1e-4


def test_grow_vocab_and_shorter_positions(transformers, tmp_path):
  """pad_vocab_to adds mean rows (old logits unchanged); max_seq_len trims GPT-2's table."""
  from alignax.models.hf import import_hf
  make_hf_model(transformers, "gpt2_untied", tmp_path)
  cfg, params, _ = import_hf(str(tmp_path), pad_vocab_to=V + 4, mean_init_ids=[7], max_seq_len=32)
  assert cfg.vocab_size == V + 4 and cfg.max_seq_len == 32
  embed, head = np.asarray(params["embed"][...]), np.asarray(params["lm_head"][...])
  assert embed.shape == (V + 4, 64) and head.shape == (64, V + 4)
  base_cfg, base, _ = import_hf(str(tmp_path))
  mean = np.asarray(base["embed"][...]).mean(0)
  np.testing.assert_allclose(embed[V:], np.broadcast_to(mean, (4, 64)), rtol=1e-6)
  np.testing.assert_allclose(embed[7], mean, rtol=1e-6)
  np.testing.assert_allclose(head[:, V + 1], np.asarray(base["lm_head"][...]).mean(1), rtol=1e-6)
  tokens = np.where(TOKENS == 7, 8, TOKENS)  # row 7 was reset, so keep it out of the input
  logits = alignax_logits(cfg, params, tokens)
  # Column 7 of the (untied) head was reset too; every other original column is unchanged.
  keep = np.array([i for i in range(V) if i != 7])
  assert rel_error(logits[..., keep], alignax_logits(base_cfg, base, tokens)[..., keep]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Clear errors


def _edit_config(path, **changes):
  file = os.path.join(path, "config.json")
  with open(file) as f:
    config = json.load(f)
  config.update(changes)
  with open(file, "w") as f:
    json.dump(config, f)


def test_config_errors(transformers, tmp_path):
  from alignax.models.hf import HFError, import_hf
  make_hf_model(transformers, "mistral", tmp_path, sliding_window=16)
  assert import_hf(str(tmp_path))[0].sliding_window == 16
  cfg, _, _ = import_hf(str(tmp_path), max_seq_len=16)  # the window covers every position
  assert cfg.max_seq_len == 16 and cfg.sliding_window == 0

  _edit_config(tmp_path, architectures=["BertForMaskedLM"])
  with pytest.raises(HFError, match=r"unsupported architecture 'BertForMaskedLM'.*supported: "
                                    r"GPT2LMHeadModel \(gpt2\), LlamaForCausalLM"):
    import_hf(str(tmp_path))
  _edit_config(tmp_path, architectures=None, model_type="falcon")
  with pytest.raises(HFError, match="unsupported model_type 'falcon'.*MistralForCausalLM"):
    import_hf(str(tmp_path))
  _edit_config(tmp_path, architectures=["MistralForCausalLM"], sliding_window=None,
               rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 8.0})
  with pytest.raises(HFError, match="RoPE scaling 'longrope' is unsupported"):
    import_hf(str(tmp_path))
  _edit_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, hidden_act="gelu")
  with pytest.raises(HFError, match="hidden_act 'gelu' is unsupported"):
    import_hf(str(tmp_path))
  with pytest.raises(HFError, match="dtype must be one of"):
    import_hf(str(tmp_path), "float64")
  with pytest.raises(HFError, match="config.json not found"):
    import_hf(str(tmp_path / "nowhere"))


def test_tensor_errors(transformers, tmp_path):
  from alignax.models.hf import HFError, import_hf
  make_hf_model(transformers, "qwen2", tmp_path)
  weights = tmp_path / "model.safetensors"
  original = weights.read_bytes()

  wrong = np.zeros((64, 64), np.float32)
  _rewrite(weights, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": wrong}))
  with pytest.raises(HFError, match=r"tensor 'model.layers.1.self_attn.k_proj.weight' has shape "
                                    r"\(64, 64\), but config.json implies \(32, 64\)"):
    import_hf(str(tmp_path))
  weights.write_bytes(original)
  _rewrite(weights, lambda t: t.pop("model.layers.0.self_attn.v_proj.bias"))
  with pytest.raises(HFError, match=r"tensor 'model.layers.0.self_attn.v_proj.bias' is missing "
                                    r"\(expected shape \(32,\)"):
    import_hf(str(tmp_path))
  weights.write_bytes(original)
  _rewrite(weights, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}))
  with pytest.raises(HFError, match=r"o_proj.bias'\] have no place"):
    import_hf(str(tmp_path))

  # Only pickle weights: refused without being opened.
  weights.unlink()
  (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(HFError, match=r"only pickle weights \(pytorch_model.bin\): safetensors are required"):
    import_hf(str(tmp_path))
  assert issubclass(HFError, CheckpointError)  # so the CLI prints it as one line


# ---------------------------------------------------------------------------------------------
# HFTokenizer


TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, héllo wörld!",
         "<|user|> is not a role here", "numbers 123 456 and   spaces\n"] * 20


def make_tokenizer_dir(path, specials=("<|endoftext|>",), config=None) -> str:
  """Trains a byte-level BPE (like GPT-2's) on TEXTS; writes path/tokenizer.json."""
  tokenizers = require_module("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=list(specials), show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS, trainer)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  if config is not None:
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f)
  return str(path)


def test_hf_tokenizer_protocol(tmp_path):
  from alignax.data import chat
  from alignax.data.hf_tokenizer import HFTokenizer
  from alignax.data.tokenizers import make_tokenizer
  path = make_tokenizer_dir(tmp_path)
  tok = make_tokenizer(path)  # a directory holding tokenizer.json
  assert isinstance(tok, HFTokenizer)
  base = tok._tok.get_vocab_size(with_added_tokens=False)
  # GPT-2 style: one <|endoftext|> serves as bos, eos and pad; the role markers are added after.
  assert tok.id_to_token(tok.eos_id) == "<|endoftext|>" and tok.bos_id == tok.pad_id == tok.eos_id
  assert tok.added_tokens == ["<|system|>", "<|user|>", "<|assistant|>"]
  assert sorted(tok.role_ids.values()) == [base, base + 1, base + 2]
  assert tok.vocab_size == base + 3

  for text in TEXTS[:4] + ["", "emoji 🦊 and tabs\t!"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
  specials = {tok.eos_id, *tok.role_ids.values()}
  assert not specials & set(tok.encode("<|user|> hi <|endoftext|><|assistant|>"))
  ids, mask = chat.encode_chat(tok, [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "fox"}])
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1] == 1
  assert tok.decode(ids) == "hifox"
  assert tok.decode(ids, skip_special=False) == "<|endoftext|><|user|>hi<|assistant|>fox<|endoftext|>"
  assert tok.decode(tok.encode("fox") + [tok.vocab_size + 5]) == "fox"  # padded-vocab ids dropped
  arr, m, n_trunc = tok.encode_batch(["the", "the quick brown fox jumps"], 5)
  assert arr.shape == (2, 5) and arr.dtype == np.int32 and n_trunc == 1
  assert arr[0, 0] == tok.bos_id and not m[0, -1]

  # Loading again (the file itself, or the saved copy with the markers) gives the same ids.
  again = make_tokenizer(os.path.join(path, "tokenizer.json"))
  assert again.role_ids == tok.role_ids and again.vocab_size == tok.vocab_size
  saved = HFTokenizer(os.path.dirname(tok.save(str(tmp_path / "saved"))))
  assert saved.role_ids == tok.role_ids and saved.added_tokens == []
  assert (saved.bos_id, saved.eos_id, saved.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_hf_tokenizer_special_tokens_from_config(tmp_path):
  from alignax.data.hf_tokenizer import HFTokenizer
  specials = ("<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>")
  path = make_tokenizer_dir(tmp_path / "a", specials)
  tok = HFTokenizer(path)  # common names, existing role markers
  vocab = tok._tok.get_vocab()
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<s>"], vocab["</s>"], vocab["<pad>"])
  assert tok.added_tokens == [] and tok.role_ids["user"] == vocab["<|user|>"]
  assert tok.vocab_size == len(vocab)

  config = {"bos_token": None, "eos_token": {"content": "<pad>", "special": True}, "pad_token": None}
  path = make_tokenizer_dir(tmp_path / "b", specials, config)
  tok = HFTokenizer(path)  # the config names eos; explicit nulls fall back to common names / eos
  assert tok.eos_id == vocab["<pad>"] and tok.bos_id == vocab["<s>"] and tok.pad_id == vocab["<pad>"]


def test_hf_tokenizer_errors(tmp_path):
  from alignax.data.hf_tokenizer import HFTokenizer
  from alignax.data.tokenizers import make_tokenizer
  with pytest.raises(DataError, match="tokenizer file not found"):
    make_tokenizer(str(tmp_path / "tokenizer.json"))
  with pytest.raises(DataError, match="the directory has no tokenizer.json"):
    make_tokenizer(str(tmp_path))
  (tmp_path / "junk.json").write_text("{}")
  require_module("tokenizers")
  with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
    make_tokenizer(str(tmp_path / "junk.json"))
  path = make_tokenizer_dir(tmp_path / "noeos", ("<unk>",))
  with pytest.raises(DataError, match="no eos token"):
    HFTokenizer(path)
  path = make_tokenizer_dir(tmp_path / "badname", ("<|endoftext|>",), {"eos_token": "</s>"})
  with pytest.raises(DataError, match="the eos token '</s>' named by tokenizer_config.json"):
    HFTokenizer(path)


# ---------------------------------------------------------------------------------------------
# `alignax import-hf`


def test_import_hf_main_writes_an_export(transformers, tmp_path, capsys):
  """The CLI entry point: export readable by any stage, tokenizer copied, vocab grown to fit."""
  from alignax.checkpoint import export_model_config, load_export
  from alignax.data.tokenizers import make_tokenizer
  from alignax.models import abstract_lm
  from alignax.commands.import_hf import main as import_hf_main
  model = make_hf_model(transformers, "llama", tmp_path / "hf")
  make_tokenizer_dir(tmp_path / "hf", ("<s>", "</s>"))
  import_hf_main(types.SimpleNamespace(src=str(tmp_path / "hf"), dst=str(tmp_path / "run"),
                                       dtype="float32"))
  out = capsys.readouterr().out
  assert "imported LlamaForCausalLM" in out and "<|user|>" in out

  cfg = export_model_config(str(tmp_path / "run"))
  params, meta = load_export(str(tmp_path / "run"), abstract_lm(cfg)[1])
  assert meta["stage"] == "import" and meta["tokenizer"] == str(tmp_path / "run" / "tokenizer.json")
  tok = make_tokenizer(meta["tokenizer"])
  assert cfg.vocab_size == tok.vocab_size == V + 3 > max(tok.role_ids.values())
  logits = alignax_logits(cfg, params)
  assert rel_error(logits[..., :V], hf_logits(model)) <= 1e-4

  # Back to HF with the tokenizer: the grown vocabulary and the markers travel together.
  from alignax.models.hf import export_hf
  export_hf(params, cfg, str(tmp_path / "back"), tokenizer=tok)
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  assert again.config.eos_token_id == tok.eos_id and rel_error(hf_logits(again), logits) <= 1e-4
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
  assert hf_tok("the lazy dog", add_special_tokens=False).input_ids == tok.encode("the lazy dog")
  assert hf_tok.convert_tokens_to_ids("<|assistant|>") == tok.role_ids["assistant"]

  shutil.rmtree(tmp_path / "hf")
  with pytest.raises(CheckpointError, match="not a directory"):
    import_hf_main(types.SimpleNamespace(src=str(tmp_path / "hf"), dst=str(tmp_path / "run2"),
                                         dtype="float32"))


def test_import_hf_cli_without_tokenizer(transformers, tmp_path):
  """`alignax import-hf` as a user runs it; a directory without tokenizer files falls back to bytes."""
  from cli_helpers import run_cli

  from alignax.checkpoint import read_export_meta
  make_hf_model(transformers, "gpt2", tmp_path / "hf")
  proc = run_cli("import-hf", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'run'}", "--dtype=bfloat16")
  assert "imported GPT2LMHeadModel" in proc.stdout and "in bfloat16" in proc.stdout
  assert "warning:" in proc.stdout and "byte tokenizer" in proc.stdout
  meta = read_export_meta(str(tmp_path / "run"))
  assert meta["tokenizer"] == "bytes" and meta["model"]["param_dtype"] == "bfloat16"
  assert meta["model"]["vocab_size"] == V  # >= the byte tokenizer's 262: nothing to grow

  (tmp_path / "hf" / "model.safetensors").unlink()
  proc = run_cli("import-hf", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'run2'}", check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("alignax: error: ")
  assert "has no *.safetensors weights" in proc.stderr


def test_untrusted_checkpoints_are_refused_before_anything_large_happens(transformers, tmp_path):
  """Absurd sizes, a huge tokenizer, a weight_map escaping --src, a --dst holding a run: each a
  clear HFError before a large allocation or an overwrite."""
  from alignax.commands.import_hf import main as import_hf_main
  from alignax.models.hf import HFError, import_hf
  src = tmp_path / "hf"
  make_hf_model(transformers, "llama", src)
  with open(src / "config.json") as f:
    good = json.load(f)
  _edit_config(src, vocab_size=10**12, hidden_size=2**20)
  with pytest.raises(HFError, match=r"implies [\d,]+ parameters, but the weight files hold only"):
    import_hf(str(src))
  _edit_config(src, **good)

  with pytest.raises(HFError, match=r"the tokenizer needs a vocabulary of 1,000,300, 1,000,000 rows more"):
    import_hf(str(src), pad_vocab_to=V + 10**6)

  (tmp_path / "outside.safetensors").write_bytes((src / "model.safetensors").read_bytes())
  os.remove(src / "model.safetensors")
  (src / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}))
  with pytest.raises(HFError, match=r"names '../outside.safetensors', which is not a .safetensors file "
                                    r"inside"):
    import_hf(str(src))
  os.replace(tmp_path / "outside.safetensors", src / "model.safetensors")
  os.remove(src / "model.safetensors.index.json")

  flags = types.SimpleNamespace(src=str(src), dst=str(tmp_path / "run"), dtype="float32")
  import_hf_main(flags)
  before = os.path.getmtime(tmp_path / "run" / "export")
  with pytest.raises(HFError, match=r"already holds a run \(export\)"):
    import_hf_main(flags)
  assert os.path.getmtime(tmp_path / "run" / "export") == before


def test_apply_beyond_max_seq_len_raises_instead_of_nan_logits():
  from alignax.models import build_lm, gpt2_style
  lm, params = build_lm(gpt2_style(vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                   max_seq_len=16))
  tokens = jnp.zeros((1, 20), jnp.int32)
  with pytest.raises(ValueError, match="a sequence of 20 tokens exceeds model.max_seq_len=16"):
    lm.apply(params, tokens, jnp.arange(20)[None], jnp.ones_like(tokens))
  with pytest.raises(ValueError, match="a KV cache of 24 tokens exceeds"):
    lm.apply(params, tokens[:, :4], jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32),
             lm.init_cache(1, 24))


def test_export_hf_command_round_trip(transformers, tmp_path, capsys):
  """import-hf a Mistral, a chat-trained run on top of it, export-hf: a Mistral again, sharded
  with an index, logits equal, generation_config's eos, and `apply_chat_template` giving the
  token ids alignax trained on."""
  import ml_collections
  from alignax.checkpoint import export_model_config, load_export, read_export_meta, save_export
  from alignax.commands.export_hf import main as export_hf_main
  from alignax.commands.import_hf import main as import_hf_main
  from alignax.config import save_config
  from alignax.data.chat import encode_chat
  from alignax.data.tokenizers import make_tokenizer
  from alignax.models.hf import HFError
  from alignax.run_models import load_policy
  model = make_hf_model(transformers, "mistral_window", tmp_path / "hf")
  make_tokenizer_dir(tmp_path / "hf", ("<s>", "</s>"))
  import_hf_main(types.SimpleNamespace(src=str(tmp_path / "hf"), dst=str(tmp_path / "imported"),
                                       dtype="float32"))
  # A chat-trained run started from the import (as SFT writes it): its export and config.json.
  params, _ = load_export(str(tmp_path / "imported"))
  meta = read_export_meta(str(tmp_path / "imported"))
  sft = str(tmp_path / "sft")
  save_export(sft, params, model=export_model_config(str(tmp_path / "imported")), stage="sft",
              tokenizer=meta["tokenizer"], chat_template="markers")
  save_config(ml_collections.ConfigDict(dict(stage="sft", init=dict(workdir=str(tmp_path / "imported")))), sft)

  flags = types.SimpleNamespace(workdir=sft, out=str(tmp_path / "out"), dtype="", architecture="",
                                max_shard_size="40KB")
  export_hf_main(flags)
  assert "exported MistralForCausalLM (sft, from its export)" in capsys.readouterr().out
  out = tmp_path / "out"
  assert (out / "model.safetensors.index.json").exists()
  assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1
  again = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(again).__name__ == "MistralForCausalLM" and again.config.sliding_window == 8
  lm, p, _, spec = load_policy(sft)
  assert rel_error(hf_logits(again), alignax_logits(lm.config, p)) <= 1e-4
  assert rel_error(hf_logits(again)[..., :V], hf_logits(model)) <= 1e-4
  tok = make_tokenizer(spec)
  with open(out / "generation_config.json") as f:
    # The tokenizer's eos, then the source checkpoint's other generation eos ids (its
    # generation_config.json, copied at import): every id the sampler stops at.
    assert json.load(f)["eos_token_id"] == [tok.eos_id, model.generation_config.eos_token_id]
  assert tok.stop_ids == (tok.eos_id, model.generation_config.eos_token_id)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the lazy dog"},
          {"role": "assistant", "content": "a quick fox"}, {"role": "user", "content": "jumps over"}]
  ids, _ = encode_chat(tok, chat, add_generation_prompt=True)
  rendered = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
  rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered  # transformers 5: a dict
  assert list(rendered) == ids

  with pytest.raises(HFError, match="LlamaForCausalLM has no sliding_window"):
    export_hf_main(types.SimpleNamespace(workdir=sft, out=str(tmp_path / "llama"), dtype="",
                                         architecture="LlamaForCausalLM", max_shard_size="0"))
  export_hf_main(types.SimpleNamespace(workdir=sft, out=str(tmp_path / "bf16"), dtype="bfloat16",
                                       architecture="", max_shard_size="0"))
  with open(tmp_path / "bf16" / "model.safetensors", "rb") as f:
    assert b'"BF16"' in f.read(4096)
  with pytest.raises(HFError, match="already holds a checkpoint"):
    export_hf_main(flags)
