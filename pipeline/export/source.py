"""What to export: the recipe's `source:` section as a base checkpoint and the adapters to merge on
it (a stage output dir's manifests are followed back by `run_record.resolve_source`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.export.recipe import SourceSection
from pipeline.run_record import Source, is_hf_checkpoint, resolve_source


def source_from_recipe(section: SourceSection) -> Source:
    if section.run_dir is not None:
        source = resolve_source(section.run_dir)
        if section.checkpoint is not None:
            source = Source(Path(section.checkpoint), source.adapters, source.manifests, source.quantized)
    else:
        source = Source(Path(section.checkpoint), [], [])
    if not is_hf_checkpoint(source.checkpoint):
        raise FileNotFoundError(f"source.checkpoint: {source.checkpoint} is not an HF checkpoint dir")
    return Source(source.checkpoint, source.adapters + [Path(a) for a in section.adapters], source.manifests,
                  source.quantized)
