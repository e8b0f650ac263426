"""Conversion to and from other model libraries (Hugging Face GPT-2: `lmforge.interop.hf_gpt2`)."""
