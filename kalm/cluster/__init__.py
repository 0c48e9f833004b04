"""Running on GPUs and clusters: the GPU-slot launcher."""
