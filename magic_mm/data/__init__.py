"""Data layer: record schema and readers (image–caption CSVs, MMEB-layout files), collators."""
