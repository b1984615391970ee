"""The engine: the step loop, the decoders, output processing, the model runner per role, CUDA graphs, the sampler."""
