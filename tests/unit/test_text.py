"""Text tokenizer: SentencePiece + specials + SID tokens."""
import numpy as np
import pytest

from sigma_jax.data import raw, tasks, text


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  data = raw.parse("demo")
  path = str(tmp_path_factory.mktemp("spm") / "spm.model")
  text.train_spm([it.text for it in data.items] + tasks.all_template_texts(), 800, path)
  return text.TextTokenizer(path, levels=3, codebook_size=16, dedup_size=5), data, path


def test_round_trip_on_item_texts(tok):
  t, data, _ = tok
  for it in data.items[:200]:
    assert t.decode(t.encode(it.text)) == " ".join(it.text.split())


def test_specials_are_single_tokens(tok):
  t, _, _ = tok
  for s in text.SPECIALS:
    assert t.encode(s) == [t.special[s]] or t.encode(s)[-1] == t.special[s]
  ids = t.encode(f"{text.START} hello {text.QUERY}")
  assert t.special[text.START] in ids and t.special[text.QUERY] in ids
  assert len(set(t.special.values())) == 4 and text.PAD not in t.special.values()


def test_sid_tokens_layout(tok):
  t, _, _ = tok
  assert t.vocab_size == t.spm_size + 3 * 16 + 5
  assert int(t.sid_token(0, 0)) == t.spm_size
  assert int(t.sid_token(2, 15)) == t.spm_size + 47
  assert int(t.sid_token(3, 4)) == t.vocab_size - 1
  assert t.decode([int(t.sid_token(1, 7)), int(t.sid_token(3, 2))]) == "<a1_7> <a3_2>"
  with pytest.raises(ValueError, match="out of range"):
    t.sid_token(3, 5)
  with pytest.raises(ValueError, match="out of range"):
    t.sid_token(0, 16)


def test_encode_batch_pads_right(tok):
  t, _, _ = tok
  ids, mask = t.encode_batch(["a b c", "Toy Story (1995). Adventure."], max_len=6)
  assert ids.shape == (2, 6) and mask.dtype == bool
  assert mask[0].sum() == len(t.encode("a b c")[:6])
  assert np.all(ids[~mask] == text.PAD)


def test_training_is_deterministic(tok, tmp_path):
  _, data, path = tok
  again = text.train_spm([it.text for it in data.items] + tasks.all_template_texts(), 800,
                         str(tmp_path / "again.model"))
  with open(path, "rb") as a, open(again, "rb") as b:
    assert a.read() == b.read()
