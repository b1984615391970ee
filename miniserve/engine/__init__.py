"""The engine: the step loop, sequences, output processing, the model runner per role, CUDA graphs, the sampler."""
