"""Hard-negative mining: embedding shards, FAISS pools, the mining step."""
