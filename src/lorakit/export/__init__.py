"""Use a trained run outside lorakit: a merged Hugging Face model (merge.py), a GGUF file and Ollama
Modelfile for llama.cpp and Ollama (gguf.py). Every export is checked against the model it came from
before the command succeeds."""
