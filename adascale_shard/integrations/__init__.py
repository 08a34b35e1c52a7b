"""Integrations with DeepSpeed, the Hugging Face Trainer and Accelerate, each imported by full path."""
