"""attnkit.paths: cross-path similarity functions and multi-path collaborative decoding (M3PO).

Not through the seam: paths exchange information through the *input embeddings* of the next token,
not through attention. See the paths guide (docs/guide/paths.md).
"""

from attnkit.paths.blend import blend
from attnkit.paths.decode import PathsOutput, blended_logprobs, generate_paths
from attnkit.paths.similarity import SIMILARITIES, list_similarities, make_similarity, register_similarity
from attnkit.paths.weights import WeightStats, path_weights, weight_stats

__all__ = ["SIMILARITIES", "PathsOutput", "WeightStats", "blend", "blended_logprobs", "generate_paths",
           "list_similarities", "make_similarity", "path_weights", "register_similarity", "weight_stats"]
