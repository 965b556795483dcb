"""Data: benchmark task metadata and npz IO, the synthetic generator, the pretraining corpus store."""
