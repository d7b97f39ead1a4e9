"""ProjFuse: shapes, unit norm, sharding names, feature assembly and its errors."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigma_jax.models import projfuse


def test_unit_norm_and_injection_scale():
  pf = projfuse.ProjFuse(10, 16, 8, rngs=nnx.Rngs(0))
  v = pf(jnp.asarray(np.random.default_rng(0).normal(size=(5, 10)), jnp.float32))
  assert v.shape == (5, 8)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(pf.inject(v), axis=1), 0.02 * np.sqrt(8), rtol=1e-5)


def test_dot_similarity_keeps_key_norms_but_injects_unit_vectors():
  from sigma_jax.models import sigma
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 10)), jnp.float32)
  pf = projfuse.ProjFuse(10, 16, 8, rngs=nnx.Rngs(0), normalize=False)
  v = pf(x)
  cosine = projfuse.ProjFuse(10, 16, 8, rngs=nnx.Rngs(0))  # same initial parameters
  np.testing.assert_allclose(v / np.linalg.norm(v, axis=1, keepdims=True), cosine(x), atol=1e-5)
  assert np.ptp(np.linalg.norm(v, axis=1)) > 1e-3  # the norms differ: they are kept
  np.testing.assert_allclose(np.linalg.norm(pf.inject(v), axis=1), 0.02 * np.sqrt(8), rtol=1e-5)
  with pytest.raises(ValueError, match="sft.similarity must be one of"):
    sigma.SigmaModel(None, 10, 16, rngs=nnx.Rngs(0), similarity="euclid")


def test_every_matrix_has_logical_axes():
  pf = projfuse.ProjFuse(10, 16, 8, rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(pf, nnx.Param))
  names = {k: v.get_value() if hasattr(v, "get_value") else v
           for k, v in nnx.to_flat_state(specs)}
  assert tuple(names[("w1",)]) == (None, "mlp")
  assert tuple(names[("w2",)]) == ("mlp", "embed")


def test_item_features(tmp_path):
  (tmp_path / "collab").mkdir()
  (tmp_path / "ground").mkdir()
  np.save(tmp_path / "collab" / "item_emb.npy", np.ones((4, 3)) * 2)
  np.save(tmp_path / "ground" / "item_text_emb.npy", np.ones((4, 2)))
  np.save(tmp_path / "extra.npy", np.ones((4, 5)))
  f = projfuse.item_features(str(tmp_path), extra=str(tmp_path / "extra.npy"))
  assert f.shape == (4, 10)
  np.testing.assert_allclose(np.linalg.norm(f[:, :3], axis=1), 1.0, atol=1e-6)
  np.save(tmp_path / "bad.npy", np.ones((3, 5)))
  with pytest.raises(ValueError, match="same N"):
    projfuse.item_features(str(tmp_path), extra=str(tmp_path / "bad.npy"))
  with pytest.raises(FileNotFoundError, match="missing"):
    projfuse.item_features(str(tmp_path), extra=str(tmp_path / "nope.npy"))
  # The no-grounding ablation: the raw text embedding instead of the grounded one.
  np.save(tmp_path / "ground" / "raw_text_emb.npy", np.arange(8.0).reshape(4, 2) + 1)
  raw = projfuse.item_features(str(tmp_path), text="raw")
  grounded = projfuse.item_features(str(tmp_path))
  np.testing.assert_array_equal(raw[:, :3], grounded[:, :3])  # v_ID unchanged
  r = np.arange(8.0).reshape(4, 2) + 1
  np.testing.assert_allclose(raw[:, 3:], r / np.linalg.norm(r, axis=1, keepdims=True), atol=1e-6)
  with pytest.raises(ValueError, match="sft.text_features"):
    projfuse.item_features(str(tmp_path), text="ground")
