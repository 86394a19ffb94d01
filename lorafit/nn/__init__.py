"""Shared building blocks of the decoder models: normalisation, rotary embeddings, attention."""
