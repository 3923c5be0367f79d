"""The corpus: readers, streaming ingest, filesystems, the sentence embedder and synthetic corpora."""
