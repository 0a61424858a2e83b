"""Training of the embedded default model: corpus, masked-diffusion objective and evaluation.

The model classes come from ``executor.model``, the same code that loads any LLaDA2
checkpoint, so trained weights load through the ordinary ``from_pretrained`` path.
"""
