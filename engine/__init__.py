"""reelsift engine: CLI, pipeline assembly, table schemas and I/O."""
