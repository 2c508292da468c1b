"""Next-token pretraining.

  alignax train --config=configs/pretrain.py:tiny --config.workdir=runs/pretrain
  alignax train --config=configs/pretrain.py:tiny --config.data.source=files \
      --config.data.train_files='corpus/*.txt'

Presets: tiny (the world corpus, about 3 minutes on 2 CPU cores), standard (the 4.46M-param CPU
benchmark workload), gpt2_small (124M, GPT-2 style), llama_350m (Llama style, for accelerators).
"""

from alignax.config import base_config, model_section, world_section


def get_config(preset: str | None = None):
  preset = preset or "tiny"
  c = base_config("pretrain", preset)
  c.world = world_section()
  c.data.text_mode = "lines"  # text files: "lines" (one document per line) or "file" (whole file)
  c.data.long_docs = "split"  # documents longer than seq_len: "split" into chunks or "truncate"

  if preset == "tiny":
    # Tuned on the world (2 CPU cores, ~3 min): a narrow 1.2M-param model sees more tokens in
    # the budget than a wide one, and only then learns to copy a question's subject into its
    # answer (forum-style Q/A: 100% of facts, held-out ones included, after 1000 steps). The
    # 512-piece world BPE (2.4 bytes/token) splits names into pieces shared across facts, which
    # keeps held-out facts answerable after SFT.
    c.tokenizer = "world_bpe:512"
    c.model = model_section(vocab_size=512, d_model=128, n_layers=4, n_heads=4, d_ff=512,
                            max_seq_len=256)
    c.data.seq_len = 64
    c.train.steps = 1000
    c.train.batch_size = 32
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 40
    c.eval.every = 250
  elif preset == "standard":
    c.model = model_section()
    c.data.seq_len = 128
    c.train.batch_size = 8
    c.train.steps = 1000
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
  elif preset == "gpt2_small":
    c.model = model_section(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                            max_seq_len=1024, norm="layernorm", position="learned", mlp="gelu",
                            tie_embeddings=True, use_bias=True)
    c.data.seq_len = 1024
    c.train.batch_size = 8
    c.train.steps = 10000
    c.optimizer.lr = 6e-4
    c.optimizer.warmup_steps = 500
  elif preset == "llama_350m":
    c.model = model_section(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8,
                            d_ff=2816, max_seq_len=2048)
    c.data.seq_len = 2048
    c.train.batch_size = 8
    c.train.steps = 10000
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 500
  else:
    raise ValueError(f"unknown preset {preset!r}; presets: tiny, standard, gpt2_small, llama_350m")
  return c
