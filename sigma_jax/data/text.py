"""Text tokenizer: SentencePiece over item texts and instruction templates, plus special tokens
and the semantic-ID tokens.

Token id layout (one vocabulary for the backbone):
  [0, spm_size)                       SentencePiece pieces; 0 = padding, 1 = unknown, then the
                                      special tokens <|start|> <|end|> <q> <item>
  [spm_size, spm_size + L * C + D)    SID tokens: level l (0-based), code c -> spm_size + l*C + c;
                                      the de-duplication level's D codes come last
SID tokens live outside the SentencePiece model because their number depends on the tokenizer
config (levels, codebook size, de-duplication depth), which is chosen after the text vocabulary.
"""
from __future__ import annotations

import io
import os
import re

import numpy as np
import sentencepiece as spm

from sigma_jax import utils, workdir as wd

PAD, UNK = 0, 1
START, END, QUERY, ITEM = "<|start|>", "<|end|>", "<q>", "<item>"
SPECIALS = (START, END, QUERY, ITEM)

def _sid_name(level: int, code: int) -> str:
  return f"<a{level}_{code}>"


class SidVocab:
  """The id space after the text ids [0, spm_size): L levels of C SID codes, then the D
  de-duplication codes. Subclasses set ``spm_size``, ``levels``, ``codebook_size`` and
  ``dedup_size``."""

  spm_size: int
  levels: int
  codebook_size: int
  dedup_size: int

  @property
  def num_sid_tokens(self) -> int:
    return self.levels * self.codebook_size + self.dedup_size

  @property
  def vocab_size(self) -> int:
    return self.spm_size + self.num_sid_tokens

  def sid_token(self, level: int, code) -> np.ndarray:
    """Token id(s) of code(s) at a SID level (``level == levels`` is the de-dup level)."""
    code = np.asarray(code)
    limit = self.dedup_size if level == self.levels else self.codebook_size
    if not 0 <= level <= self.levels or np.any(code < 0) or np.any(code >= limit):
      raise ValueError(f"SID level {level} code out of range [0, {limit})")
    return self.spm_size + level * self.codebook_size + code


class TextTokenizer(SidVocab):
  """SentencePiece pieces + special tokens + SID tokens, as one id space."""

  def __init__(self, model_path: str, levels: int = 0, codebook_size: int = 0, dedup_size: int = 0):
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"no SentencePiece model at {model_path}; run the "
                              "'text_tokenizer' stage first")
    self.sp = spm.SentencePieceProcessor(model_file=model_path)
    self.spm_size = int(self.sp.get_piece_size())
    self.levels, self.codebook_size, self.dedup_size = levels, codebook_size, dedup_size
    self.special = {s: int(self.sp.piece_to_id(s)) for s in SPECIALS}
    for s, i in self.special.items():
      if i == UNK:
        raise ValueError(f"{model_path}: special token {s} is missing from the model")

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def decode(self, ids) -> str:
    """Inverse of ``encode`` for text ids; SID ids are rendered as <a{level}_{code}>."""
    out, run = [], []
    for i in (int(x) for x in ids):
      if i < self.spm_size:
        run.append(i)
        continue
      if run:
        out.append(self.sp.decode(run))
        run = []
      idx = i - self.spm_size
      if idx < self.levels * self.codebook_size:
        level, code = divmod(idx, self.codebook_size)
      else:
        level, code = self.levels, idx - self.levels * self.codebook_size
      out.append(_sid_name(level, code))
    if run:
      out.append(self.sp.decode(run))
    return " ".join(s for s in out if s)

  def encode_batch(self, texts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [B, max_len] and mask [B, max_len]; long texts keep their start."""
    ids = np.full((len(texts), max_len), PAD, np.int32)
    for r, t in enumerate(self.sp.encode(list(texts))):
      t = t[:max_len]
      ids[r, :len(t)] = t
    return ids, ids != PAD


def train_spm(texts, vocab_size: int, out_path: str) -> str:
  """Trains a unigram SentencePiece model on ``texts`` (deterministic: one thread, no sampling);
  writes ``out_path`` atomically."""
  clean = [re.sub(r"\s+", " ", t).strip() for t in texts]
  clean = [t for t in clean if t]
  if not clean:
    raise ValueError("no text to train the SentencePiece model on")
  # Training from an iterator into memory keeps file paths out of the model, so the same texts
  # give a byte-identical model wherever it is written.
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(clean), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", character_coverage=1.0, byte_fallback=True, pad_id=PAD, unk_id=UNK,
      bos_id=-1, eos_id=-1, user_defined_symbols=list(SPECIALS), hard_vocab_limit=False,
      num_threads=1, minloglevel=2, input_sentence_size=200000, shuffle_input_sentence=False)
  utils.write_bytes(out_path, model.getvalue())
  return out_path


def model_path(workdir: str) -> str:
  return wd.path(workdir, wd.SPM_MODEL)
