"""Input data: tfds builders for the offline corpora, tokenizers, LM batching."""
