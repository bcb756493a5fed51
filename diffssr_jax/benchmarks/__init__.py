"""Speed benchmarks: the model's init, train step and sampler (`model`) and the data half (`data`)."""
