"""Evaluation: the MMEB-layout task harness, retrieval metrics and the efficiency benchmark."""
