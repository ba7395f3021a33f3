"""Distillation: prompt embeddings, teacher data, the FSDP2 trainer and its launcher."""
