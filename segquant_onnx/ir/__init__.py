"""Graph IR and IO: load/save, canonicalize, finalize, names, Q/DQ building blocks, output paths, sessions."""
