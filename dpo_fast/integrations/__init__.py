"""Integrations with Hugging Face transformers and TRL."""
