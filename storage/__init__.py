"""storage: the layer store (content-addressed safetensors), the data-set store, the SQL
schema with Alembic migrations, the commit protocol, lineage queries and garbage
collection. Knows tensors, never torch modules."""
