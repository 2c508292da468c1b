"""SentencePiece tokenizer (offline BPE training) and the tokenizer factory."""

import numpy as np
import pytest

from alignax.data import chat
from alignax.data.schemas import DataError
from alignax.data.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece
from alignax.data.tokenizer import ByteTokenizer
from alignax.data.tokenizers import make_tokenizer

TEXTS = ([f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)]
         + ["Hello, world! How are you today?"] * 20)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  return train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("spm") / "tok"), 320)


def test_sentencepiece_protocol(sp_model):
  tok = make_tokenizer(sp_model)
  assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 320
  specials = {tok.pad_id, tok.bos_id, tok.eos_id, *tok.role_ids.values()}
  assert len(specials) == 6 and set(tok.role_ids) == {"system", "user", "assistant"}
  # Exact round trip (identity normalization, byte fallback for unseen characters) ...
  text = "  the quick ✓ fox\n\tüber "
  ids = tok.encode(text)
  assert tok.decode(ids) == text and not specials & set(ids)
  # ... and role-marker strings inside text are plain text, never the special ids.
  assert not specials & set(tok.encode("<|user|> hi <eos>"))
  ids, mask = chat.encode_chat(tok, [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "fox"}])
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1] == 1
  assert tok.decode(ids, skip_special=False) == "<bos><|user|>hi<|assistant|>fox<eos>"
  assert tok.decode(ids) == "hifox"
  arr, m, n_trunc = tok.encode_batch(["the", "the quick brown fox jumps"], 5)
  assert arr.shape == (2, 5) and arr.dtype == np.int32 and n_trunc == 1
  assert arr[0, 0] == tok.bos_id and not m[0, -1]


def test_make_tokenizer_errors(tmp_path):
  assert isinstance(make_tokenizer("bytes"), ByteTokenizer)
  with pytest.raises(DataError, match="tokenizer file not found"):
    make_tokenizer(str(tmp_path / "tokenizer.json"))
  with pytest.raises(DataError, match="model file not found"):
    make_tokenizer(str(tmp_path / "missing.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(DataError, match="not a SentencePiece model"):
    make_tokenizer(str(junk))
  with pytest.raises(DataError, match="unknown tokenizer"):
    make_tokenizer("gpt2")
  with pytest.raises(DataError, match="training failed"):
    train_sentencepiece(TEXTS, str(tmp_path / "small"), 50)  # below 256 byte pieces
