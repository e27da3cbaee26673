"""The benchmark: timed steps on synthetic data, FLOPs, memory, the transformers.Trainer peer."""
