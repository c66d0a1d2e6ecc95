"""Parallel layout (TP x PP x DP, layers per stage, padded vocab) and closed-form Qwen3 parameter counts.

Per transformer layer (H hidden, a heads, g KV heads, d head_dim, F ffn): q/k/v/o projections
`H*a*d + 2*H*g*d + a*d*H`, SwiGLU MLP `3*H*F` (all split over TP), input/post-attention RMSNorm `2*H` and
q/k RMSNorm `2*d` (replicated on every TP rank). Plus the embedding `V*H`, the final norm `H` and, when
untied, the output layer `V*H`. Under TP the vocabulary is padded to a multiple of `make_vocab_size_divisible_by
x TP` and split in rows (SPEC.md notation). Under PP the first stage holds the embedding, the last stage the
final norm and the output layer; a tied output layer with PP > 1 is a copy of the embedding on the last stage
(megatron keeps both in sync), so it costs memory there but counts once in the model total.
"""
from __future__ import annotations

from dataclasses import dataclass

from replay_megatron.config.model_shape import ModelShape


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 1) -> int:
    """`vocab_size` rounded up to a multiple of `divisible_by * tp` (megatron's vocab padding)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    """How a world of `world` ranks splits: TP x PP x DP, the layers of each PP stage, the padded vocabulary."""

    tp: int
    pp: int
    dp: int
    stage_layers: tuple[range, ...]
    padded_vocab: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def make_layout(shape: ModelShape, tp: int, pp: int, dp: int = 1, divisible_by: int = 1) -> Layout:
    """The layout of `shape` at TP x PP x DP; layers split evenly over stages (PP must divide them)."""
    if shape.num_layers % pp:
        raise ValueError(f"PP={pp} does not divide num_hidden_layers={shape.num_layers}")
    per = shape.num_layers // pp
    stages = tuple(range(s * per, (s + 1) * per) for s in range(pp))
    return Layout(tp, pp, dp, stages, padded_vocab_size(shape.vocab_size, tp, divisible_by))


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by kind: embedding, untied (or tied-copy) output layer, 2-D transformer matrices, 1-D norms."""

    embedding: int = 0
    output: int = 0
    matrices: int = 0
    norms: int = 0

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.matrices + self.norms

    @property
    def transformer(self) -> int:
        """Everything but the embedding and output layer."""
        return self.matrices + self.norms


def layer_matrix_params(shape: ModelShape) -> int:
    """2-D weights of one layer (attention projections and SwiGLU MLP), before the TP split."""
    h, d = shape.hidden_size, shape.head_dim
    attention = h * shape.num_heads * d * 2 + h * shape.num_kv_heads * d * 2
    return attention + 3 * h * shape.ffn_hidden_size


def layer_norm_params(shape: ModelShape) -> int:
    """1-D weights of one layer: two RMSNorms over H and the q/k RMSNorms over head_dim (replicated over TP)."""
    return 2 * shape.hidden_size + 2 * shape.head_dim


def model_params(shape: ModelShape, vocab: int | None = None) -> ParamCounts:
    """Logical parameter counts of the whole model (tied embedding counted once); `vocab` defaults to unpadded."""
    v = shape.vocab_size if vocab is None else vocab
    return ParamCounts(embedding=v * shape.hidden_size,
                       output=0 if shape.tied_embeddings else v * shape.hidden_size,
                       matrices=shape.num_layers * layer_matrix_params(shape),
                       norms=shape.num_layers * layer_norm_params(shape) + shape.hidden_size)


def rank_params(shape: ModelShape, layout: Layout, stage: int) -> ParamCounts:
    """Parameters held by one TP rank of PP `stage` (a tied output copy on the last stage included)."""
    first, last = stage == 0, stage == layout.pp - 1
    n = len(layout.stage_layers[stage])
    vocab_rows = layout.padded_vocab // layout.tp * shape.hidden_size
    holds_output = last and (not shape.tied_embeddings or layout.pp > 1)
    return ParamCounts(embedding=vocab_rows if first else 0,
                       output=vocab_rows if holds_output else 0,
                       matrices=n * layer_matrix_params(shape) // layout.tp,
                       norms=n * layer_norm_params(shape) + (shape.hidden_size if last else 0))
