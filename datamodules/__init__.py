"""Data side of the suite (see FORMAT.md). Nothing is imported here, so `datamodules.config`
and `datamodules.tokens` stay cheap to import.

  tokens       special tokens              config      DataConfig / SourceConfig / ChatTemplateConfig
  schema       shard format, writer        world       the embedded shape world (+ CLI)
                                           world_edit  its editing task (+ CLI with it)
  convert      converters (+ CLI)          pretokenize VQ indices beside images
  stream       shard streams, mixing       collate     Collator, prompt helpers
  transforms   image transforms            datamodule  the LightningDataModule
  testing      hand-built samples for tests and benchmarks
  paths        the one path resolver (relative to the repo root)
"""
