"""Model layer: compressors, backbone adapters (one file per family), embedder, prompts."""
