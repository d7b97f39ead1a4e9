"""Numeric constants shared by the models and decoding (a leaf module: it imports nothing)."""

# The score of a masked-out logit, key, item or beam. Finite, so a fully masked row gives a
# uniform softmax instead of NaN (inf - inf), and sums of a few stay representable.
NEG_INF = -1e30
# A score at or below this has taken at least one NEG_INF term: that beam or candidate is invalid.
DEAD = NEG_INF / 2
