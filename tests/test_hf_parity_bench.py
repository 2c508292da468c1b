"""benchmarks/hf_parity.py end to end on one config: its figures are the tests' parity."""

import json
import os
import subprocess
import sys

from cli_helpers import REPO, cli_env


def test_hf_parity_rows_for_llama_and_a_dynamic_rope_export(transformers, tmp_path):
  out = tmp_path / "parity.json"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "hf_parity.py"), "--names=llama,llama_dynamic",
                         "--new_tokens=4", f"--out={out}"], cwd=REPO, env=cli_env(1), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out, encoding="utf-8") as f:
    result = json.load(f)
  row, dynamic = result["rows"]
  # An NTK-dynamic export once wrote max_seq_len as max_position_embeddings, which transformers
  # takes for the original context: off by 1.6e-3 at 24 tokens.
  assert dynamic["name"] == "llama_dynamic" and 0 <= dynamic["export"] <= 1e-4
  assert (row["name"], row["architecture"], row["export_architecture"]) == (
      "llama", "LlamaForCausalLM", "LlamaForCausalLM")
  for key in ("plain", "packed", "padded", "export"):
    assert 0 <= row[key] <= 1e-4, key
  assert row["greedy"]["identical"] == row["greedy"]["prefix"] == [4, 4]
  assert row["hf_params"] == row["alignax_params"] and row["notes"] == []
  assert sorted(r["config"] for r in result["real_configs"]) == ["gemma-3-1b", "llama-3.2-1b", "qwen3-0.6b"]
  assert all(r["equal"] for r in result["real_configs"])
  assert "LlamaForCausalLM" in proc.stdout and result["transformers"] == transformers.__version__
