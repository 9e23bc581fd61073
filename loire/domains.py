"""The five domains of ELLE's stream, in order: web, news, reviews, biomedical, computer science.

The one definition: the schedule presets, the synthetic corpora, the task catalogue, the tokenizer's reserved
domain tokens and the pipeline's demo all read it from here.
"""

DOMAINS: tuple[str, ...] = ("WB", "NEWS", "REV", "BIO", "CS")

__all__ = ["DOMAINS"]
