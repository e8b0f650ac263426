"""Conversion to and from other model libraries.

    hf_gpt2, hf_llama   configs and state dicts of Hugging Face's GPT2LMHeadModel / LlamaForCausalLM
    hf_tokenizer        an HF model directory's tokenizer <-> lmforge Tokenizer (kind "hf" on import)
    hf_import           `lmforge import`: an HF directory (safetensors only) -> an lmforge checkpoint
    hf_export           `lmforge export --format hf`: a checkpoint -> a directory transformers loads
    onnx_export         `lmforge export --format onnx`: a checkpoint -> input_ids -> logits ONNX graph
"""
