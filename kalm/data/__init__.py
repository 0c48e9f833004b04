"""The data stages: validation, exact and near dedup, decontamination, and the Parquet records between them."""
