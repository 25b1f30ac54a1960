"""Data preparation and streaming: sources -> tokenized webdataset shards -> packed batches."""
