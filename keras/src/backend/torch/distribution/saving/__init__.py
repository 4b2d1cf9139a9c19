"""Keras's files written once from N processes (`saved_values`,
`single_writer`, `backups`), read a block at a time (`h5_partial_read`);
sharded checkpoints (`sharded`)."""
