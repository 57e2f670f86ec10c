"""Tolerances for comparing float32 results, derived from float32 rounding, never picked.

When one real quantity is computed twice in float32 by different kernels, graphs, thread
counts, batch shapes or backends, each result rounds differently, and by how much depends on
the machine (its SIMD width, its GEMM blocking). A test that claims "the same math" must
allow that much and no less, or compare in float64 where rounding cannot decide.

The bound used here: a sum of n terms in float32, in any order, satisfies
    |fl(s) - s| <= gamma_n * sum |x_i|,   gamma_n = n u / (1 - n u),   u = 2^-24
(Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Lemma 3.1 and eq. 3.5 for a
dot product with sum |x_i y_i|). A value reached through a chain of such sums (a network)
collects, to first order, the n of every sum on its chain, provided no step amplifies its
input's relative error: LayerNorm renormalises, softmax and the final L2 normalisation
contract. Two evaluations, each within that bound of the exact value, differ by at most
twice it. These are worst-case bounds: observed differences are typically 10-100x smaller,
so a test within them still fails for any real difference (a leaked padding token or a wrong
weight moves outputs by 1e-2 or more).
"""
import numpy as np

U32 = 2.0 ** -24   # unit roundoff of float32


def float32_tolerance(scale: float, terms: int) -> float:
    """Largest |a - b| for two float32 evaluations of one quantity whose summed terms have
    absolute values adding up to ``scale`` over a chain of ``terms`` accumulated terms."""
    gamma = terms * U32 / (1 - terms * U32)
    return 2 * gamma * scale


def unit_norm_tolerance(dim: int) -> float:
    """|‖y‖ - 1| for y = x / ‖x‖ computed in float32 and measured in float32: the
    normalisation sums dim squares, takes a square root and divides (dim + 2 roundings), and
    the measurement sums dim squares again and takes a root; each on quantities adding up
    to 1."""
    return float32_tolerance(1.0, dim + 2)


def encoder_chain_terms(tower, length: int, input_terms: int = 0) -> int:
    """Accumulated terms on the chain from a Transformer tower's input to its L2-normalised
    embedding: per layer the two LayerNorms (hidden each), the q/k/v projection (hidden), the
    attention scores (head dim), the weighted sum of values (length), the output projection
    (hidden), the MLP (hidden, then 4 x hidden); then the final LayerNorm, the projection
    (hidden) and the normalisation (at most hidden terms); ``input_terms`` for a first sum
    before all that (an image's patch embedding). ``tower`` is a config section with
    hidden_size, num_layers, num_heads (and intermediate_size when the family has one)."""
    hidden = tower.hidden_size
    intermediate = getattr(tower, "intermediate_size", None) or 4 * hidden
    per_layer = 2 * hidden + hidden + hidden // tower.num_heads + length + hidden + hidden + intermediate
    return input_terms + tower.num_layers * per_layer + 3 * hidden


def clip_embedding_tolerances(model) -> tuple[float, float]:
    """(image, text) tolerances for two float32 evaluations of a CLIP model's unit
    embeddings (elements at most 1), over each tower's whole chain at its longest input."""
    image, text = model.image, model.text
    patches = (image.image_size // image.patch_size) ** 2
    image_terms = encoder_chain_terms(image, patches + 1, image.num_channels * image.patch_size ** 2)
    text_terms = encoder_chain_terms(text, text.max_position_embeddings)
    return float32_tolerance(1.0, image_terms), float32_tolerance(1.0, text_terms)


def scaled_differences(a, b) -> list[float]:
    """max |x - y| / max(1, max |y|) for each pair of outputs: relative to the output's own
    magnitude, as float32 rounding is. Similarity logits carry the temperature (x14 to x20 in
    the image-text tests) on top of the cosines, so an absolute 1e-5 on them would ask the
    towers for ~20x less rounding than the same 1e-5 on their features (seen between
    backends: features 1e-6 apart, logits 5.8e-6)."""
    return [float(np.abs(x - y).max() / max(1.0, np.abs(y).max())) for x, y in zip(a, b)]
